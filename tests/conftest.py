"""Fixtures: tiny models built from configs in a temporary cache, composed exactly as the CLI does, and the real
model. What tests and scripts share beyond fixtures is in tests/runs.py."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora.composition import compose_config
from tests.runs import SHARED, SMOLLM2_RUN, TINY

USER_CACHE = Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora")).expanduser()
"""The user's qlora cache: only the real model is kept there (built once, and where recipe=smollm2-alpaca looks for
it); everything else a test builds goes to the run's own cache (QLORA_CACHE, set in pytest_configure)."""


@pytest.hookimpl(trylast=True)  # after pytest's own, which sets up tmp_path_factory
def pytest_configure(config):
    # Hermetic: a test that falls back to the default cache_dir builds there, never reads what `make demo` left.
    # Set once by the controlling process (or the only one), inherited by xdist workers and subprocesses alike.
    if "PYTEST_XDIST_WORKER" not in os.environ:
        os.environ["QLORA_CACHE"] = str(config._tmp_path_factory.getbasetemp() / "qlora-cache-default")
    # pytest-xdist: the cores shared among the workers, in the workers and in the processes they start, so two
    # workers do not fight over each core (torch's threads spin while they wait).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = str(max(1, cores // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))


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
    folder = Path(os.environ.get("QLORA_SMOLLM2", USER_CACHE / "models" / "smollm2-135m-instruct")).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".smollm2.lock", "w") as lock:  # xdist workers: one builds, the others wait for it
        fcntl.flock(lock, fcntl.LOCK_EX)
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


SHARED_RUN_FIXTURES = ("smollm2_run",)
"""Session fixtures that train a run: under pytest-xdist (`--dist loadgroup`) the tests using one go to one worker,
so the run is trained once."""


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(config, items):
    import torch

    groups: dict[str, list] = {}
    for item in items:
        # A test file's module fixtures (a reference run, built models) are built once: its tests share a worker.
        shared = next((f for f in SHARED_RUN_FIXTURES if f in item.fixturenames), item.nodeid.partition("::")[0])
        item.add_marker(pytest.mark.xdist_group(shared))
        groups.setdefault(shared, []).append(item)
    # The longest groups first (make test passes --no-loadscope-reorder, so workers take groups in this order): the
    # real model's, then the other end-to-end ones; the many short tests fill in at the end. Each group stays in
    # one piece and in its order, so a module's fixtures are built once in one process too.
    def cost(group: list) -> int:
        return min(0 if "smollm2" in item.fixturenames else 1 if "slow" in item.keywords else 2 for item in group)

    items[:] = [item for group in sorted(groups.values(), key=cost) for item in group]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
