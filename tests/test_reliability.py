"""Reliability: runs stopped by kill -9, SIGINT or SIGTERM resume to exactly the uninterrupted result; checkpoint
writes are atomic; every bad input is one line, exit 2, and changes nothing in an existing run folder."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qlora import checkpoint
from qlora.composition import compose_config
from qlora.errors import QloraError
from qlora.train import run
from tests.runs import TINY, interrupted_run, preference, qlora_cli, run_differences, write_demo_pairs

pytestmark = pytest.mark.slow  # runs trained, stopped and resumed through the CLI

STEPS = 24
# 162 training sequences in batches of 8, two per step: 10 steps an epoch, so runs cross epoch boundaries.
# Dropout on, so the RNG state matters.
SETTINGS = [*TINY, f"train.max_steps={STEPS}", "train.save_every_steps=4", "train.keep_checkpoints=2",
            "train.log_every_steps=1", "train.eval_every_steps=5", "train.micro_batch_size=8",
            "train.grad_accum_steps=2", "lora.dropout=0.1"]


def settings(cache: Path) -> list[str]:
    return [f"cache_dir={cache}", f"model.scratch.path={cache}/tiny128", *SETTINGS]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> Path:
    """An uninterrupted run, through the CLI."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = qlora_cli("train", *settings(cache), f"output_dir={out}", cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return out


def test_stopped_and_resumed_runs_equal_the_uninterrupted_one_bit_for_bit(reference, cache, tmp_path):
    seed = int(os.environ.get("QLORA_KILL_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    plan, step = [], 0
    for how in ("kill", "int", "kill", "term", "write"):
        step += rng.randint(2, 4)
        plan.append((how, step))
    report = interrupted_run(settings(cache), tmp_path / "run", plan, cwd=tmp_path)
    try:
        assert run_differences(reference, tmp_path / "run") == []
    except AssertionError as e:
        raise AssertionError(f"QLORA_KILL_SEED={seed}: {report}") from e
    assert not list((tmp_path / "run" / "checkpoints").glob(".*")), "a temporary checkpoint folder was left"


def test_resume_into_a_new_folder_from_an_older_checkpoint(reference, cache, tmp_path):
    older = checkpoint.complete_checkpoints(reference)[0]
    assert checkpoint.step_of(older) < STEPS
    config = compose_config([*settings(cache), f"output_dir={tmp_path / 'fork'}", f"resume={older}"])
    run(config)
    assert run_differences(reference, tmp_path / "fork") == []


def test_resume_auto_skips_a_damaged_newest_checkpoint(reference, cache, tmp_path):
    crashed = tmp_path / "crashed"
    shutil.copytree(reference, crashed)
    shutil.rmtree(crashed / "adapter")  # as if killed after its last checkpoint
    (crashed / "summary.json").unlink()
    older, newest = checkpoint.complete_checkpoints(crashed)
    (newest / "optimizer.pt").write_bytes((newest / "optimizer.pt").read_bytes()[:100])
    run(compose_config([*settings(cache), f"output_dir={crashed}", "resume=auto"]))
    assert run_differences(reference, crashed) == []


def test_checkpoints_load_no_pickled_code(reference, tmp_path):
    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    ckpt = tmp_path / "step-000004"
    shutil.copytree(checkpoint.complete_checkpoints(reference)[-1], ckpt)
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps({"state": Exploit()}, protocol=2))
    with pytest.raises(QloraError, match=r"step-000004 is unreadable: optimizer.pt"):
        checkpoint.read(ckpt)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------ atomic writes


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one(reference, tmp_path):
    run_dir = tmp_path / "run"
    previous = checkpoint.complete_checkpoints(reference)[-1]
    shutil.copytree(previous, run_dir / "checkpoints" / previous.name)
    before = snapshot(run_dir)
    writer = f"""
import sys, time
from pathlib import Path
from qlora import checkpoint

def write(folder):
    (folder / "optimizer.pt").write_bytes(b"half" * 1000)
    print("writing", flush=True)
    time.sleep(60)

checkpoint.save(Path({str(run_dir)!r}), 99, write, keep=2)
"""
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / "checkpoints" / ".step-000099.tmp").is_dir()  # killed mid-write
    assert checkpoint.complete_checkpoints(run_dir) == [run_dir / "checkpoints" / previous.name]
    assert checkpoint.read(checkpoint.complete_checkpoints(run_dir)[-1]).step == checkpoint.step_of(previous)
    checkpoint.remove_partial(run_dir)
    assert snapshot(run_dir) == before


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(reference, tmp_path):
    run_dir = tmp_path / "run"
    previous = checkpoint.complete_checkpoints(reference)[-1]
    shutil.copytree(previous, run_dir / "checkpoints" / previous.name)
    before = snapshot(run_dir)

    def write(folder: Path) -> None:  # what a full disk does to a write
        (folder / "optimizer.pt").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(QloraError, match=rf"^disk full in {run_dir / 'checkpoints'}: checkpoint step-000099 needs "
                                         rf"about [\d.]+ KiB, [\d.]+ [KMGT]iB free; checkpoint "
                                         rf".*{previous.name} is intact\. free disk space"):
        checkpoint.save(run_dir, 99, write, keep=1)
    assert snapshot(run_dir) == before


def test_non_finite_loss_stops_at_the_step_with_the_checkpoint_named(cache, tmp_path):
    config = compose_config([*settings(cache), f"output_dir={tmp_path / 'run'}", "optim.lr=1e30",
                             "train.save_every_steps=1", "optim.warmup_steps=0"])
    with pytest.raises(QloraError, match=r"^loss nan at step 2, so training stopped there without applying it; "
                                         r"the newest checkpoint is .*step-000001 \(resume=auto"):
        run(config)
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "summary.json").exists()
    checkpoint.read(checkpoint.complete_checkpoints(tmp_path / "run")[-1])


def test_non_finite_loss_can_be_skipped_but_not_forever(cache, tmp_path):
    config = compose_config([*settings(cache), f"output_dir={tmp_path / 'run'}", "optim.lr=1e30",
                             "train.on_nonfinite_loss=skip", "optim.warmup_steps=0"])
    with pytest.raises(QloraError, match=r"^loss nan at 10 steps in a row \(up to step 11\)"):
        run(config)


def test_config_differences_that_change_the_result_are_named(reference, cache):
    saved = checkpoint.read(checkpoint.complete_checkpoints(reference)[-1]).config
    resolved = ["model.attn_implementation=sdpa"]  # what the run resolved auto to for this Llama, and recorded
    same = compose_config([*settings(cache), *resolved, f"output_dir={reference}", "train.max_steps=99",
                           "train.log_every_steps=7", "resume=auto"])
    assert checkpoint.differences(saved, same) == []
    other = compose_config([*settings(cache), *resolved, f"output_dir={reference}", "optim.lr=1e-3", "seed=7",
                            "quant=fp4-dq"])
    assert checkpoint.differences(saved, other) == [
        "optim.lr (0.003 -> 0.001)", "quant.method (nf4 -> fp4)", "seed (42 -> 7)"]


# ------------------------------------------------------------------------------------------ bad inputs


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: content digest and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    (root / "broken-model").mkdir()
    (root / "broken-model" / "config.json").write_text("{not json")
    (root / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    return root


# (what, target, overrides, environment, the message's start or a part of it)
# target "run": output_dir is a finished run (resume=auto with more steps gets past the folder check);
# target "unfinished": the same run killed after its last checkpoint;
# target "new": output_dir does not exist, and must not exist afterwards.
MORE = ["resume=auto", f"train.max_steps={STEPS + 8}"]
DEMO = "recipe=default"  # with the settings' scratch keys: without a recipe, another model picks recipe=custom
BAD_INPUTS = [
    ("missing model folder", "run", [*MORE, DEMO, "model.name_or_path=/no/such/model"], {},
     "config error: model.name_or_path: /no/such/model is not a model folder"),
    ("unreadable model folder", "new", [DEMO, "model.name_or_path={inputs}/broken-model"], {},
     "could not load the model config from {inputs}/broken-model"),
    ("hub id without network", "new", [DEMO, "model.name_or_path=nobody/no-such-model"],
     {"HF_ENDPOINT": "http://127.0.0.1:9"},
     "could not load the model config: 'nobody/no-such-model' is not in the local hub cache and the hub is "
     "unreachable"),
    ("missing data file", "run", [*MORE, "data.path=/no/such/data.jsonl"], {},
     "config error: data.path: /no/such/data.jsonl does not exist"),
    ("malformed JSONL row", "new", ["data.path={inputs}/bad.jsonl"], {},
     "{inputs}/bad.jsonl: line 2 is not valid JSON"),
    ("malformed JSONL row, overwrite=true", "run", ["overwrite=true", "data.path={inputs}/bad.jsonl"], {},
     "{inputs}/bad.jsonl: line 2 is not valid JSON"),
    ("lora.r <= 0", "run", [*MORE, "lora.r=0"], {}, "config error: lora.r must be > 0 (got 0)"),
    ("optim.lr <= 0", "run", [*MORE, "optim.lr=0"], {}, "config error: optim.lr must be > 0 (got 0.0)"),
    ("seq_len above the model's positions", "run", [*MORE, "train.seq_len=4096"], {},
     "config error: train.seq_len=4096 is longer than the model's 256 positions"),
    ("negative steps", "run", ["resume=auto", "train.max_steps=-5"], {},
     "config error: train.max_steps must be > 0 (got -5)"),
    ("finished run in output_dir", "run", [], {}, "output_dir {run} already holds a finished run"),
    ("unfinished run in output_dir", "unfinished", [], {},
     "output_dir {run} holds an unfinished run (newest checkpoint: step-0000"),
    ("resume a finished run without more steps", "run", ["resume=auto"], {},
     f"the run in {{run}} already finished {STEPS} steps; raise train.max_steps"),
    ("resume with a different LoRA shape", "run", [*MORE, "lora.r=8"], {},
     "resume: the config differs from checkpoint {run}/checkpoints/step-0000"),
    ("resume from a missing path", "new", ["resume=/no/such/run"], {}, "resume=/no/such/run: no such folder"),
    ("resume and overwrite", "run", ["resume=auto", "overwrite=true"], {},
     "config error: resume and overwrite=true contradict each other"),
    ("config-driven object construction", "run", [*MORE, "optim._target_=os.system"], {},
     "config error: unknown config key 'optim._target_'"),
]


@pytest.mark.parametrize("what,target,overrides,env,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(what, target, overrides, env, message, reference,
                                                         cache, inputs, tmp_path):
    finished = tmp_path / "finished"
    shutil.copytree(reference, finished)
    if target == "unfinished":
        shutil.rmtree(finished / "adapter")
        (finished / "summary.json").unlink()
    out = tmp_path / "new" if target == "new" else finished
    before = snapshot(finished)
    fill = {"inputs": inputs, "run": out}
    args = [*settings(cache), f"output_dir={out}", *(o.format(**fill) for o in overrides)]
    result = qlora_cli("train", *args, cwd=tmp_path, env={"HF_HUB_OFFLINE": "", **env})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlora: "), result.stderr[-3000:]
    assert message.format(**fill) in lines[0], lines[0]
    assert snapshot(finished) == before
    assert not (tmp_path / "new").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = qlora_cli("train", "lora.r=0", "debug=true", f"output_dir={tmp_path}/out", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError: config error: lora.r must be > 0" in result.stderr


def test_a_dpo_run_stopped_and_resumed_equals_the_uninterrupted_one(cache, tmp_path):
    """The harness above on a preference run: the reference pass draws no randomness the resumed run would miss."""
    pairs = write_demo_pairs(tmp_path / "pairs.jsonl")
    args = [*settings(cache), *preference(pairs), "lora.dropout=0.1", "train.max_steps=12", "train.eval_every_steps=6"]
    whole = tmp_path / "whole"
    result = qlora_cli("train", *args, f"output_dir={whole}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = interrupted_run(args, tmp_path / "run", [("kill", 3), ("term", 7), ("kill", 10)], cwd=tmp_path)
    assert run_differences(whole, tmp_path / "run") == [], report
