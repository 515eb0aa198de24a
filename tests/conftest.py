"""Fixtures: tiny models built from configs in a temporary cache, composed exactly as the CLI does, and the real
model. What tests and scripts share beyond fixtures is in tests/runs.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora.composition import compose_config
from tests.runs import SHARED, SMOLLM2_RUN, TINY


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


@pytest.fixture(scope="session")
def smollm2_run(smollm2, cache_dir, tmp_path_factory):
    """A finished 8-step QLoRA run of SmolLM2 on the Alpaca sample (about a minute on 2 cores), shared by the
    real-model tests; its adapter moves the model far enough that a wrong merge shows."""
    from qlora.train import run

    out = tmp_path_factory.mktemp("smollm2") / "run"
    return run(compose_config([f"cache_dir={cache_dir}", f"model.name_or_path={smollm2}", *SMOLLM2_RUN,
                               f"output_dir={out}"]))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
