"""Cross-check qlora's DPO against TRL's DPOTrainer: same model, same pairs, same beta, same batch, same optimizer.

What it checks, on SmolLM2-135M-Instruct in float32 on the CPU (qlora quant=none), LoRA r=8 / alpha=16 / dropout 0
on every linear layer, N pairs built from the first short Alpaca records (prompt: qlora's Alpaca prompt; chosen: the
record's output; rejected: the next record's output), all N pairs in the one batch of every step:

  (a) token ids: qlora's encoding of each pair (qlora.data.encode) against TRL's prompt_ids / chosen_ids /
      rejected_ids. They must be identical, or the comparison is invalid (exit 2).
  (b) step 0, before any update: qlora's first metrics row (step 1 is logged with the loss of the batch before its
      update) against TRL's compute_loss on the same batch: loss and rewards within 1e-5, the mean summed
      log-probs within 1e-4 nats per answer token (--logps-tol; exit 1 otherwise). With B = 0 the policy is the
      reference, so loss and rewards are ln 2 / 0 on both sides; the log-probs are what this really compares. Their
      tolerance is per token because the float32 difference is: torch's float32 log_softmax / cross_entropy on the
      CPU (qlora's) comes out about 1.5e-5 nats per token above a float64 one, while TRL's logit - logsumexp matches
      float64 to 1e-6, so the relative difference of a sum is about 1.5e-5 / |mean token log-prob| (2e-5 on short,
      well-predicted answers). Any real encoding or masking error is 0.01 nats per token or more.
  (c) the first K steps: loss, mean chosen log-prob and gradient norm per step, side by side with their relative
      difference ("close" below 1e-3; reported, not fatal). peft draws LoRA A at random on each side, and A decides
      how every later step moves the model, so TRL's A is set to qlora's initial A (from qlora's step-1 checkpoint:
      A gets no gradient while B = 0, so it is still the initial one there); B is 0 on both sides.

Definitions that differ and are not compared: reward accuracy counts a tie as 1/2 in qlora and 0 in TRL (every pair
ties at step 0); TRL's ipo divides the margin by the answer lengths (qlora's does not), so --loss-type takes sigmoid or
hinge only; TRL 1.16's sigmoid ignores label_smoothing (qlora's is conservative DPO), so it stays 0 here.

Run (about 3 minutes per side for the defaults on one CPU thread):

    OMP_NUM_THREADS=1 /tmp/trl/bin/python scripts/trl_crosscheck.py [--pairs 8 --steps 5 --lr 5e-4]

TRL is not a dependency of qlora; install it in a separate environment, with qlora on top (from the repository
root; the constraints keep torch / transformers / peft / datasets at qlora's versions):

    python -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 trl peft -c constraints.txt \\
        && /tmp/trl/bin/pip install -e . --no-deps \\
        && /tmp/trl/bin/pip install bitsandbytes hydra-core gguf tensorboard matplotlib -c constraints.txt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TRL_INSTALL = ("python -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 trl peft -c constraints.txt && "
               "/tmp/trl/bin/pip install -e . --no-deps && /tmp/trl/bin/pip install bitsandbytes hydra-core gguf "
               "tensorboard matplotlib -c constraints.txt")
DEFAULT_MODEL = "~/.cache/qlora/models/smollm2-135m-instruct"
SHARED = Path(__file__).resolve().parents[2] / "shared"
"""What every developer has beside the checkout: the real model's builder and the Alpaca sample."""
DEFAULT_DATA = SHARED / "data" / "alpaca_5000.json"
STEP0_TOL = 1e-5
"""Step 0: absolute tolerance of loss and rewards."""
LOGPS_TOL = 1e-4
"""Step 0: tolerance of the mean summed log-probs, in nats per answer token."""
STEP_TOL = 1e-3
"""Later steps: relative difference called close."""
STEP0_TERMS = [("loss", "loss"), ("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
               ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")]
"""qlora metrics key, TRL metrics key."""

try:
    import trl
except ImportError:
    sys.exit(f"trl is not importable here ({sys.executable}); this check runs in a separate venv: {TRL_INSTALL}")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qlora import data as qdata  # noqa: E402
from qlora.composition import compose_config  # noqa: E402
from qlora.config import Config  # noqa: E402
from qlora.data.formats import resolve_chat_template  # noqa: E402
from qlora.model import load_tokenizer  # noqa: E402
from qlora.train import run  # noqa: E402

# ------------------------------------------------------------------------------------------------- the pairs

def make_pairs(path: Path, count: int, max_chars: int) -> list[dict]:
    """`count` prompt / chosen / rejected records from the first Alpaca records whose output is at most `max_chars`
    long: the record's output is chosen, the next such record's output rejected."""
    short = [r for r in json.loads(path.read_text()) if 0 < len(r["output"]) <= max_chars][:count + 1]
    if len(short) < count + 1:
        sys.exit(f"{path}: fewer than {count + 1} records with an output of at most {max_chars} characters")
    return [{"prompt": qdata.alpaca_prompt(r["instruction"], r.get("input", "")), "chosen": r["output"],
             "rejected": short[i + 1]["output"]} for i, r in enumerate(short[:count])]


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------------- qlora

def qlora_config(args, pairs_file: Path, work: Path) -> Config:
    overrides = [
        f"model.name_or_path={args.model}", "quant=none", "quant.compute_dtype=float32", "optim=adamw",
        "objective=dpo", f"objective.beta={args.beta}", f"objective.loss_type={args.loss_type}",
        f"data.path={pairs_file}", "data.format=preference", "data.eval_fraction=0", "data.group_by_length=false",
        "data.cache=false", "data.overlong=error",
        "lora.r=8", "lora.alpha=16", "lora.dropout=0", "lora.target_modules=[all-linear]",
        f"optim.lr={args.lr}", "optim.schedule=constant", "optim.warmup_steps=0", "optim.weight_decay=0",
        "optim.max_grad_norm=1.0", "optim.betas=[0.9,0.999]", "optim.eps=1e-8",
        f"train.max_steps={args.steps}", f"train.micro_batch_size={args.pairs}", "train.grad_accum_steps=1",
        "train.seq_len=512", "train.log_every_steps=1", "train.eval_every_steps=0", "train.report=false",
        "train.loggers=[]", "train.progress=false", "train.samples_from_eval=0", "train.sample_prompts=[]",
        "train.gradient_checkpointing=false", "train.mixed_precision=no",
        "train.save_every_steps=1", "train.keep_checkpoints=0",  # the step-1 checkpoint holds the initial LoRA A
        f"cache_dir={work / 'cache'}", f"output_dir={work / 'qlora'}", f"seed={args.seed}",
    ]
    return compose_config(overrides)


def qlora_encoding(config: Config) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids of every pair, as qlora's training run encodes them."""
    tokenizer = load_tokenizer(config.model)
    qdata.use_chat_template(config.data, tokenizer)
    source = qdata.read_source(config.data.path, config.data.split)
    examples, stats = qdata.encode(source, config.data, tokenizer, resolve_chat_template(config.data, tokenizer),
                                   config.train.seq_len)
    assert stats.truncated == 0 and stats.skipped == 0, stats
    encoded = []
    for chosen, rejected in qdata.pairs(examples):
        start = int(np.argmax(chosen.labels != qdata.IGNORE_INDEX))
        encoded.append((chosen.input_ids[:start].tolist(), chosen.input_ids[start:].tolist(),
                        rejected.input_ids[start:].tolist()))
    return encoded


def run_qlora(config: Config) -> tuple[list[dict], float]:
    started = time.perf_counter()
    run(config)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], seconds


def initial_lora_a(config: Config) -> dict[str, torch.Tensor]:
    """qlora's initial LoRA A matrices (peft's saved names), read from its step-1 checkpoint."""
    from safetensors.torch import load_file

    folder = next((Path(config.output_dir) / "checkpoints").glob("step-000001"))
    saved = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    return {k: v for k, v in saved.items() if "lora_A" in k}


# ------------------------------------------------------------------------------------------------- TRL

def trl_trainer(args, pairs: list[dict], work: Path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    config = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        beta=args.beta, loss_type=args.loss_type, max_length=512, max_steps=args.steps, logging_steps=1,
        save_strategy="no", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, report_to="none",
        disable_tqdm=True, disable_dropout=True, seed=args.seed, data_seed=args.seed, dataloader_num_workers=0,
        train_sampling_strategy="sequential", dataset_num_proc=None, padding_free=False,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    dataset = Dataset.from_dict({key: [p[key] for p in pairs] for key in ("prompt", "chosen", "rejected")})
    return DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)


def set_lora_a(trainer, lora_a: dict[str, torch.Tensor]) -> bool:
    """Copy qlora's initial A into TRL's adapter (B stays 0); True when peft had drawn the same A anyway."""
    params = {name.replace(".default.", "."): p for name, p in trainer.model.named_parameters() if "lora_" in name}
    a_names = {n for n in params if "lora_A" in n}
    if a_names != set(lora_a):
        sys.exit(f"qlora's and TRL's adapters differ in their LoRA A layers: {sorted(a_names ^ set(lora_a))[:4]}")
    same = all(torch.equal(params[n], lora_a[n]) for n in a_names)
    with torch.no_grad():
        for name, tensor in lora_a.items():
            params[name].copy_(tensor)
    assert all(not p.any() for n, p in params.items() if "lora_B" in n), "TRL's LoRA B does not start at 0"
    return same


def trl_encoding(trainer) -> list[tuple[list[int], list[int], list[int]]]:
    return [(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) for ex in trainer.train_dataset]


def trl_step0(trainer) -> dict[str, float]:
    """TRL's loss and metrics on the whole dataset as one batch (its first training batch), without an update."""
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i]
                                                           for i in range(len(trainer.train_dataset))]))
    trainer.model.train()  # as in training (dropout is disabled)
    trainer._metrics["train"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    return {"loss": loss.item(), **metrics}


def run_trl(trainer) -> tuple[list[dict], float]:
    started = time.perf_counter()
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], time.perf_counter() - started


# ------------------------------------------------------------------------------------------------- comparing

def compare_ids(ours, theirs) -> list[str]:
    """Where qlora's and TRL's token ids of the pairs differ (empty: identical)."""
    problems = []
    if len(ours) != len(theirs):
        return [f"qlora has {len(ours)} pairs, TRL {len(theirs)}"]
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for part, x, y in zip(("prompt", "chosen", "rejected"), a, b, strict=True):
            if list(x) != list(y):
                at = next((k for k, (s, t) in enumerate(zip(x, y, strict=False)) if s != t), min(len(x), len(y)))
                problems.append(f"pair {i} {part}: first difference at token {at} (qlora {list(x)[at:at + 4]}, "
                                f"TRL {list(y)[at:at + 4]}; lengths {len(x)} / {len(y)})")
    return problems


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def step0_table(ours: dict, theirs: dict, answer_tokens: dict[str, float],
                logps_tol: float) -> tuple[list[str], bool]:
    """Step-0 rows and whether all are within tolerance; `answer_tokens`: mean answer length of the logps terms."""
    lines, ok = [f"{'step 0':<16}{'qlora':>14}{'TRL':>14}{'|diff|':>10}{'rel':>10}  tolerance"], True
    for key, trl_key in STEP0_TERMS:
        a, b = ours[key], theirs[trl_key]
        if key in answer_tokens:
            diff, tol, unit = abs(a - b) / answer_tokens[key], logps_tol, "per token"
        else:
            diff, tol, unit = abs(a - b), STEP0_TOL, "abs"
        good = diff <= tol
        ok &= good
        lines.append(f"{key:<16}{a:>14.6f}{b:>14.6f}{abs(a - b):>10.2e}{rel(a, b):>10.2e}  {unit} {diff:.2e} <= "
                     f"{tol:g} {'ok' if good else 'FAIL'}")
    lines.append(f"{'reward_accuracy':<16}{ours['reward_accuracy']:>14.6f}{theirs['rewards/accuracies']:>14.6f}"
                 f"{'':>11}  not compared: qlora counts a tie 1/2, TRL 0")
    return lines, ok


def steps_table(ours: list[dict], theirs: list[dict]) -> tuple[list[str], int]:
    lines = [f"{'step':>4} {'loss qlora':>11} {'loss TRL':>11} {'rel':>8}  {'logps_c qlora':>13} {'logps_c TRL':>12} "
             f"{'rel':>8}  {'|g| qlora':>9} {'|g| TRL':>9} {'rel':>8}"]
    close = 0
    for q, t in zip(ours, theirs, strict=False):
        diffs = [rel(q["loss"], t["loss"]), rel(q["logps_chosen"], t["logps/chosen"]),
                 rel(q["grad_norm"], t["grad_norm"])]
        close += diffs[0] <= STEP_TOL
        lines.append(f"{q['step']:>4} {q['loss']:>11.6f} {t['loss']:>11.6f} {diffs[0]:>8.1e}  "
                     f"{q['logps_chosen']:>13.4f} {t['logps/chosen']:>12.4f} {diffs[1]:>8.1e}  "
                     f"{q['grad_norm']:>9.4f} {t['grad_norm']:>9.4f} {diffs[2]:>8.1e}")
    return lines, close


# ------------------------------------------------------------------------------------------------- main

def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="SmolLM2-135M-Instruct folder (default %(default)s)")
    p.add_argument("--data", default=DEFAULT_DATA, type=Path, help="Alpaca json (default %(default)s)")
    p.add_argument("--pairs", type=int, default=8, help="pairs, all in one batch (default %(default)s)")
    p.add_argument("--max-chars", type=int, default=200, help="longest output used (default %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps compared (default %(default)s)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate, constant (default %(default)s)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (default %(default)s)")
    p.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "hinge"],
                   help="DPO loss; ipo is defined differently in TRL (length-normalised) (default %(default)s)")
    p.add_argument("--logps-tol", type=float, default=LOGPS_TOL,
                   help="step-0 tolerance of the summed log-probs, nats per answer token (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.model = str(Path(args.model).expanduser())
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"no model folder at {args.model}; build it with "
                 f"{sys.executable} {SHARED / 'models' / 'smollm2.py'} {args.model}")
    return args


def main() -> int:
    import peft
    import transformers

    args = parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
          f"peft {peft.__version__}; {args.pairs} pairs, {args.steps} steps, lr {args.lr}, beta {args.beta}, "
          f"loss {args.loss_type}")
    with tempfile.TemporaryDirectory(prefix="trl-crosscheck-") as tmp:
        work = Path(tmp)
        pairs = make_pairs(args.data, args.pairs, args.max_chars)
        config = qlora_config(args, write_jsonl(pairs, work / "pairs.jsonl"), work)
        ours_ids = qlora_encoding(config)
        trainer = trl_trainer(args, pairs, work)
        id_problems = compare_ids(ours_ids, trl_encoding(trainer))
        n_tokens = sum(len(c) + len(r) for _, c, r in ours_ids)
        print(f"(a) token ids of {len(ours_ids)} pairs ({n_tokens} answer tokens incl. EOS): "
              + ("identical" if not id_problems else f"{len(id_problems)} DIFFERENCES"))
        for line in id_problems[:10]:
            print("    " + line)
        if id_problems:
            print("VERDICT: INVALID (the two encodings differ, so their losses do not compare; nothing was trained)")
            return 2

        ours_rows, ours_seconds = run_qlora(config)
        same_a = set_lora_a(trainer, initial_lora_a(config))
        theirs_step0 = trl_step0(trainer)
        theirs_rows, theirs_seconds = run_trl(trainer)

    print(f"    LoRA A: TRL's own draw {'equals' if same_a else 'differs from'} qlora's; qlora's copied into TRL")
    answer_tokens = {"logps_chosen": sum(len(c) for _, c, _ in ours_ids) / len(ours_ids),
                     "logps_rejected": sum(len(r) for _, _, r in ours_ids) / len(ours_ids)}
    lines, step0_ok = step0_table(ours_rows[0], theirs_step0, answer_tokens, args.logps_tol)
    print("(b) " + "\n    ".join(lines))
    lines, close = steps_table(ours_rows, theirs_rows)
    print("(c) per step (loss and metrics of the step's batch before its update; |g| pre-clip gradient norm)\n    "
          + "\n    ".join(lines))
    print(f"wall time: qlora run {ours_seconds:.1f}s, TRL train {theirs_seconds:.1f}s")
    steps = min(len(ours_rows), len(theirs_rows))
    verdict = (f"ids identical; step 0 {'within' if step0_ok else 'OUTSIDE'} tolerance; {close}/{steps} step "
               f"losses within {STEP_TOL:g} relative")
    print(f"VERDICT: {'PASS' if step0_ok and close == steps else 'FAIL' if not step0_ok else 'STEP-0 PASS'} "
          f"({verdict})")
    return 0 if step0_ok else 1


if __name__ == "__main__":
    sys.exit(main())
