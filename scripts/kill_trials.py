"""Stop the tiny run at random moments, resume it, and count how often the result differs from an uninterrupted run.

    python scripts/kill_trials.py --trials 10 [--seed 1] [--steps 24]

Each trial draws a plan of 2 to 5 stops (kill -9 after a logged step, SIGINT, SIGTERM, and a kill -9 aimed at
a checkpoint being written), runs it with `resume=auto` after every stop, and compares it with the uninterrupted
run as the resume tests do (tests/runs.py's run_differences: metrics and summary without wall-clock keys, adapter
and samples byte for byte). Prints one line per trial (with what differed, if anything) and a total; exits 1 if
any trial differed. The figures go into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.runs import TINY, interrupted_run, run_differences  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=24)
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qlora-kill-"))
    settings = [f"cache_dir={work}/cache", f"model.scratch.path={work}/cache/tiny128", *TINY,
                f"train.max_steps={options.steps}", "train.save_every_steps=4", "train.keep_checkpoints=2",
                "train.log_every_steps=1", "train.eval_every_steps=5", "train.micro_batch_size=8",
                "train.grad_accum_steps=2", "lora.dropout=0.1"]
    reference = work / "reference"
    done = subprocess.run([sys.executable, "-m", "qlora", "train", *settings, f"output_dir={reference}"],
                          cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 2
    rng = random.Random(options.seed)
    failures = stops = caught_writes = 0
    started = time.perf_counter()
    for trial in range(options.trials):
        plan, step = [], 0
        kinds = rng.sample(["kill", "kill", "int", "term"], k=rng.randint(1, 4)) + ["write"]
        for how in kinds:
            step += rng.randint(1, 4)
            plan.append((how, step))
        out = work / f"trial-{trial}"
        try:
            report = interrupted_run(settings, out, plan, cwd=work)
            differences = run_differences(reference, out)
        except AssertionError as e:  # a segment did not end as planned
            report, differences = [], [str(e)]
        same = not differences
        stops += sum(1 for line in report if "exit" in line and not line.startswith("end"))
        caught_writes += sum(1 for line in report if line.startswith("write") and "missed" not in line)
        failures += not same
        print(f"trial {trial}: {'same' if same else 'DIFFERENT'}; " + "; ".join(report + differences), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(f"{options.trials} trials, {stops} stops ({caught_writes} during a checkpoint write), {failures} differing "
          f"from the uninterrupted run; {time.perf_counter() - started:.0f}s")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
