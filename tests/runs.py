"""How the tests and scripts/ start, stop and compare qlora runs: where the shared files are, the tiny model's
overrides, `python -m qlora` as a user runs it, and the harness behind the resume tests and scripts/kill_trials.py.

Stopping runs: a plan is a list of (how, step): `kill` sends SIGKILL once the run has logged that step, `write`
sends SIGKILL while a checkpoint is being written (the first write from that step on that polling catches; a
write can be too quick to catch, so `write` belongs last in a plan), `int` / `term` send SIGINT / SIGTERM (the
run checkpoints and exits). Each stop is followed by `resume=auto`; the last segment runs to the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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

def compose(cache: Path, out: Path, *overrides: str):  # -> qlora.config.Config
    """The demo recipe on the TINY model (built in `cache`), writing to `out`, with `overrides` on top."""
    from qlora.composition import compose_config

    return compose_config([f"cache_dir={cache}", f"model.scratch.path={cache}/tiny128", *TINY, f"output_dir={out}",
                           *overrides])


def write_demo_pairs(path: Path) -> Path:
    """Preference pairs from the demo records: the true fact chosen, another animal's fact for it rejected (the
    Alpaca prompt as text), written as JSON Lines; returns `path`."""
    import random

    from qlora.data import alpaca_prompt
    from qlora.demo import ANIMALS, RELATIONS

    rng, rows = random.Random(0), []
    for animal, facts in ANIMALS.items():
        for k, ((questions, answer), fact) in enumerate(zip(RELATIONS.values(), facts, strict=True)):
            wrong = ANIMALS[rng.choice([a for a in ANIMALS if ANIMALS[a][k] != fact])][k]
            rows += [{"prompt": alpaca_prompt(q.format(a=animal)), "chosen": answer.format(a=animal, x=fact),
                      "rejected": answer.format(a=animal, x=wrong)} for q in questions]
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def preference(pairs: Path, objective: str = "dpo") -> list[str]:
    """Overrides that train `objective` on the pairs file, dropout off (runs compared step by step draw none)."""
    return [f"objective={objective}", "data.format=preference", f"data.path={pairs}", "lora.dropout=0"]


def packed_batch():  # -> dict[str, torch.Tensor]
    """Two packed rows as qlora's collator makes them: 7 + 10 + 3 tokens, and 12 + 5 then 3 of padding."""
    import torch

    from qlora.data.batches import Collator
    from qlora.data.encode import Example

    generator = torch.Generator().manual_seed(1)

    def example(n: int) -> Example:
        ids = torch.randint(3, 300, (n,), generator=generator).tolist()
        return Example(input_ids=ids, labels=ids, record=0)

    return Collator(pad_id=0, packed=True)([[example(7), example(10), example(3)], [example(12), example(5)]])


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


def qlora_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m qlora ARGS` as a user would."""
    return subprocess.run([sys.executable, "-m", "qlora", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


SIGNALS = {"kill": signal.SIGKILL, "write": signal.SIGKILL, "int": signal.SIGINT, "term": signal.SIGTERM}
EXPECTED_EXIT = {"kill": -signal.SIGKILL, "write": -signal.SIGKILL, "int": 128 + signal.SIGINT,
                 "term": 128 + signal.SIGTERM}


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "qlora", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_step(run_dir: Path) -> int:
    """The newest step in the run's metrics.jsonl (0 if none); tolerant of a line being written."""
    path = run_dir / "metrics.jsonl"
    step = 0
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            step = max(step, json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return step


def writing_checkpoint(run_dir: Path, from_step: int) -> bool:
    """Whether a checkpoint for a step >= from_step is being written right now (its temporary folder exists)."""
    root = run_dir / "checkpoints"
    return root.is_dir() and any(int(p.name[len(".step-"):-len(".tmp")]) >= from_step
                                 for p in root.glob(".step-*.tmp"))


def stop_at(proc: subprocess.Popen, run_dir: Path, how: str, step: int, timeout: float = 300) -> bool:
    """Send `how`'s signal at its moment; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        ready = writing_checkpoint(run_dir, step) if how == "write" else logged_step(run_dir) >= step
        if ready:
            proc.send_signal(SIGNALS[how])
            return True
        time.sleep(0.002 if how == "write" else 0.02)
    return False


def interrupted_run(args: list[str], run_dir: Path, plan: list[tuple[str, int]], cwd: Path) -> list[str]:
    """Run with the stops in `plan`, resuming after each; returns a line per segment describing how it ended.

    Raises AssertionError when a segment does not end as planned (the run finished first, or the exit code or
    message is wrong).
    """
    report = []
    for i, (how, step) in enumerate([*plan, ("end", 0)]):
        # A stopped run may have logged past its stop; a step logged before this segment must not trigger it.
        step = max(step, logged_step(run_dir) + 1)
        proc = start([*args, f"output_dir={run_dir}", *(["resume=auto"] if i else [])], cwd)
        sent = how != "end" and stop_at(proc, run_dir, how, step)
        out, err = proc.communicate(timeout=600)
        if how == "end":
            assert proc.returncode == 0, f"final segment failed ({proc.returncode}): {err[-2000:]}"
        elif how == "write" and not sent and proc.returncode == 0:  # every checkpoint write was too quick to hit
            report.append(f"write from step {step}: missed, the run finished")
            break
        else:
            assert sent, f"segment {i} ({how} at step {step}) ended before the signal: {err[-2000:]}"
            assert proc.returncode == EXPECTED_EXIT[how], \
                f"segment {i} ({how} at {step}): exit {proc.returncode} {err[-2000:]}"
            if how in ("int", "term"):
                assert "checkpoint" in err and "resume=auto" in err and "Traceback" not in err, err
        report.append(f"{how} at step {step}: exit {proc.returncode}, logged up to step {logged_step(run_dir)}")
    return report


WALL_CLOCK = ("tokens_per_s", "memory_gb", "seconds", "peak_memory_gb", "eval_seconds", "eval_share",
              "planned_memory_gb")
"""Metrics and summary keys that measure the process (time, memory; a CPU plan counts the process's resident
memory), which no two runs share."""


def comparable_summary(run_dir: Path) -> dict:
    """summary.json without the wall-clock keys."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in WALL_CLOCK}


def comparable_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock columns, which no two runs share."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]



SAME_BYTES = ("adapter/adapter_model.safetensors", "samples.json")
"""Run files that two runs of one config hold byte for byte."""


def run_differences(a: Path, b: Path) -> list[str]:
    """What differs between two run folders of one config, [] when they are the same run: the metrics rows and
    summary.json without their wall-clock keys, and the bytes of the adapter and the samples. The one home of
    "same run" for the resume tests and scripts/kill_trials.py."""
    missing = [f"{run / name} is missing" for name in ("metrics.jsonl", "summary.json", *SAME_BYTES)
               for run in (a, b) if not (run / name).is_file()]
    if missing:
        return missing
    found = []
    rows_a, rows_b = comparable_metrics(a), comparable_metrics(b)
    if len(rows_a) != len(rows_b):
        found.append(f"metrics.jsonl: {len(rows_a)} rows against {len(rows_b)}")
    found += [f"metrics.jsonl row {i}: {row_a} against {row_b}"
              for i, (row_a, row_b) in enumerate(zip(rows_a, rows_b, strict=False)) if row_a != row_b][:3]
    summary_a, summary_b = comparable_summary(a), comparable_summary(b)
    found += [f"summary.json {key}: {summary_a.get(key)!r} against {summary_b.get(key)!r}"
              for key in sorted(summary_a.keys() | summary_b.keys()) if summary_a.get(key) != summary_b.get(key)]
    found += [f"{name}: the bytes differ" for name in SAME_BYTES if (a / name).read_bytes() != (b / name).read_bytes()]
    return found
