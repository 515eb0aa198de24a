"""How faithfully each export mode reproduces the trained model, side by side on one run (docs/export.md).

    python scripts/export_fidelity.py recipe=tiny-alpaca   # train a recipe (here on real Alpaca text), then export
    python scripts/export_fidelity.py --run runs/default/X # use a finished run instead

Exports the run as: dequantized and original merges in bfloat16 and float32, and GGUF at f16 and q8_0, and prints
one Markdown table row per comparison each export made (against the trained model: quantized base + adapter).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from qlora.composition import compose_command, compose_config
from qlora.config import ExportCommand
from qlora.export import export

EXPORTS = {
    "dequantized, bfloat16": ["export.dtype=bfloat16"],
    "dequantized, float32": ["export.dtype=float32", "export.compare_original=false"],
    "original, bfloat16": ["export.merge=original", "export.dtype=bfloat16", "export.compare_original=false"],
    "original, float32": ["export.merge=original", "export.dtype=float32", "export.compare_original=false"],
    "gguf f16 (dequantized)": ["export.format=gguf", "export.dtype=float16", "export.compare_original=false"],
    "gguf q8_0 (dequantized)": ["export.format=gguf", "export.gguf_type=q8_0", "export.compare_original=false"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished run folder (default: train the default recipe first)")
    parser.add_argument("overrides", nargs="*", help="config overrides for the training run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    work = Path(tempfile.mkdtemp(prefix="qlora-export-fidelity-"))
    run_dir = Path(args.run) if args.run else _train(work / "run", args.overrides)

    print("| export | comparison | max abs logit diff | mean KL (nats) | top-1 agreement | perplexity (ref / export) |")
    print("|---|---|---|---|---|---|")
    for label, options in EXPORTS.items():
        cmd = compose_command(ExportCommand, [f"run_dir={run_dir}", f"output_dir={work / label.replace(' ', '_')}",
                                              *options])
        v = export(cmd).verification
        for kind, group in (("check", v.checks), ("drift", v.drift)):
            for name, c in group.items():
                print(f"| {label} | {name.replace('_', ' ')} ({kind}) | {c.max_abs_logit_diff:.3g} | {c.mean_kl:.3g} | "
                      f"{100 * c.top1_agreement:.1f}% | {c.perplexity_reference:.3f} / {c.perplexity_candidate:.3f} |")
    print(f"\nexports in {work}")


def _train(out: Path, overrides: list[str]) -> Path:
    from qlora.train import run

    config = compose_config([f"output_dir={out}", "train.progress=false", "train.loggers=[]", *overrides])
    result = run(config)
    print(f"trained {out}: eval loss {result.first_eval_loss:.4f} -> {result.final_eval_loss:.4f}\n")
    return out


if __name__ == "__main__":
    main()
