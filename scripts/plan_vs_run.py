"""The memory plan against whole runs of a real model on this machine's CPU: prints a Markdown table.

    python scripts/plan_vs_run.py MODEL_DIR [--shape 4x256 --shape 8x384 ...] [--data FILE]

MODEL_DIR is SmolLM2-135M-Instruct (`python ../shared/models/smollm2.py DIR` builds it). Each shape is a short
`qlora train` of recipe smollm2-alpaca in its own process (micro batch x seq_len, 2 steps: the first batch is the
longest), which writes the plan's figure (`planned_memory_gb`, the estimated peak of the process: its resident
memory before the weights load, the weights, LoRA and optimizer state, a step's activations, logits and workspace,
and what malloc keeps of them) and the process's measured peak (`peak_memory_gb`, Linux's VmHWM) to summary.json.
The runs inherit this environment: `QLORA_MALLOC=compact python scripts/plan_vs_run.py ...` measures that malloc.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpaca_5000.json"


def measure(model: str, data: str, micro: int, seq_len: int, out: Path) -> dict:
    """One short run at the shape; its summary.json."""
    args = [sys.executable, "-m", "qlora", "train", "recipe=smollm2-alpaca", f"model.name_or_path={model}",
            f"data.path={data}", f"train.micro_batch_size={micro}", f"train.seq_len={seq_len}", "train.max_steps=2",
            "train.eval_every_steps=2", "train.eval_max_sequences=16", "train.sample_prompts=[]",
            "train.samples_from_eval=0", "train.report=false", "train.loggers=[]", "train.progress=false",
            "train.gradient_checkpointing=false", f"output_dir={out}"]
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the SmolLM2-135M-Instruct folder")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--shape", action="append", default=None, help="MICROxSEQ_LEN (default 4x256 and 8x384)")
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in s.split("x")) for s in (args.shape or ["4x256", "8x384"])]
    print("| micro batch x seq_len | planned peak | measured peak (VmHWM) | measured / planned |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="qlora-plan-run-") as tmp:
        for micro, seq_len in shapes:
            summary = measure(args.model, args.data, micro, seq_len, Path(tmp) / f"{micro}x{seq_len}")
            planned, measured = summary["planned_memory_gb"], summary["peak_memory_gb"]
            print(f"| {micro} x {seq_len} | {planned:.2f} GiB | {measured:.2f} GiB | {measured / planned:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
