"""The QLoRA paper's fidelity claims, reproduced in miniature with this framework (docs/fidelity.md).

    python scripts/fidelity.py                      # CPU-sized (12 minutes on 2 cores, 5 of them pretraining)
    python scripts/fidelity.py --size gpu           # GPU-sized
    python scripts/fidelity.py --size tiny          # seconds; what the tests run
    python scripts/fidelity.py --seeds 1 2 3 --out fidelity.json

0. A base worth quantizing: a small Llama with its own byte-level BPE tokenizer, pretrained in full (plain AdamW)
   on the raw text of Alpaca records, so its weights have the shape trained weights have. Cached under
   CACHE_DIR/fidelity/, keyed on the size, the data and the seed.
1. Quantization error: the pretrained model loaded as nf4, nf4-dq, fp4, fp4-dq and int8 through qlora's own
   loading; mean squared error of the weights the layers compute with against the originals, and the
   perplexity of the un-fine-tuned model on held-out text (paper: NF4 < FP4 < Int4; DQ costs nothing).
2. Storage: bits per quantized parameter, measured from the tensors (paper: 4.5 for NF4, 4.127 with DQ).
3. Fine-tuning parity: the same LoRA recipe on Alpaca instruction data with quant=none and each 4-/8-bit base,
   scored by `qlora eval`'s code on held-out records (paper: NF4+DQ matches 16-bit LoRA; target within 2%).

Records: the last `eval_records` are held out from everything; of the rest, the first 60% are the pretraining
text and the others the fine-tuning data. Prints Markdown tables; --out also writes everything as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qlora import data as qdata
from qlora.composition import compose_config
from qlora.config import DataConfig, DataFormat, ModelConfig, ScratchModelConfig, ScratchTokenizer
from qlora.config.assets import quant_option
from qlora.demo import ensure_scratch_model
from qlora.device import default_device
from qlora.evaluation import batches, score
from qlora.export.merge import dequantized_weight
from qlora.model import load_base_model, quant_report

log = logging.getLogger("fidelity")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_5000.json"
QUANT_ERROR_MODES = ["none", "nf4", "nf4-dq", "fp4", "fp4-dq", "int8"]
FINETUNE_MODES = ["none", "nf4-dq", "nf4", "fp4", "int8"]
PAPER = {  # Dettmers et al. 2023: Table 2 (Pile Common Crawl perplexity, mean over 125M-13B models), Sec. 3
    "perplexity": {"int4": 34.34, "fp4": "29.48-31.07", "nf4-dq": 27.41},
    "bits": {"nf4": 4.5, "nf4-dq": 4.127},
    "mmlu": {"bf16": 53.0, "nf4-dq": 53.1},
}


@dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq_len: int
    records: int
    """Alpaca records used (the first ones of the file)."""
    eval_records: int
    """Held out from pretraining and fine-tuning; fine-tuning's eval set and the quantization-error text."""
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float


SIZES = {
    "tiny": Size(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1, vocab=512, seq_len=128, records=300,
                 eval_records=20, pretrain_steps=30, pretrain_batch=8, pretrain_lr=3e-3, finetune_steps=8,
                 finetune_batch=4, finetune_lr=2e-3),
    "cpu": Size(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=2, vocab=4096, seq_len=256, records=5000,
                eval_records=200, pretrain_steps=300, pretrain_batch=16, pretrain_lr=2e-3, finetune_steps=150,
                finetune_batch=8, finetune_lr=1e-3),
    "gpu": Size(hidden=1024, intermediate=2816, layers=12, heads=16, kv_heads=4, vocab=8192, seq_len=512,
                records=5000, eval_records=200, pretrain_steps=1500, pretrain_batch=32, pretrain_lr=6e-4,
                finetune_steps=300, finetune_batch=16, finetune_lr=3e-4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="fine-tuning seeds (default 42)")
    parser.add_argument("--data", type=Path, default=DATA, help="Alpaca-layout JSON (default ../shared/data/...)")
    parser.add_argument("--cache", type=Path, help="where the pretrained base is kept (default CACHE_DIR/fidelity)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")  # int8 on a float32 CPU
    for noisy in ("qlora", "bitsandbytes", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    size = SIZES[args.size]
    device = default_device()
    cache = (args.cache or Path(compose_config([]).cache_dir).expanduser() / "fidelity")

    started = time.perf_counter()
    base, files = pretrained_base(args.data, size, cache, device)
    quant_error = quantization_error(base, files, size, device)
    storage = {mode: quant_error[mode]["bits_per_quantized_param"] for mode in QUANT_ERROR_MODES if mode != "none"}
    finetuned = finetune_parity(base, files, size, args.seeds, cache)
    results = {"size": args.size, "shape": asdict(size),
               "seeds": args.seeds, "base": str(base), "device": _device_name(device), "versions": _versions(),
               "seconds": round(time.perf_counter() - started), "quantization_error": quant_error,
               "storage_bits": storage, "finetune": finetuned, "paper": PAPER}
    print(tables(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        log.info("wrote %s", args.out)


# 0. The base ------------------------------------------------------------------------------------------------------

def pretrained_base(data: Path, size: Size, cache: Path, device: torch.device) -> tuple[Path, dict[str, Path]]:
    """The pretrained model folder and the data files derived from `data`, built once per (data, size, seed)."""
    if not data.is_file():
        raise SystemExit(f"fidelity: {data} does not exist; pass --data with an Alpaca-layout JSON file")
    pretrain_keys = {k: v for k, v in asdict(size).items() if not k.startswith("finetune")}
    key = hashlib.sha256(data.read_bytes() + json.dumps(pretrain_keys, sort_keys=True).encode()).hexdigest()[:12]
    root = cache / key
    files = _write_data(data, size, root / "data")
    model_dir = root / "pretrained"
    if (model_dir / "config.json").is_file():
        log.info("pretrained base: %s (cached)", model_dir)
        return model_dir, files

    shape = ScratchModelConfig(
        path=str(root / "init"), tokenizer=ScratchTokenizer.bpe, tokenizer_corpus=str(files["pretrain"]),
        tokenizer_vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.seq_len)
    ensure_scratch_model(root / "init", shape)
    pretrain(root / "init", files["pretrain"], size, device, model_dir)
    return model_dir, files


def _write_data(data: Path, size: Size, folder: Path) -> dict[str, Path]:
    records = json.loads(data.read_text())[:size.records]
    held_out = records[-size.eval_records:]
    rest = records[:-size.eval_records]
    cut = int(0.6 * len(rest))

    def text(r: dict) -> str:
        return "\n".join(part for part in (r["instruction"], r["input"], r["output"]) if part)

    folder.mkdir(parents=True, exist_ok=True)
    files = {"pretrain": folder / "pretrain.jsonl", "heldout_text": folder / "heldout_text.jsonl",
             "finetune": folder / "finetune.json", "finetune_eval": folder / "finetune_eval.json"}
    contents = {"pretrain": "".join(json.dumps({"text": text(r)}) + "\n" for r in rest[:cut]),
                "heldout_text": "".join(json.dumps({"text": text(r)}) + "\n" for r in held_out),
                "finetune": json.dumps(rest[cut:]), "finetune_eval": json.dumps(held_out)}
    for name, path in files.items():
        if not path.is_file() or path.read_text() != contents[name]:
            path.write_text(contents[name])
    return files


def pretrain(init: Path, corpus: Path, size: Size, device: torch.device, out: Path) -> None:
    """Full-parameter next-token training of the random-init model on the corpus, as one stream of seq_len windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(init)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    stream = [t for ids in tokenizer(texts)["input_ids"] for t in ids + [tokenizer.eos_token_id]]
    windows = torch.tensor(stream[:len(stream) // size.seq_len * size.seq_len]).view(-1, size.seq_len)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, size.pretrain_steps // 20)

    def lr_at(step: int) -> float:  # linear warmup, cosine to a tenth
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, size.pretrain_steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(0)
    order: list[int] = []
    log.info("pretraining %s: %d windows of %d tokens (%.1f epochs)", init.name, len(windows), size.seq_len,
             size.pretrain_steps * size.pretrain_batch / len(windows))
    t0, losses = time.perf_counter(), []
    autocast = device.type == "cuda"
    for step in range(size.pretrain_steps):
        if len(order) < size.pretrain_batch:
            order += torch.randperm(len(windows), generator=generator).tolist()
        batch = windows[order[:size.pretrain_batch]].to(device)
        order = order[size.pretrain_batch:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, size.pretrain_steps // 10) == 0:
            log.info("  step %d/%d: loss %.3f (%.0fs)", step + 1, size.pretrain_steps,
                     sum(losses[-10:]) / len(losses[-10:]), time.perf_counter() - t0)
    staging = Path(tempfile.mkdtemp(prefix=".pretrained.", dir=out.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "pretrain.json").write_text(json.dumps({"steps": size.pretrain_steps, "losses": losses}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)


# 1-2. Quantization error and storage --------------------------------------------------------------------------------

def quantization_error(base: Path, files: dict[str, Path], size: Size, device: torch.device) -> dict[str, dict]:
    """Per quant mode: weight MSE against the unquantized weights, bits per quantized parameter, and the
    un-fine-tuned model's perplexity on the held-out text."""
    from qlora.model import load_tokenizer

    model_cfg = ModelConfig(name_or_path=str(base))
    tokenizer = load_tokenizer(model_cfg)
    text = DataConfig(path=str(files["heldout_text"]), format=DataFormat.text, eval_fraction=0.0, cache=False)
    examples = qdata.load(text, tokenizer, seq_len=size.seq_len, seed=0, cache_dir=None).train
    reference: dict[str, torch.Tensor] = {}
    rows = {}
    for mode in QUANT_ERROR_MODES:
        model = load_base_model(model_cfg, quant_option(mode), device)
        weights = {name: dequantized_weight(m).float().cpu() for name, m in _linear_layers(model)}
        if mode == "none":
            reference = weights
        squared = sum(float(((w - reference[n]) ** 2).sum()) for n, w in weights.items())
        power = sum(float((w ** 2).sum()) for w in reference.values())
        count = sum(w.numel() for w in reference.values())
        s = score(model, batches(examples, 8, tokenizer.pad_token_id))
        report = quant_report(model)
        rows[mode] = {"weight_mse": squared / count, "relative_error": squared / power,
                      "bits_per_quantized_param": report.bits_per_quantized_param,
                      "quantized_params": report.quantized_params, "mean_loss": s.mean_loss,
                      "perplexity": s.perplexity, "tokens": s.tokens}
        log.info("%-7s weight MSE %.3e, perplexity %.3f", mode, rows[mode]["weight_mse"], s.perplexity)
        del model
    return rows


def _linear_layers(model):
    """The layers QLoRA quantizes: every linear layer of the decoder blocks (not the output head)."""
    for name, module in model.named_modules():
        if ".layers." in f".{name}" and isinstance(module, torch.nn.Linear):  # bitsandbytes' layers are Linears
            yield name, module


# 3. Fine-tuning parity ------------------------------------------------------------------------------------------------

def finetune_parity(base: Path, files: dict[str, Path], size: Size, seeds: list[int], cache: Path) -> dict[str, dict]:
    """The same LoRA run on each quantization of the base; eval loss on the held-out records, per seed."""
    from qlora.train import run

    work = Path(tempfile.mkdtemp(prefix="qlora-fidelity-"))
    rows: dict[str, dict] = {}
    for mode in FINETUNE_MODES:
        losses, firsts, seconds = [], [], []
        for seed in seeds:
            config = compose_config([
                f"cache_dir={cache}", f"output_dir={work / mode / str(seed)}", f"seed={seed}",
                f"model.name_or_path={base}", "model.scratch=null", f"quant={mode}",
                f"data.path={files['finetune']}", f"data.eval_path={files['finetune_eval']}", "data.format=alpaca",
                "data.on_invalid=skip", "data.generate_demo=false", "data.packing=true",
                f"optim.lr={size.finetune_lr}", f"optim.warmup_steps={max(1, size.finetune_steps // 10)}",
                "optim.min_8bit_size=1024", f"train.max_steps={size.finetune_steps}",
                f"train.micro_batch_size={size.finetune_batch}", "train.grad_accum_steps=1",
                f"train.seq_len={size.seq_len}", f"train.eval_every_steps={size.finetune_steps}",
                "train.eval_max_sequences=100000", "train.gradient_checkpointing=false", "train.save_every_steps=0",
                "train.sample_prompts=[]", "train.progress=false", "train.loggers=[]",
            ])
            t0 = time.perf_counter()
            result = run(config)
            seconds.append(time.perf_counter() - t0)
            losses.append(result.final_eval_loss)
            firsts.append(result.first_eval_loss)
            del result
        mean = sum(losses) / len(losses)
        rows[mode] = {"eval_loss": losses, "mean_eval_loss": mean, "perplexity": math.exp(mean),
                      "eval_loss_before": firsts, "seconds": [round(s, 1) for s in seconds]}
        log.info("%-7s eval loss %.4f -> %.4f (perplexity %.3f)", mode, sum(firsts) / len(firsts), mean,
                 math.exp(mean))
    reference = rows["none"]["mean_eval_loss"]
    for row in rows.values():
        row["vs_16bit"] = row["mean_eval_loss"] / reference - 1
    shutil.rmtree(work, ignore_errors=True)
    return rows


# Report ---------------------------------------------------------------------------------------------------------------

def tables(r: dict) -> str:
    q, f = r["quantization_error"], r["finetune"]
    lines = [f"Base: {r['shape']['layers']}-layer Llama, hidden {r['shape']['hidden']}, pretrained in full "
             f"({r['size']} size) on {r['device']}; {r['seconds']} s.", "",
             "| quant | weight MSE | relative error | bits / quantized param | held-out perplexity | vs unquantized |",
             "|---|---|---|---|---|---|"]
    for mode, row in q.items():
        bits = f"{row['bits_per_quantized_param']:.3f}" if mode != "none" else "(32 or 16)"
        lines.append(f"| {mode} | {row['weight_mse']:.3e} | {row['relative_error']:.2e} | {bits} | "
                     f"{row['perplexity']:.3f} | {row['perplexity'] / q['none']['perplexity'] - 1:+.2%} |")
    seeds = ", ".join(map(str, r["seeds"]))
    lines += ["", f"| fine-tuned base | eval loss before | eval loss after (seeds {seeds}) | perplexity | "
              "vs unquantized LoRA |", "|---|---|---|---|---|"]
    for mode, row in f.items():
        losses = " / ".join(f"{x:.4f}" for x in row["eval_loss"])
        before = sum(row["eval_loss_before"]) / len(row["eval_loss_before"])
        lines.append(f"| {mode} | {before:.4f} | {losses} | {row['perplexity']:.3f} | {row['vs_16bit']:+.2%} |")
    return "\n".join(lines)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def _versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


if __name__ == "__main__":
    main()
