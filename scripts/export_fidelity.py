"""How each export mode compares with the trained model, right merges and deliberately wrong ones side by side on
one run (the table in docs/export.md).

    python scripts/export_fidelity.py recipe=tiny-alpaca   # train a recipe (here on real Alpaca text), then export
    python scripts/export_fidelity.py --run runs/default/X # use a finished run instead
    python scripts/export_fidelity.py --run RUN --wrong    # ... and the wrong merges too, each in every dtype

Exports the run as: dequantized merges in bfloat16, float16 and float32, original merges in bfloat16 and float32,
GGUF at f16 and q8_0, and (--wrong) merges made wrong in merge.py (the adapter scaled by 0.9, one layer's update
left out, the original weights merged as if dequantized), and prints one Markdown table row per comparison each
export made: its checks and drift, whether it passed, and how long the export took (wall clock, and CPU time, which
a shared machine changes less). Extra export options (e.g. export.probe_samples=8) go after --options; --only
TEXT keeps the exports whose label contains TEXT.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from qlora.composition import compose_command, compose_config
from qlora.config import ExportCommand, MergeMode
from qlora.errors import QloraError
from qlora.export import export, merge

EXPORTS = {
    "dequantized, bfloat16": ["export.dtype=bfloat16"],
    "dequantized, float16": ["export.dtype=float16", "export.compare_original=false"],
    "dequantized, float32": ["export.dtype=float32", "export.compare_original=false"],
    "original, bfloat16": ["export.merge=original", "export.dtype=bfloat16"],
    "original, float32": ["export.merge=original", "export.dtype=float32"],
    "gguf f16": ["export.format=gguf", "export.dtype=float16", "export.compare_original=false"],
    "gguf q8_0": ["export.format=gguf", "export.gguf_type=q8_0", "export.compare_original=false"],
}
DTYPES = ("bfloat16", "float16", "float32")
WRONG = {"adapter x0.9": "scaled", "one layer left out": "left_out", "original base as dequantized": "original_base"}
LEFT_OUT = "model.layers.0.self_attn.k_proj"
"""The layer whose update the left_out merge drops: on the SmolLM2 runs measured, the one that moves the probe least
of the layers tried."""


@contextmanager
def wrong_merge(kind: str, run_dir: Path | str, left_out: str = LEFT_OUT):
    """merge.py made wrong in one way for the duration of the block: `scaled` (every LoRA update times 0.9),
    `left_out` (the update of layer `left_out` dropped), `original_base` (the original checkpoint's weights
    merged where the dequantized ones belong, while the export still claims export.merge=dequantized)."""
    real_merged, real_base = merge._merged, merge._base_weight_fn

    def scaled(lora_module, name, mode, dtype, original):
        base = real_base(lora_module.get_base_layer(), name, mode, torch.float32, original)
        full = real_merged(lora_module, name, mode, torch.float32, original)
        return lambda: (base() + 0.9 * (full() - base())).to(dtype)

    def without_one(lora_module, name, mode, dtype, original):
        if name == left_out:
            return real_base(lora_module.get_base_layer(), name, mode, dtype, original)
        return real_merged(lora_module, name, mode, dtype, original)

    def original_base(layer, name, mode, dtype, original):
        from qlora.runfolder import read_trained

        weights = merge.OriginalWeights(read_trained(str(run_dir)).config.model)
        return real_base(layer, name, MergeMode.original, dtype, weights)

    attribute, replacement = {"scaled": ("_merged", scaled), "left_out": ("_merged", without_one),
                              "original_base": ("_base_weight_fn", original_base)}[kind]
    setattr(merge, attribute, replacement)
    try:
        yield
    finally:
        merge._merged, merge._base_weight_fn = real_merged, real_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished run folder (default: train the default recipe first)")
    parser.add_argument("--wrong", action="store_true", help="also export the wrong merges, in every dtype")
    parser.add_argument("--only", help="only the exports whose label contains this text")
    parser.add_argument("--options", nargs="*", default=[], help="export options added to every export")
    parser.add_argument("overrides", nargs="*", help="config overrides for the training run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    work = Path(tempfile.mkdtemp(prefix="qlora-export-fidelity-"))
    run_dir = Path(args.run) if args.run else _train(work / "run", args.overrides)

    exports = {label: (options, None) for label, options in EXPORTS.items()}
    if args.wrong:
        exports |= {f"{label}, {dtype}": ([f"export.dtype={dtype}", "export.compare_original=false"], kind)
                    for label, kind in WRONG.items() for dtype in DTYPES}
    print("| export | comparison | max abs logit diff | mean KL (nats) | top-1 agreement | perplexity (ref / export) "
          "| verified | export time (wall / CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, (options, kind) in exports.items():
        if args.only and args.only not in label:
            continue
        out = work / label.replace(" ", "_").replace(",", "")
        cmd = compose_command(ExportCommand, [f"run_dir={run_dir}", f"output_dir={out}", *options, *args.options])
        t0, cpu0 = time.perf_counter(), time.process_time()
        with wrong_merge(kind, run_dir) if kind else nullcontext():
            try:
                export(cmd)
                folder, verified = out, "yes"
            except QloraError:
                folder, verified = out.with_name(out.name + ".unverified"), "**no**"
        seconds = f"{time.perf_counter() - t0:.0f} s / {time.process_time() - cpu0:.0f} s"
        v = json.loads((folder / "verification.json").read_text())
        for kind_name, group in (("check", v["checks"]), ("drift", v["drift"])):
            for name, c in group.items():
                print(f"| {label} | {name.replace('_', ' ')} ({kind_name}) | {c['max_abs_logit_diff']:.3g} | "
                      f"{c['mean_kl']:.3g} | {100 * c['top1_agreement']:.1f}% | {c['perplexity_reference']:.3f} / "
                      f"{c['perplexity_candidate']:.3f} | {verified} | {seconds} |", flush=True)
    print(f"\nexports in {work}")


def _train(out: Path, overrides: list[str]) -> Path:
    from qlora.train import run

    config = compose_config([f"output_dir={out}", "train.progress=false", "train.loggers=[]", *overrides])
    result = run(config)
    print(f"trained {out}: eval loss {result.first_eval_loss:.4f} -> {result.final_eval_loss:.4f}\n")
    return out


if __name__ == "__main__":
    main()
