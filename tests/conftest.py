"""Shared fixtures: tiny models built from configs in a temporary cache, composed exactly as the CLI does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora.composition import compose_config

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
"""What every developer and CI has beside the checkout: the real model's builder and real data."""
ALPACA_5000 = SHARED / "data" / "alpaca_5000.json"

# A 2-layer, width-128 Llama: big enough for every code path, small enough for seconds per run.
TINY = [
    "model.scratch.hidden_size=128",
    "model.scratch.intermediate_size=256",
    "model.scratch.num_hidden_layers=2",
    "model.scratch.num_attention_heads=4",
    "model.scratch.num_key_value_heads=2",
    "optim.min_8bit_size=256",
    "train.loggers=[]",
    "train.progress=false",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qlora-cache")


@pytest.fixture
def tiny_config(cache_dir, tmp_path):
    """Compose the default recipe on the tiny model, writing to a fresh output_dir; extra overrides win."""

    def make(*overrides: str, output_dir: Path | None = None):
        out = output_dir or tmp_path / "run"
        config = compose_config([f"cache_dir={cache_dir}", f"model.scratch.path={cache_dir}/tiny128", *TINY,
                                    f"output_dir={out}", *overrides])
        return config

    return make


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct, the real pretrained model, as an ordinary HF folder: built once by
    ../shared/models/smollm2.py (about 45 s) into the user's qlora cache, where `recipe=smollm2-alpaca` looks for it
    too (QLORA_SMOLLM2 moves it)."""
    script = SHARED / "models" / "smollm2.py"
    if not script.is_file():
        pytest.skip(f"the real-model tests need {script}, which is not beside this checkout")
    default = Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora")) / "models" / "smollm2-135m-instruct"
    folder = Path(os.environ.get("QLORA_SMOLLM2", default)).expanduser()
    subprocess.run([sys.executable, str(script), str(folder)], check=True, capture_output=True, timeout=900)
    return folder


# A short SmolLM2 fine-tune on the Alpaca sample: every value that matters given, so no recipe's defaults change it.
SMOLLM2_RUN = [
    "data.format=alpaca", f"data.path={ALPACA_5000}", "data.on_invalid=skip", "data.eval_fraction=0.02",
    "train.seq_len=128", "train.micro_batch_size=4", "train.grad_accum_steps=1", "train.max_steps=8",
    "train.eval_every_steps=8", "train.eval_max_sequences=16", "train.save_every_steps=0",
    "train.sample_prompts=[Give three tips for staying healthy.]", "train.max_new_tokens=16",
    "optim.lr=1e-3", "optim.warmup_steps=0", "optim.min_8bit_size=4096",
    "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "data.group_by_length=true",
    "train.loggers=[]", "train.progress=false", "train.report=false",
]


@pytest.fixture(scope="session")
def smollm2_run(smollm2, cache_dir, tmp_path_factory):
    """A finished 8-step QLoRA run of SmolLM2 on the Alpaca sample (about a minute on 2 cores), shared by the
    real-model tests; its adapter moves the model far enough that a wrong merge shows."""
    from qlora.train import run

    out = tmp_path_factory.mktemp("smollm2") / "run"
    return run(compose_config([f"cache_dir={cache_dir}", f"model.name_or_path={smollm2}", *SMOLLM2_RUN,
                               f"output_dir={out}"]))


def qlora_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m qlora ARGS` as a user would."""
    return subprocess.run([sys.executable, "-m", "qlora", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
