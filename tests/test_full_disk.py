"""A real full disk: small tmpfs filesystems that a run's checkpoint, a run's own metrics rows and an export actually
fill. Each stops with one line naming the folder, the bytes needed and the bytes free; the newest complete checkpoint
stays readable and resumes to exactly the uninterrupted run; an export leaves nothing partial and keeps the export it
was replacing. (tests/test_reliability.py injects ENOSPC into single writes; these fill a filesystem.)"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qlora import checkpoint
from qlora.composition import compose_command
from qlora.config import ExportCommand
from qlora.errors import QloraError
from qlora.export import export
from qlora.files import folder_bytes, free_bytes
from qlora.train import run
from tests.runs import TINY, logged_step, qlora_cli, run_differences
from tests.runs import compose as compose_tiny

pytestmark = pytest.mark.slow  # training runs

SETTINGS = [*TINY, "train.max_steps=12", "train.save_every_steps=2", "train.keep_checkpoints=2",
            "train.log_every_steps=1", "train.eval_every_steps=6", "lora.dropout=0.1", "train.report=false"]
PAGE = 4096
STOP = re.compile(r"^qlora: disk full in (?P<folder>\S+): .+ needs about [\d.]+ [KMG]iB, [\d.]+ [KMG]iB free; "
                  r"checkpoint (?P<kept>\S+) is intact\. free disk space.*resume=auto$")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def whole(cache, tmp_path_factory) -> Path:
    """The run uninterrupted, on a disk with room."""
    return run(compose_tiny(cache, tmp_path_factory.mktemp("whole") / "run", *SETTINGS)).output_dir


class SmallDisks:
    """tmpfs filesystems of a given size (rounded up to pages) mounted under `root`; `unmount_all` at the end."""

    def __init__(self, root: Path) -> None:
        self.root, self.mounted = root, []

    def __call__(self, size: int) -> Path:
        where = self.root / f"disk{len(self.mounted)}"
        where.mkdir()
        done = _mount("-t", "tmpfs", "-o", f"size={_pages(size)}", "qlora-test", str(where))
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        self.mounted.append(where)
        return where

    def resize(self, where: Path, size: int) -> None:
        done = _mount("-o", f"remount,size={_pages(size)}", str(where))
        assert done.returncode == 0, done.stderr

    def unmount_all(self) -> None:
        for where in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


def _pages(size: int) -> int:
    return -(-size // PAGE) * PAGE


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(bytes)` mounts a tmpfs of that size; skips where this process may not mount one."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs Linux and mount(8)")
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    disks = SmallDisks(tmp_path)
    yield disks
    disks.unmount_all()


def run_files_bytes(run_dir: Path) -> int:
    """What a run folder holds besides its checkpoints and results: config, tokenizer, logs."""
    return sum(folder_bytes(run_dir / name) if (run_dir / name).is_dir() else
               max((run_dir / name).stat().st_size, PAGE) for name in ("config.yaml", "tokenizer", "train.log",
                                                                       "metrics.jsonl"))


def test_a_checkpoint_that_fills_the_disk_stops_the_run_in_one_line_and_resumes_exactly(whole, cache, small_disk,
                                                                                         tmp_path):
    """Room for the run's files and two checkpoints, not three: the third write (step 6) fills the disk."""
    size = folder_bytes(checkpoint.complete_checkpoints(whole)[-1])
    disk = small_disk(run_files_bytes(whole) + 2 * size + size // 2)
    out = disk / "run"
    args = [f"cache_dir={cache}", f"model.scratch.path={cache}/tiny128", *SETTINGS, f"output_dir={out}"]
    stopped = qlora_cli("train", *args, cwd=tmp_path)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1, stopped.stderr[-3000:]
    match = STOP.match(lines[0])
    assert match and match["folder"] == str(out / "checkpoints"), lines[0]
    assert "checkpoint step-000006 needs about" in lines[0], lines[0]
    kept = checkpoint.complete_checkpoints(out)
    assert [p.name for p in kept] == ["step-000002", "step-000004"] and match["kept"] == str(kept[-1])
    assert not list((out / "checkpoints").glob(".*")), "the failed write left its temporary folder"
    assert checkpoint.read(kept[-1]).step == 4
    assert not (out / "summary.json").exists()

    small_disk.resize(disk, 16 * 2**20)  # the user frees space
    resumed = qlora_cli("train", *args, "resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_differences(whole, out) == []


def fill(disk: Path) -> Path:
    """Take every free byte of `disk` with a file of zeros, as another program would; returns the file."""
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as fh:
        while True:
            try:
                fh.write(b"\0" * PAGE)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return ballast


# A checkpoint every 30 steps and a metrics row every step: 30 rows (about 6 KB) come before the next checkpoint, more
# than the page metrics.jsonl was last given can still take, so a row's write is what finds the disk full.
LONG = [*TINY, "train.max_steps=60", "train.save_every_steps=30", "train.log_every_steps=1",
        "train.eval_every_steps=30", "lora.dropout=0.1", "train.report=false"]


def test_a_run_whose_disk_another_program_fills_stops_in_one_line_and_resumes_exactly(cache, small_disk, tmp_path):
    """Once checkpoint 30 is written, another program takes the rest of the disk: the run's next metrics row finds
    it full (its log lines are dropped without a traceback)."""
    whole_long = run(compose_tiny(cache, tmp_path / "whole", *LONG)).output_dir
    disk = small_disk(16 * 2**20)
    out = disk / "run"
    filled: list[Path | None] = []

    def filler() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not filled:
            if checkpoint.complete_checkpoints(out):
                filled.append(fill(disk))
            time.sleep(0.001)

    thread = threading.Thread(target=filler)
    thread.start()
    try:
        with pytest.raises(QloraError) as stopped:
            run(compose_tiny(cache, out, *LONG))
    finally:
        filled.append(None)  # stops the filler if the run ended first
        thread.join()
    message = f"qlora: {stopped.value}"
    assert "\n" not in message
    match = STOP.match(message)
    assert match and match["folder"] == str(out), message
    assert "the run (its next checkpoint) needs about" in message, message
    assert 30 <= logged_step(out) < 60 and not (out / "summary.json").exists()
    kept = checkpoint.complete_checkpoints(out)
    assert [p.name for p in kept] == ["step-000030"] and match["kept"] == str(kept[-1]), message
    assert checkpoint.read(kept[-1]).step == 30
    assert not list((out / "checkpoints").glob(".*"))

    filled[0].unlink()  # the user frees space
    run(compose_tiny(cache, out, *LONG, "resume=auto"))
    assert run_differences(whole_long, out) == []


def test_an_export_that_fills_the_disk_leaves_nothing_partial_and_keeps_the_previous_export(whole, small_disk):
    """Room for one export and half of another: replacing the first (overwrite=true) fills the disk."""
    first = compose_command(ExportCommand, [f"run_dir={whole}", f"output_dir={whole.parent / 'export'}"])
    size = folder_bytes(export(first).output_dir)
    disk = small_disk(size + size // 2)
    out = disk / "export"
    export(compose_command(ExportCommand, [f"run_dir={whole}", f"output_dir={out}"]))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    run_before = {p.relative_to(whole): p.stat().st_mtime_ns for p in whole.rglob("*") if p.is_file()}
    with pytest.raises(QloraError) as stopped:
        export(compose_command(ExportCommand, [f"run_dir={whole}", f"output_dir={out}", "overwrite=true",
                                               "export.dtype=float32"]))
    message = str(stopped.value)
    assert "\n" not in message and message.startswith(f"disk full in {disk}: the export export needs about "), message
    assert "nothing was left in" in message and "free disk space or choose another output_dir" in message
    assert sorted(p.name for p in disk.iterdir()) == ["export"]  # no .export.partial, no .export.old
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert {p.relative_to(whole): p.stat().st_mtime_ns for p in whole.rglob("*") if p.is_file()} == run_before
    assert free_bytes(disk) > size // 3  # what the failed write took was given back
