"""Shared fixtures: tiny models built from configs in a temporary cache, composed exactly as the CLI does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora.composition import compose_config

REPO = Path(__file__).resolve().parents[1]

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
