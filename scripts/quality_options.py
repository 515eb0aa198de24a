"""What qlora's quality options buy on a real model: lora.init (LoftQ), optim.lora_plus_ratio, train.neftune_alpha
(docs/fidelity.md, "Quality options").

    python scripts/quality_options.py step0                          # held-out loss at step 0, per init (a minute)
    python scripts/quality_options.py finetune --seeds 42 43 44      # the same short run per option and seed
    python scripts/quality_options.py finetune --variants loftq --seeds 42 --out loftq.json

Both parts use recipe=smollm2-alpaca (SmolLM2-135M-Instruct, the 5,000-record Alpaca sample) with its held-out
split (data.eval_fraction=0.02: 100 records), scored by training's own eval loss: mean loss per trained token.

step0: the float base (quant=none), then the nf4-dq base with each supported lora.init, before any training. LoftQ
closes a share of the NF4-vs-float gap: (loss_nf4_default - loss_loftq) / (loss_nf4_default - loss_float).
finetune: `qlora train` for --steps steps at seq_len 256, micro batch 4, per variant and seed; first and final eval
loss of each run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from qlora import data as qdata
from qlora.composition import compose_config
from qlora.evaluation import score
from qlora.lora import attach_lora, init_adapter
from qlora.model import load_base_model, load_tokenizer, prepare_kbit

log = logging.getLogger("quality")

RECIPE = "recipe=smollm2-alpaca"
SHORT = ["train.seq_len=256", "train.micro_batch_size=4", "train.grad_accum_steps=1", "train.eval_max_sequences=100",
         "train.sample_prompts=[]", "train.samples_from_eval=0", "train.save_every_steps=0", "train.report=false",
         "train.loggers=[]", "train.progress=false", "train.gradient_checkpointing=false", "lora.dropout=0.0"]
VARIANTS = {
    "default": [],
    "loftq": ["lora.init=loftq"],
    "gaussian": ["lora.init=gaussian"],
    "lora_plus": ["optim.lora_plus_ratio=16"],
    "neftune": ["train.neftune_alpha=5"],
}
INITS = ["default", "gaussian", "loftq"]


def step0(work: Path, inits: list[str]) -> dict:
    """Held-out loss before training: float base, and nf4-dq with each init (adapter attached, not trained)."""
    rows = {}
    for name, overrides in [("float (quant=none)", ["quant=none"]),
                            *((f"nf4-dq, lora.init={init}", ["quant=nf4-dq", f"lora.init={init}"]) for init in inits)]:
        config = compose_config([RECIPE, *SHORT, f"output_dir={work / 'step0'}", *overrides])
        tokenizer = load_tokenizer(config.model)
        qdata.use_chat_template(config.data, tokenizer)
        data = qdata.load(config.data, tokenizer, seq_len=config.train.seq_len, seed=config.seed,
                          cache_dir=Path(config.cache_dir))
        _, eval_loader = qdata.loaders(data, config.data, micro_batch_size=8, seq_len=config.train.seq_len,
                                       pad_id=tokenizer.pad_token_id, seed=config.seed, num_workers=0)
        torch.manual_seed(config.seed)
        model = load_base_model(config.model, config.quant, torch.device("cpu"))
        t0 = time.perf_counter()
        if config.quant.method.value != "none":
            model = prepare_kbit(model, config.train.float32_embeddings, config.lora.modules_to_save)
            model = attach_lora(model, config.lora)
            init_adapter(model, config.lora, config.model)
        init_seconds = time.perf_counter() - t0
        result = score(model, eval_loader)
        rows[name] = {"eval_loss": result.mean_loss, "tokens": result.tokens, "sequences": result.sequences,
                      "init_seconds": round(init_seconds, 2)}
        log.info("%-28s held-out loss %.4f (%d sequences, %d tokens; init %.1fs)", name, result.mean_loss,
                 result.sequences, result.tokens, init_seconds)
        del model
    float_loss = rows["float (quant=none)"]["eval_loss"]
    nf4 = rows.get("nf4-dq, lora.init=default", {}).get("eval_loss")
    for row in rows.values():
        row["gap_closed"] = (nf4 - row["eval_loss"]) / (nf4 - float_loss) if nf4 not in (None, float_loss) else None
    return rows


def finetune(work: Path, variants: list[str], seeds: list[int], steps: int, eval_sequences: int) -> dict:
    from qlora.train import run

    rows = {}
    for seed in seeds:  # seed-major: a stopped sweep still compares the variants
        for variant in variants:
            out = work / variant / str(seed)
            config = compose_config([RECIPE, *SHORT, f"output_dir={out}", f"seed={seed}", f"train.max_steps={steps}",
                                     f"train.eval_every_steps={steps}",
                                     f"train.eval_max_sequences={eval_sequences}", *VARIANTS[variant]])
            t0 = time.perf_counter()
            result = run(config)
            rows.setdefault(variant, []).append({
                "seed": seed, "first_eval_loss": result.first_eval_loss, "final_eval_loss": result.final_eval_loss,
                "seconds": round(time.perf_counter() - t0, 1)})
            log.info("%s seed %d: eval loss %.4f -> %.4f", variant, seed, result.first_eval_loss,
                     result.final_eval_loss)
            del result
    return rows


def tables(results: dict) -> str:
    lines = []
    if "step0" in results:
        lines += ["| base and init | held-out loss | perplexity | NF4 gap closed |", "|---|---|---|---|"]
        for name, row in results["step0"].items():
            closed = "" if row["gap_closed"] is None else f"{100 * row['gap_closed']:.1f}%"
            lines.append(f"| {name} | {row['eval_loss']:.4f} | {math.exp(row['eval_loss']):.3f} | {closed} |")
        lines.append("")
    if "finetune" in results:
        lines += ["| variant | seeds | step-0 loss | final loss (mean) | final loss per seed |",
                  "|---|---|---|---|---|"]
        for variant, runs in results["finetune"].items():
            finals = [r["final_eval_loss"] for r in runs]
            first = sum(r["first_eval_loss"] for r in runs) / len(runs)
            lines.append(f"| {variant} | {len(runs)} | {first:.4f} | {sum(finals) / len(finals):.4f} | "
                         f"{', '.join(f'{f:.4f}' for f in finals)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["step0", "finetune"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--inits", nargs="+", choices=INITS, default=INITS, help="step0: the inits scored")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-sequences", type=int, default=48,
                        help="finetune: held-out sequences scored at step 0 and at the end (the first of the 100)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("qlora").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="qlora-quality-"))
    results = {"step0": step0(work, args.inits)} if args.part == "step0" else \
        {"finetune": finetune(work, args.variants, args.seeds, args.steps, args.eval_sequences), "steps": args.steps}
    print(tables(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
