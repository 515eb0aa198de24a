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
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(SharedRunScheduling(), "qlora-shared-run-scheduling")
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


SHARED_RUN_FILES = {"tests/test_smollm2.py": "smollm2_run", "tests/export/test_export_smollm2.py": "smollm2_run"}
"""Test files whose tests share a session fixture that trains a run (smollm2_run), and the name of the work unit they
form under pytest-xdist: one worker runs them all, so the run is trained once. Every other file is a unit of its own
(its module fixtures, a reference run or built models, are built once)."""


def work_unit(nodeid: str) -> str:
    """The pytest-xdist work unit of a test: its file's, or the shared run's for SHARED_RUN_FILES."""
    path = nodeid.partition("::")[0]
    return SHARED_RUN_FILES.get(path, path)


class SharedRunScheduling:
    """pytest-xdist's scope scheduling with `work_unit` as the scope. (Its `--dist loadgroup` would group by
    xdist_group marks, but on pytest 9 the node id it rewrites to carry the group no longer changes, so nothing is
    grouped.) Units are handed out in collection order, which pytest_collection_modifyitems makes longest first."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config, log):
        from xdist.scheduler import LoadScopeScheduling

        class Scheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return work_unit(nodeid)

        config.option.loadscopereorder = False
        return Scheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    import torch

    units: dict[str, list] = {}
    for item in items:
        unit = work_unit(item.nodeid)
        units.setdefault(unit, []).append(item)
        if "smollm2_run" in item.fixturenames and unit != "smollm2_run":
            raise pytest.UsageError(f"{item.nodeid} uses smollm2_run: list its file in tests/conftest.py's "
                                    "SHARED_RUN_FILES, so the run is trained once under pytest-xdist")

    # The longest units first, since workers take them in this order: the real model's, then the other end-to-end
    # ones; the many short tests fill in at the end. Each unit stays in one piece and in its order, so a module's
    # fixtures are built once in a single process too.
    def cost(unit: list) -> int:
        return min(0 if "smollm2" in item.fixturenames else 1 if "slow" in item.keywords else 2 for item in unit)

    items[:] = [item for unit in sorted(units.values(), key=cost) for item in unit]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
