"""Everything a lent GPU owes the project, in one budgeted command: the versions it runs with, the GPU-marked tests,
the side-by-side bench against the HF stack (qlora's default and qlora at equal recomputation, against one baseline
run), a coarse longest-sequence probe and the 2-process DDP step (skipped with one device). Run it through
scripts/gpu_check.sh, which first installs what the machine lacks from .whl/ (docs/benchmarks.md, "GPU check").

    scripts/gpu_check.sh $OUT                 # on the GPU machine: about 6 minutes (--budget 360)
    scripts/gpu_check.sh --dry-run /tmp/gc    # the same parts on the CPU with bench.py's tiny workload

Each part runs under its own deadline, taken from what is left of the budget; a part with no time left is skipped
with a line saying so. Every part's outcome goes to OUT/gpu_check.json as it ends (a check killed part way keeps
the parts before), and the tables to OUT/gpu_check.md. The exit status is 1 only when a correctness check failed
(a GPU test failed or errored); skipped and out-of-time parts exit 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_CANDIDATES = [REPO / ".gpu-data" / "alpaca_5000.json", REPO.parent / "shared" / "data" / "alpaca_5000.json"]
"""Where the bench's Alpaca records are looked for: carried with the checkout (.gpu-data/, ignored), or beside it."""
PACKAGES = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "hydra-core", "omegaconf", "datasets",
            "pyarrow", "pandas", "xxhash", "fsspec", "safetensors", "tokenizers", "numpy", "tqdm", "matplotlib",
            "tensorboard", "gguf", "pytest"]
"""Reported with their versions, or as missing: datasets' own dependencies (pyarrow, pandas, xxhash, fsspec) are
not in the wheelhouse, and the bench hands the baseline its data as a datasets.Dataset."""

VERSIONS = """
import json, platform, sys
from importlib.metadata import PackageNotFoundError, version
found = {"python": platform.python_version()}
for p in sys.argv[1:]:
    try:
        found[p] = version(p)
    except PackageNotFoundError:
        found[p] = None
import torch
found["cuda"] = torch.version.cuda
found["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
found["gpu"] = torch.cuda.get_device_name() if found["cuda_devices"] else None
print(json.dumps(found))
"""


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


class Check:
    """The parts' outcomes, the budget they share, and the folder they are written to."""

    def __init__(self, out: Path, budget: float, dry_run: bool) -> None:
        self.out = out
        self.started = time.monotonic()
        self.end = self.started + budget
        self.report: dict = {"budget_s": budget, "dry_run": dry_run, "parts": {}}
        self.processes = 0
        """Bench processes started so far: each Bench numbers its runs' folders and logs on from here."""

    def left(self) -> float:
        return self.end - time.monotonic()

    def record(self, part: str, status: str, seconds: float, note: str = "", **data) -> None:
        """A part's outcome: ok, failed, skipped or out of time, with a one-line note; written out at once."""
        self.report["parts"][part] = {"status": status, "seconds": round(seconds, 1), "note": note, **data}
        print(f"gpu-check: {part}: {status}{': ' + note if note else ''} ({seconds:.0f} s)", flush=True)
        self.save()

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2) + "\n")


def run_command(command: list[str], log: Path, timeout: float, env: dict | None = None) -> int | None:
    """Run `command` with its output in `log`; its exit status, or None when it ran past `timeout` (killed)."""
    with log.open("w") as f:
        try:
            return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout,
                                  env=env).returncode
        except subprocess.TimeoutExpired:
            return None


def part_versions(check: Check) -> dict:
    t = time.monotonic()
    done = subprocess.run([sys.executable, "-c", VERSIONS, *PACKAGES], capture_output=True, text=True, cwd=REPO,
                          timeout=min(120, max(check.left(), 1)))
    if done.returncode != 0:
        check.record("versions", "failed", time.monotonic() - t, done.stderr.strip().splitlines()[-1])
        return {}
    found = json.loads(done.stdout)
    missing = [p for p in PACKAGES if found.get(p) is None]
    shown = ", ".join(f"{k} {v}" for k, v in found.items() if v is not None and k != "cuda_devices")
    check.record("versions", "ok", time.monotonic() - t, shown + (f"; missing: {', '.join(missing)}" if missing
                                                                  else ""), versions=found, missing=missing)
    return found


def part_tests(check: Check, cap: float, found: dict) -> bool:
    """tests/test_gpu.py (pytest -m gpu; skipped without CUDA). Returns whether a test failed."""
    t = time.monotonic()
    if found.get("pytest") is None:
        check.record("gpu tests", "skipped", 0, "pytest is not installed (add its wheels to .whl)")
        return False
    timeout = min(cap, check.left())
    if timeout < 20:
        check.record("gpu tests", "out of time", 0, f"{timeout:.0f} s left of the budget")
        return False
    xml = check.out / "gpu_tests.xml"
    status = run_command([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p",
                          "no:cacheprovider", f"--junitxml={xml}"], check.out / "gpu_tests.log", timeout)
    seconds = time.monotonic() - t
    if status is None:
        check.record("gpu tests", "out of time", seconds, f"stopped after {timeout:.0f} s (gpu_tests.log)")
        return False
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    bad = counts["failures"] + counts["errors"] > 0 or status not in (0, 5) or not xml.is_file()
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    note = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
            f" (pytest exit {status}; gpu_tests.log)")
    check.record("gpu tests", "failed" if bad else "ok", seconds, note, passed=passed, **counts)
    return bad


def part_ddp(check: Check, found: dict, cap: float) -> None:
    """A 2-process DDP step (torchrun, the tiny scratch model, 2 steps), where the machine has 2 CUDA devices."""
    devices = found.get("cuda_devices", 0)
    if devices < 2:
        check.record("ddp", "skipped", 0, f"a 2-process DDP step needs 2 CUDA devices; this machine has {devices}")
        return
    timeout = min(cap, check.left())
    if timeout < 30:
        check.record("ddp", "out of time", 0, f"{timeout:.0f} s left of the budget")
        return
    t = time.monotonic()
    work = check.out / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "qlora", "train",
               f"cache_dir={work}/cache", f"model.scratch.path={work}/cache/tiny", f"output_dir={work}/run",
               "train.max_steps=2", "train.eval_every_steps=0", "train.sample_prompts=[]", "train.loggers=[]",
               "train.report=false", "train.progress=false"]
    status = run_command(command, check.out / "ddp.log", timeout)
    state = "out of time" if status is None else "ok" if status == 0 else "failed"
    check.record("ddp", state, time.monotonic() - t, f"torchrun 2 processes, exit {status} (ddp.log)")


def part_bench(check: Check, bench, args: argparse.Namespace, found: dict, data: Path, work: Path) -> dict:
    """qlora's default and qlora with train.gradient_checkpointing=true, each against one baseline run."""
    t = time.monotonic()
    cuda = not args.dry_run
    if cuda and not found.get("cuda_devices"):
        check.record("bench", "skipped", 0, "no CUDA device (the gpu workload is an 8B model)")
        return {}
    if check.left() < args.bench_min:
        check.record("bench", "out of time", 0, f"{check.left():.0f} s left of the budget, {args.bench_min} needed")
        return {}
    name = "tiny" if args.dry_run else "gpu"
    workload = replace(bench.WORKLOADS[name], repeats=1, max_steps=args.steps, warmup_steps=args.warmup,
                       micro_batch_size=args.micro_batch or bench.WORKLOADS[name].micro_batch_size,
                       seq_len=args.seq_len or bench.WORKLOADS[name].seq_len)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    options = argparse.Namespace(workload=name, peak_flops=None, longest=False, granularity=256)
    reports: dict = {"workload": workload}
    variants = [("default", ()), ("gradient_checkpointing", ("train.gradient_checkpointing=true",))]
    for label, extra in variants:
        b = bench.Bench(work, env, extra)
        b.deadline, b.count = check.end - args.reserve, check.processes
        try:
            report = bench.benchmark(b, workload, options, data, cuda,
                                     reuse={"baseline": reports["default"]["runs"]["baseline"]} if reports.get(
                                         "default") else None)
        except bench.OutOfTime as e:
            check.record(f"bench {label}", "out of time", time.monotonic() - t, str(e))
            break
        except SystemExit as e:  # a measured run failed: its log's end is the message
            check.record(f"bench {label}", "failed", time.monotonic() - t, str(e).splitlines()[0],
                         log_tail=str(e)[-3000:])
            break
        finally:
            check.processes = b.count
        reports[label] = report
        (check.out / f"bench_{label}.json").write_text(json.dumps(report, indent=2) + "\n")
        q, base = report["medians"]["qlora"], report["medians"]["baseline"]
        check.record(f"bench {label}", "ok", time.monotonic() - t,
                     f"qlora {q['tokens_per_s']:,.0f} tokens/s vs baseline {base['tokens_per_s']:,.0f} "
                     f"(bench_{label}.json)")
        t = time.monotonic()
    return reports


def part_longest(check: Check, bench, args: argparse.Namespace, data: Path, work: Path, reports: dict) -> dict:
    """Each side's longest of a few seq_lens at micro batch 1 (two steps each; a side stops at its first OOM)."""
    if "default" not in reports:
        check.record("longest", "skipped", 0, "the bench did not run, so no model was built")
        return {}
    t = time.monotonic()
    if check.left() < 30:
        check.record("longest", "out of time", 0, f"{check.left():.0f} s left of the budget")
        return {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    b = bench.Bench(work, env)
    b.deadline, b.count = check.end - 5, check.processes
    workload = reports["workload"]
    long_data = work / "long.json"
    bench.write_long_records(data, long_data, max(args.points))
    fits = bench.probe_fits(b, workload, long_data, say=lambda line: print(f"gpu-check: {line}", flush=True))
    found: dict = {}
    status, note = "ok", ""
    try:
        bench.coarse_longest(fits, args.points, found=found)
    except bench.OutOfTime as e:
        status, note = "out of time", f"{e}; the probes before it are kept"
    except SystemExit as e:
        status, note = "failed", str(e).splitlines()[0]
    longest = {side: asdict(v) for side, v in found.items()}
    summary = "; ".join(f"{side} {describe_longest(v)}" for side, v in longest.items())
    check.record("longest", status, time.monotonic() - t, "; ".join(x for x in (summary, note) if x),
                 points=args.points, longest=longest)
    return longest


def describe_longest(found: dict) -> str:
    if not found["probes"]:
        return "not probed"
    fitted = "none fitted" if not found["seq_len"] else ("≥ " if found["capped"] else "") + f"{found['seq_len']:,}"
    failed = [n for n, ok in found["probes"] if not ok]
    return fitted + (f" (out of memory at {failed[0]:,})" if failed else "")


def summary_table(reports: dict, longest: dict, points: list[int]) -> str:
    """The three columns side by side: qlora's default, qlora recomputing every layer, the baseline."""
    from bench import size

    columns = [("qlora (default)", reports.get("default"), "qlora"),
               ("qlora (train.gradient_checkpointing=true)", reports.get("gradient_checkpointing"), "qlora"),
               ("baseline (HF stack)", reports.get("default"), "baseline")]
    columns = [c for c in columns if c[1] is not None]
    if not columns:
        return "No bench figures: the bench did not run (see the parts above)."
    layers = columns[0][1]["architecture"]["num_hidden_layers"]

    def cells(fmt) -> str:
        return " | ".join(fmt(r["medians"][side], r["runs"][side][0]) for _, r, side in columns)

    def figure(key: str, show) -> str:
        return cells(lambda m, _r: show(m[key]) if m.get(key) is not None else "n/a")

    base = columns[0][1]["medians"]["baseline"]["tokens_per_s"]
    rows = [
        f"| | {' | '.join(c[0] for c in columns)} |",
        "| --- |" + " --- |" * len(columns),
        "| decoder layers recomputed | " + cells(lambda _m, r: f"{r['recomputed_layers']} of {layers}") + " |",
        f"| tokens/s (non-padding, steady state) | {figure('tokens_per_s', lambda v: f'{v:,.0f}')} |",
        f"| tokens/s / baseline's | {figure('tokens_per_s', lambda v: f'{v / base:.2f}')} |",
        f"| MFU (frozen-base model FLOPs) | {figure('mfu', lambda v: f'{v:.1%}')} |",
        f"| peak memory, max allocated (CPU: peak resident set) | {figure('peak_memory_bytes', size)} |",
        f"| peak memory, max reserved | {figure('peak_reserved_bytes', size)} |",
        f"| qlora's memory plan for the peak | {figure('planned_memory_bytes', size)} |",
        "| plan / measured peak | " + cells(lambda m, _r: f"{m['planned_memory_bytes'] / m['peak_memory_bytes']:.2f}"
                                           if m.get("planned_memory_bytes") else "n/a") + " |",
        f"| time to first step (start to base with LoRA) | {figure('time_to_first_step_s', lambda v: f'{v:.1f} s')} |",
        f"| time to training (start to step 1) | {figure('time_to_training_s', lambda v: f'{v:.1f} s')} |",
    ]
    if longest:
        probed = ", ".join(f"{n:,}" for n in sorted(points))
        shown = {"qlora": describe_longest(longest["qlora"]), "baseline": describe_longest(longest["baseline"])}
        rows.append(f"| longest seq_len at micro batch 1 (probed {probed}; default settings) | "
                    + " | ".join(shown[side] if label != columns[1][0] or len(columns) < 3 else ""
                                 for label, _, side in columns) + " |")
    return "\n".join(rows)


def markdown(check: Check, reports: dict, longest: dict, points: list[int]) -> str:
    parts = check.report["parts"]
    lines = ["| part | status | seconds | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {p['status']} | {p['seconds']:.0f} | {p['note']} |" for name, p in parts.items()]
    text = [f"## GPU check ({'dry run on the CPU' if check.report['dry_run'] else 'GPU'}), "
            f"{check.report['elapsed_s']:.0f} s of a {check.report['budget_s']:.0f} s budget", "", *lines, "",
            summary_table(reports, longest, points)]
    from bench import table

    for label in ("default", "gradient_checkpointing"):
        if label in reports:
            text += ["", f"### bench.py table: qlora {label}", "", table(reports[label])]
    return "\n".join(text) + "\n"


def find_data(given: Path | None) -> Path | None:
    for path in [given] if given else DATA_CANDIDATES:
        if path is not None and path.is_file():
            return path.resolve()
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=os.environ.get("OUT") or "gpu-check-out",
                        help="folder for the JSON, the tables and the logs (default: $OUT, else ./gpu-check-out)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU, bench.py's tiny workload: the same parts, end to end, in minutes")
    parser.add_argument("--budget", type=float, default=360, help="seconds for the whole check (default 360)")
    parser.add_argument("--data", type=Path, help="Alpaca-layout JSON (default: .gpu-data/ or ../shared/data/)")
    parser.add_argument("--steps", type=int, help="steps per bench run (default 8 on a GPU, 4 dry)")
    parser.add_argument("--warmup", type=int, help="steps left out of tokens/s (default 3 on a GPU, 1 dry)")
    parser.add_argument("--micro-batch", type=int, help="bench micro batch (default: the workload's)")
    parser.add_argument("--seq-len", type=int, help="bench seq_len (default: the workload's, 2048 on a GPU)")
    parser.add_argument("--points", type=lambda s: [int(x) for x in s.split(",")],
                        help="seq_lens the longest probe tries (default 8192,32768,65536; dry 256,512)")
    parser.add_argument("--tests-cap", type=float, default=150, help="seconds at most for the GPU tests")
    parser.add_argument("--reserve", type=float, default=60,
                        help="seconds of the budget the bench leaves for the longest probe (default 60)")
    parser.add_argument("--bench-min", type=float, default=60, help="seconds needed to start the bench")
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.dry_run else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    args.points = args.points or ([256, 512] if args.dry_run else [8192, 32768, 65536])
    if args.dry_run:
        args.reserve = min(args.reserve, 30)
        args.bench_min = min(args.bench_min, 20)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), args.budget, args.dry_run)
    check.report["command"] = shlex.join(["scripts/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])])
    print(f"gpu-check: budget {args.budget:.0f} s; writing to {check.out}", flush=True)
    found = part_versions(check)
    failed = part_tests(check, args.tests_cap, found)
    part_ddp(check, found, cap=90)
    data = find_data(args.data)
    # Outside OUT, whose files come back: the 8B model folder is 16 GB. Kept, so a second try reuses the model.
    work = Path(tempfile.gettempdir()) / f"qlora-gpu-check{'-dry' if args.dry_run else ''}"
    shutil.rmtree(work / "runs", ignore_errors=True)  # an earlier try's run folders and logs
    for old in work.glob("*.log"):
        old.unlink()
    reports: dict = {}
    longest: dict = {}
    if data is None:
        check.record("bench", "skipped", 0, f"no Alpaca data: none of {', '.join(map(str, DATA_CANDIDATES))} exists "
                                            "(carry .gpu-data, or pass --data)")
    else:
        bench = load_bench()
        import datasets
        from transformers.utils import logging as hf_logging

        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
        if args.dry_run:  # 400 records are enough for the tiny workload's 4 steps, and tokenize in a second
            records = json.loads(data.read_text())[:400]
            work.mkdir(parents=True, exist_ok=True)
            data = work / "alpaca_400.json"
            data.write_text(json.dumps(records))
        try:
            reports = part_bench(check, bench, args, found, data, work)
            longest = part_longest(check, bench, args, data, work, reports)
        except Exception as e:  # a bench that breaks is reported, not a correctness failure of the library
            check.record("bench", "failed", 0, f"{type(e).__name__}: {e}")
        logs = check.out / "bench_logs"
        logs.mkdir(exist_ok=True)
        for log in sorted(work.glob("*.log")):
            shutil.copy(log, logs / log.name)
    check.report["failed"] = failed
    check.save()
    text = markdown(check, reports, longest, args.points)
    (check.out / "gpu_check.md").write_text(text)
    print(text, flush=True)
    print(f"gpu-check: {'a GPU test FAILED' if failed else 'no correctness check failed'}; "
          f"{check.report['elapsed_s']:.0f} s; {check.out}/gpu_check.json and gpu_check.md", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
