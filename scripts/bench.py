"""Side by side: this framework ("qlora") against the standard Hugging Face QLoRA stack ("baseline"), on the
same model, data, hyperparameters and device. Prints a Markdown table of qlora / baseline ratios.

    python scripts/bench.py --workload cpu --json bench_cpu.json     # 20 minutes on 2 CPU cores
    python scripts/bench.py --workload gpu --micro-batch 8 --longest --json bench_gpu.json
    python scripts/bench.py --workload tiny                          # seconds; what the tests run
    python scripts/bench.py --qlora train.gradient_checkpointing=true  # a qlora setting against the same baseline

The two sides:

  qlora     the framework as a user runs it: `compose_config(overrides)`, then `qlora.train.run(config)`. Its data
            is packed (data.packing=true): rows of up to seq_len tokens holding several samples each. Its gradient
            checkpointing is its default, auto: layers are recomputed only as far as the memory plan says the
            device needs (`--qlora train.gradient_checkpointing=true` recomputes every layer, as the baseline does).
  baseline  what artidoro/qlora and most tutorials do: `AutoModelForCausalLM.from_pretrained` with a
            `BitsAndBytesConfig` (nf4, double quant), `peft.prepare_model_for_kbit_training`, `peft.get_peft_model`,
            and a transformers `Trainer` (paged_adamw_8bit, activation checkpointing, length-grouped sampling,
            `DataCollatorForSeq2Seq` padding each batch to its longest sample, no eval, no saving).

Both train one random-init Llama-architecture model, built once per invocation and saved (safetensors) with a
byte-level BPE tokenizer trained on the data; both train on the same token sequences (the Alpaca records tokenized
once by qlora's data pipeline, handed to the baseline as a `datasets.Dataset`); the baseline's learning rate,
schedule, optimizer, clipping, LoRA and batch settings are read from qlora's composed config, so they cannot
drift apart. Runs alternate (qlora, baseline, qlora, baseline, ...), each in a process of its own, so a change in
the machine's speed hits both sides and peak memory is each side's own.

Figures, defined identically for both sides:

  tokens/s            non-padding tokens trained per second of wall time, over the steps after the first
                      `warmup_steps` (each step's window runs from the end of the previous step to the end of
                      this one, so it includes fetching and collating the batch); also the 90th percentile of the
                      steps' own rates, which other jobs on a shared machine disturb least
  peak memory         torch.cuda.max_memory_allocated on a GPU; the process's peak resident set on a CPU (VmHWM,
                      not ru_maxrss: see `qlora.memory.peak_bytes`); on a GPU also torch.cuda.max_memory_reserved
                      (what the caching allocator held: the figure another process on the card sees taken)
  memory plan         (qlora) the peak qlora's memory plan estimated before loading (summary.json's
                      planned_memory_gb), beside the measured peak
  time to first step  wall time from the start of the side's work (after `import torch`, which both share) until
                      the quantized base is loaded with LoRA attached: the stack's own imports, reading the
                      config, tokenizer and tokenized data, loading and quantizing the weights, k-bit preparation
  time to training    the same start until the first training step starts: also what each side does between
                      attaching LoRA and training (qlora's packed-attention check, the Trainer's set-up)
  bits / base bytes   `qlora.model.quant_report` of each side's base as loaded: packed 4-bit weights + absmax +
                      nested absmax + offset, per quantized parameter; and the whole base's bytes
  MFU                 (GPU) tokens/s x model FLOPs per token / the device's peak dense bf16 FLOP/s (see
                      `flops_per_token`)

--longest finds, for each side, the longest seq_len that trains at micro batch 1 before running out of memory
(doubling, then bisecting to --granularity tokens; each probe is a process running two steps on sequences of
exactly that length).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "alpaca_5000.json"
SIDES = ("qlora", "baseline")

PEAK_FLOPS = {
    # Dense bf16 tensor-core FLOP/s from the vendor's data sheets (no sparsity), by torch.cuda.get_device_name().
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L40S": 362e12,
}


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture model built with random weights (the speed and memory of training do not depend on
    the weights' values)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tokenizer_vocab_size: int
    """Vocabulary of the byte-level BPE trained on the data."""
    vocab_size: int | None = None
    """Embedding rows; None: the tokenizer's. Larger than the tokenizer's to give the model a real vocabulary's
    embedding and output-head cost (rows past the tokenizer's are never looked up)."""
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class Workload:
    """What both sides train, and how often each is measured."""

    shape: Shape | None
    """The random-init model to build; None: a pretrained model folder given with --model."""
    seq_len: int
    micro_batch_size: int
    max_steps: int
    warmup_steps: int
    """Steps left out of tokens/s (allocator growth, first-call kernel selection, the longest batch first)."""
    repeats: int
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lr: float = 2e-4
    max_seq_len: int = 2048
    """Upper end of the --longest search."""


WORKLOADS = {
    "tiny": Workload(Shape(64, 128, 2, 4, 2, tokenizer_vocab_size=512, max_position_embeddings=1024),
                     seq_len=128, micro_batch_size=2, max_steps=4, warmup_steps=1, repeats=1, max_seq_len=512),
    "cpu": Workload(Shape(512, 1376, 8, 8, 8, tokenizer_vocab_size=8192, max_position_embeddings=8192),
                    seq_len=512, micro_batch_size=4, max_steps=30, warmup_steps=5, repeats=2, max_seq_len=2048),
    # Llama 3.1 8B's architecture (8.03e9 parameters); the tokenizer is a small BPE, the embedding has 128,256 rows.
    # The adapter is the QLoRA paper's (lora=paper), as in recipes/llama3.1-8b-alpaca.yaml.
    "gpu": Workload(Shape(4096, 14336, 32, 32, 8, tokenizer_vocab_size=8192, vocab_size=128256,
                          max_position_embeddings=131072, rope_theta=500000.0),
                    seq_len=2048, micro_batch_size=8, max_steps=20, warmup_steps=5, repeats=2,
                    lora_r=64, lora_alpha=16.0, lora_dropout=0.1, max_seq_len=131072),
    # A real pretrained model (--model DIR: SmolLM2-135M-Instruct from ../shared/models/smollm2.py) on the CPU: its
    # own 49,152-token tokenizer, tied embeddings, 30 layers.
    "smollm2": Workload(None, seq_len=512, micro_batch_size=4, max_steps=16, warmup_steps=3, repeats=2,
                        max_seq_len=8192),
}


# The arithmetic: pure functions, tested without a GPU.


def llama_config(shape: Shape, vocab_size: int, **special_tokens):  # -> transformers.LlamaConfig
    """The transformers config of `shape`, with `vocab_size` embedding rows (shape.vocab_size wins when set)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab_size or vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        tie_word_embeddings=False,
        **special_tokens,
    )


def flops_per_token(arch, seq_len: int) -> float:
    """Model FLOPs per trained token on the frozen-base basis, for MFU.

    With N the weights of every linear layer (the decoder's projections and the output head; the embedding is a
    lookup, not a matmul), L layers, H query heads of width d and sequence length S:

        forward 2N + 2*L*H*d*S   (the matmuls, then QK^T and AV over a causal window of S/2 keys on average)
        backward 2N + 4*L*H*d*S  (activation gradients only: the base is frozen; both operands of QK^T and AV)

    so 4N + 6*L*H*d*S in all. LoRA's own FLOPs and gradient checkpointing's recomputed forward are left out
    (model FLOPs, not hardware FLOPs), and S is the nominal seq_len for both sides. This is
    `qlora.plan.flops_per_token` without the recompute.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from qlora.config import Config, TrainConfig
    from qlora.plan import flops_per_token as plan_flops

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch)
    return plan_flops(arch, model, Config(train=TrainConfig(seq_len=seq_len)))


def mfu(tokens_per_s: float, flops: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the share of the device's peak that `flops` per token at `tokens_per_s` is."""
    return tokens_per_s * flops / peak_flops


def peak_flops_of(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its CUDA name (the longest PEAK_FLOPS key it starts with); None: unknown."""
    known = [k for k in PEAK_FLOPS if device_name.startswith(k)]
    return PEAK_FLOPS[max(known, key=len)] if known else None


@dataclass
class Longest:
    """The outcome of a longest-sequence search."""

    seq_len: int
    """The longest length that fitted (0: not even the first probe did)."""
    capped: bool
    """The search stopped at its upper end: the true limit may be higher."""
    probes: list[tuple[int, bool]] = field(default_factory=list)
    """Every length tried, in order, and whether it fitted."""


def longest_fitting(fits: Callable[[int], bool], start: int, cap: int, granularity: int) -> Longest:
    """The largest length in [start, cap], to within `granularity`, for which `fits` holds.

    Doubles from `start` until a length fails (or `cap` fits), then bisects between the last fit and the first
    failure, trying multiples of `granularity` only. `fits` must be monotone (true up to some length, false after).
    """
    probes: list[tuple[int, bool]] = []

    def probe(n: int) -> bool:
        ok = fits(n)
        probes.append((n, ok))
        return ok

    if not probe(start):
        return Longest(0, False, probes)
    good, bad = start, None
    while bad is None:
        if good >= cap:
            return Longest(good, True, probes)
        n = min(2 * good, cap)
        if probe(n):
            good = n
        else:
            bad = n
    while True:
        mid = (good + bad) // 2 // granularity * granularity
        if mid <= good:
            return Longest(good, False, probes)
        if probe(mid):
            good = mid
        else:
            bad = mid


def coarse_longest(fits: Callable[[str, int], bool], points: list[int], sides: tuple[str, ...] = SIDES,
                   found: dict[str, Longest] | None = None) -> dict[str, Longest]:
    """Each side's longest of a few `points` (ascending, tried in turn, both sides at each point before the next)
    for which `fits(side, n)` holds; a side drops out at its first failure. `found` (filled in as probes end, so
    a caller stopped part way keeps what was measured) is returned."""
    found = {} if found is None else found
    for side in sides:
        found[side] = Longest(0, False)
    for n in sorted(points):
        for side in sides:
            mine = found[side]
            if mine.probes and not mine.probes[-1][1]:
                continue
            ok = fits(side, n)
            mine.probes.append((n, ok))
            if ok:
                mine.seq_len = n
            mine.capped = ok and n == max(points)
    return found


def steady_rate(tokens: list[int], seconds: list[float], warmup_steps: int) -> float:
    """Tokens per second over the steps after the first `warmup_steps` (one entry per step, in order)."""
    if len(tokens) != len(seconds) or len(tokens) <= warmup_steps:
        raise ValueError(f"{len(tokens)} steps measured; more than the {warmup_steps} warm-up steps are needed")
    return sum(tokens[warmup_steps:]) / sum(seconds[warmup_steps:])


def least_disturbed_rate(tokens: list[int], seconds: list[float], warmup_steps: int) -> float:
    """The 90th percentile of the per-step tokens/s after the warm-up: the speed of the steps that other work on the
    machine disturbed least (interference only ever slows a step down, as `timeit` reasons for taking the minimum)."""
    rates = [n / t for n, t in zip(tokens[warmup_steps:], seconds[warmup_steps:], strict=True)]
    return statistics.quantiles(rates, n=10, method="inclusive")[-1] if len(rates) > 1 else rates[0]


def summarize(runs: dict[str, list[dict]], figures: list[str]) -> tuple[dict, dict]:
    """Each side's median of every figure, and qlora / baseline of the medians."""
    medians = {side: {f: statistics.median(r[f] for r in side_runs) for f in figures
                      if all(r.get(f) is not None for r in side_runs)}
               for side, side_runs in runs.items()}
    ratios = {f: medians["qlora"][f] / medians["baseline"][f]
              for f in medians["qlora"] if f in medians["baseline"] and medians["baseline"][f]}
    return medians, ratios


# Setting up: the model folder, the data, each side's settings.


def build_model_folder(folder: Path, shape: Shape, corpus: Path, device: str) -> None:
    """A random-init model of `shape` with a BPE tokenizer trained on `corpus`, saved at `folder` (reused when an
    earlier invocation built the same shape there).

    The weights are created on `device` in bf16 there (fp32 on a CPU), so an 8B model takes seconds, not the
    minutes of a CPU initialisation.
    """
    marker = folder / "bench_shape.json"
    wanted = {**asdict(shape), "corpus": str(corpus)}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return
    import torch
    from transformers import AutoModelForCausalLM

    from qlora.demo import build_bpe_tokenizer

    tokenizer = build_bpe_tokenizer(str(corpus), shape.tokenizer_vocab_size)
    config = llama_config(shape, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps(wanted))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def qlora_overrides(workload: Workload, model_dir: Path, data: Path, work: Path, output_dir: Path,
                    extra: tuple[str, ...] = ()) -> list[str]:
    """The qlora config of a measured run: the schema's QLoRA defaults (nf4-dq, paged_adamw_8bit, LoRA on all
    linear layers, gradient_checkpointing=auto, packing), the workload's sizes, and nothing logged but
    metrics.jsonl; then `extra` (--qlora)."""
    return [
        f"model.name_or_path={model_dir}", "model.scratch=null",
        "data=alpaca-5000", f"data.path={data}", "data.packing=true",
        "quant=nf4-dq", "optim=paged_adamw_8bit", "lora=default",
        f"lora.r={workload.lora_r}", f"lora.alpha={workload.lora_alpha}", f"lora.dropout={workload.lora_dropout}",
        f"optim.lr={workload.lr}", "optim.warmup_steps=0", "optim.schedule=constant",
        "optim.min_8bit_size=4096",  # bitsandbytes' default, which the Trainer's paged_adamw_8bit uses
        f"train.max_steps={workload.max_steps}", f"train.micro_batch_size={workload.micro_batch_size}",
        "train.grad_accum_steps=1", f"train.seq_len={workload.seq_len}",
        "train.log_every_steps=1", "train.eval_every_steps=0", "train.save_every_steps=0", "train.sample_prompts=[]",
        "train.samples_from_eval=0",
        "train.loggers=[]", "train.progress=false", "train.report=false",
        f"cache_dir={work}", f"output_dir={output_dir}", *extra,
    ]


def baseline_settings(config) -> dict:
    """The hyperparameters the baseline trains with, read from qlora's composed `config` (a qlora.config.Config);
    its activation checkpointing is the standard stack's, on every layer, whatever qlora's is."""
    targets = list(config.lora.target_modules)
    return {
        "lr": config.optim.lr, "schedule": config.optim.schedule.value, "warmup_steps": config.optim.warmup_steps,
        "weight_decay": config.optim.weight_decay, "betas": list(config.optim.betas), "eps": config.optim.eps,
        "max_grad_norm": config.optim.max_grad_norm, "optimizer": config.optim.name.value,
        "max_steps": config.train.max_steps, "micro_batch_size": config.train.micro_batch_size,
        "grad_accum_steps": config.train.grad_accum_steps, "seq_len": config.train.seq_len,
        "gradient_checkpointing": True, "seed": config.seed,
        "lora_r": config.lora.r, "lora_alpha": config.lora.alpha, "lora_dropout": config.lora.dropout,
        "target_modules": "all-linear" if targets == ["all-linear"] else targets,
        "double_quant": config.quant.double_quant, "quant_type": config.quant.method.value,
    }


def tokenize_for_both(overrides: list[str], dest: Path) -> tuple[dict, int]:
    """Tokenize the data once with qlora's pipeline (filling the tokenization cache the qlora runs read) and save
    the training sequences as a `datasets.Dataset` at `dest` for the baseline. Returns the baseline's settings
    and the number of training sequences."""
    import datasets

    from qlora import data as qdata
    from qlora.composition import compose_config
    from qlora.model import load_tokenizer

    config = compose_config(overrides)
    tokenizer = load_tokenizer(config.model)
    tokenized = qdata.load(config.data, tokenizer, seq_len=config.train.seq_len, seed=config.seed,
                           cache_dir=Path(config.cache_dir).expanduser())
    ids = [e.input_ids.tolist() for e in tokenized.train]
    columns = {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids],
               "labels": [e.labels.tolist() for e in tokenized.train]}
    datasets.Dataset.from_dict(columns).save_to_disk(str(dest))
    return baseline_settings(config), len(ids)


def write_long_records(source: Path, dest: Path, seq_len: int, count: int = 4) -> None:
    """Alpaca records whose responses run well past `seq_len` tokens (real text, repeated), for --longest probes:
    truncated to seq_len they give sequences of exactly that length."""
    records = json.loads(source.read_text())
    text = "\n\n".join(r["output"] for r in records if r.get("output"))
    chars = 8 * seq_len  # a byte-level BPE averages well under 8 characters per token on English
    text = (text * (chars // len(text) + 1))[:chars]
    dest.write_text(json.dumps([{"instruction": "Continue the text.", "input": "", "output": text}] * count))


# The measured runs: each in a process of its own (`--child SIDE`).


def measure_qlora(spec: dict, started: float) -> dict:
    """Train with qlora per spec["overrides"]; figures from the run folder (metrics.jsonl, summary.json).

    Time to first step ends when qlora's LoRA attachment logs (`qlora.lora`), right after get_peft_model. Time to
    training ends where step 1's window began: when step 1's metrics row is logged, less that window.
    """
    import logging

    import torch

    logged: dict[str, list[float]] = {"lora": [], "step 1": []}

    class Clock(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name == "qlora.lora":
                logged["lora"].append(time.perf_counter())
            elif record.getMessage().startswith("step 1/"):  # the row's log line (train.progress=false)
                logged["step 1"].append(time.perf_counter())

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("qlora.lora", "qlora.progress"):
        logging.getLogger(name).addHandler(Clock())
    from qlora import memory
    from qlora.composition import compose_config
    from qlora.model import compute_dtype, quant_report
    from qlora.train import run

    config = compose_config(spec["overrides"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(config.quant, device)
    result = run(config)
    if not logged["lora"]:
        raise RuntimeError("qlora.lora logged nothing, so the time LoRA was attached is unknown")
    out = Path(config.output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "tokens_per_s" in r]
    if [r["step"] for r in rows] != list(range(1, config.train.max_steps + 1)):
        raise RuntimeError("metrics.jsonl lacks a row per step; train.log_every_steps=1 is needed")
    tokens = [r["tokens_seen"] - (rows[i - 1]["tokens_seen"] if i else 0) for i, r in enumerate(rows)]
    seconds = [n / r["tokens_per_s"] for n, r in zip(tokens, rows, strict=True)]
    summary = json.loads((out / "summary.json").read_text())
    report = quant_report(result.model)  # the 4-bit layers are as loaded; peft's upcasts touch only the others
    return {
        "tokens_per_s": steady_rate(tokens, seconds, spec["warmup_steps"]),
        "peak_memory_bytes": memory.peak_bytes(device),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if device.type == "cuda" else None,
        "planned_memory_bytes": (summary["planned_memory_gb"] * 2**30 if summary["planned_memory_gb"] is not None
                                 else None),
        "time_to_first_step_s": logged["lora"][0] - started,
        "time_to_training_s": logged["step 1"][0] - seconds[0] - started if logged["step 1"] else None,
        "bits_per_quantized_param": report.bits_per_quantized_param,
        "base_bytes": summary["base_bytes"],
        "quantized_params": report.quantized_params,
        "trainable_params": summary["parameters"]["trainable"],
        "recomputed_layers": summary["checkpointed_layers"],
        "tokens_per_step": statistics.fmean(tokens[spec["warmup_steps"]:]),
        "steps": len(rows), "step_tokens": tokens, "step_seconds": seconds,
        "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
        "compute_dtype": str(dtype).removeprefix("torch."),
        "seconds": time.perf_counter() - started,
    }


def measure_baseline(spec: dict, started: float) -> dict:
    """Train with the standard stack per spec["settings"] on the sequences saved at spec["dataset"].

    Tokens per step are counted from each collated batch's attention mask (a FIFO: the Trainer collates ahead);
    step windows are timed at each `on_step_end`, after a CUDA synchronize on a GPU.
    """
    import datasets
    import peft
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.modeling_layers import GradientCheckpointingLayer

    from qlora import memory
    from qlora.model import quant_report

    s = spec["settings"]
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    train_data = datasets.load_from_disk(spec["dataset"])
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=s["quant_type"],
                                      bnb_4bit_use_double_quant=s["double_quant"], bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], quantization_config=quantization, dtype=dtype,
                                                 device_map={"": torch.cuda.current_device() if cuda else "cpu"},
                                                 attn_implementation="sdpa")
    paused = time.perf_counter()  # measuring the base is not the baseline's work: keep it off its clock
    report = quant_report(model)
    started += time.perf_counter() - paused
    model.config.use_cache = False
    model = peft.prepare_model_for_kbit_training(model)  # use_gradient_checkpointing=True, its default
    lora = peft.LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                           target_modules=s["target_modules"], bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    time_to_first_step = time.perf_counter() - started

    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    collated: deque[int] = deque()

    def counting_collator(features):
        batch = collate(features)
        collated.append(int(batch["attention_mask"].sum()))
        return batch

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.tokens: list[int] = []
            self.seconds: list[float] = []
            self.last = self.first = 0.0

        def _now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.last:
                self.last = self._now()  # the first step's window starts here (its batch is already fetched)
                self.first = self.last

        def on_step_end(self, args, state, control, **kwargs):
            now = self._now()
            self.tokens.append(collated.popleft())
            self.seconds.append(now - self.last)
            self.last = now

    args = TrainingArguments(
        output_dir=spec["output_dir"], max_steps=s["max_steps"], per_device_train_batch_size=s["micro_batch_size"],
        gradient_accumulation_steps=s["grad_accum_steps"], learning_rate=s["lr"], lr_scheduler_type=s["schedule"],
        warmup_steps=s["warmup_steps"], weight_decay=s["weight_decay"], adam_beta1=s["betas"][0],
        adam_beta2=s["betas"][1], adam_epsilon=s["eps"], max_grad_norm=s["max_grad_norm"], optim=s["optimizer"],
        activation_checkpointing=s["gradient_checkpointing"], train_sampling_strategy="group_by_length",
        bf16=bf16, eval_strategy="no", save_strategy="no", report_to=[], logging_steps=10, disable_tqdm=True,
        seed=s["seed"], dataloader_num_workers=0,
    )
    clock = StepClock()
    trainer = Trainer(model=model, args=args, train_dataset=train_data, data_collator=counting_collator,
                      processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {
        "tokens_per_s": steady_rate(clock.tokens, clock.seconds, spec["warmup_steps"]),
        "peak_memory_bytes": memory.peak_bytes(torch.device("cuda" if cuda else "cpu")),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "time_to_first_step_s": time_to_first_step,
        "time_to_training_s": clock.first - started,
        "bits_per_quantized_param": report.bits_per_quantized_param,
        "base_bytes": report.total_bytes,
        "quantized_params": report.quantized_params,
        "trainable_params": model.get_nb_trainable_parameters()[0],
        "recomputed_layers": sum(1 for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
                                 and m.gradient_checkpointing),
        "tokens_per_step": statistics.fmean(clock.tokens[spec["warmup_steps"]:]),
        "steps": len(clock.tokens), "step_tokens": clock.tokens, "step_seconds": clock.seconds,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "seconds": time.perf_counter() - started,
    }


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, is running out of device memory."""
    import torch

    while error is not None:
        if isinstance(error, torch.OutOfMemoryError):
            return True
        error = error.__cause__ or error.__context__
    return False


def child(task: str, spec_path: Path, result_path: Path) -> None:
    """One task in a process of its own: a measured run of a side (its figures, or {"oom": true} when a --longest
    probe runs out of memory), or building the model; the result goes to `result_path` as JSON."""
    import torch  # imported before the clock starts: both sides share it

    started = time.perf_counter()
    spec = json.loads(spec_path.read_text())
    if task == "build":
        build_model_folder(Path(spec["folder"]), Shape(**spec["shape"]), Path(spec["corpus"]), spec["device"])
        result_path.write_text("{}\n")
        return
    measure = measure_qlora if task == "qlora" else measure_baseline
    try:
        result = {**measure(spec, started), "device": device_name(torch.cuda.is_available())}
    except Exception as e:
        if not spec.get("probe") or not is_out_of_memory(e):
            raise
        result = {"oom": True}
    result_path.write_text(json.dumps(result, indent=2) + "\n")


# The parent: set up once, alternate the sides, report.


class OutOfTime(Exception):
    """A run would end past `Bench.deadline`: it was not started, or was stopped."""


class Bench:
    """One invocation: its working folder, the model built there, and the processes it runs."""

    def __init__(self, work: Path, env: dict[str, str], qlora_extra: tuple[str, ...] = (),
                 compact_malloc: bool = False) -> None:
        self.work = work
        self.env = env
        self.compact_malloc = compact_malloc
        """Run both sides with QLORA_MALLOC=compact's malloc settings (--compact-malloc)."""
        self.qlora_extra = qlora_extra
        """Overrides added to qlora's config (--qlora)."""
        self.model_dir = work / "model"
        self.count = 0
        self.deadline: float | None = None
        """time.monotonic() by which every run must have ended (None: no limit); a run still going then is killed
        and OutOfTime raised (scripts/gpu_check.py's time budget)."""

    def run(self, task: str, spec: dict) -> dict:
        """Run `task` (a side, or "build") per `spec` in a new process; its result (exits with the end of its log
        if it failed)."""
        self.count += 1
        name = f"{self.count:03d}-{task}"
        spec_path, result_path, log_path = (self.work / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
        spec_path.write_text(json.dumps(spec, indent=2))
        command = [sys.executable, str(Path(__file__).resolve()), "--child", task, "--spec", str(spec_path),
                   "--result", str(result_path)]
        env = {**self.env, **self.malloc(task)}
        timeout = None if self.deadline is None else self.deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise OutOfTime(f"no time left for the {task} run")
        with log_path.open("w") as log:
            try:
                status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                        timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                raise OutOfTime(f"the {task} run was stopped at the deadline, after {timeout:.0f} s") from None
        if status != 0 or not result_path.is_file():
            tail = "\n".join(log_path.read_text().splitlines()[-30:])
            raise SystemExit(f"bench: the {task} run failed (exit status {status}); end of {log_path}:\n{tail}")
        return json.loads(result_path.read_text())

    def malloc(self, task: str) -> dict[str, str]:
        """Extra malloc settings of `task`'s process: none (glibc's defaults, as both a `qlora` command and a
        Trainer script get them), or with --compact-malloc those of QLORA_MALLOC=compact for both sides."""
        from qlora.memory import COMPACT_MALLOC

        return dict(COMPACT_MALLOC) if self.compact_malloc and task in SIDES else {}

    def measure(self, side: str, workload: Workload, data: Path, dataset: Path, settings: dict, warmup_steps: int,
                probe: bool = False) -> dict:
        """One run of `side`: qlora composed from `workload` on `data`; the baseline on the sequences saved at
        `dataset` with `settings`. A --longest `probe` holds out no eval split and skips qlora's memory check."""
        out = self.work / "runs" / f"{self.count + 1:03d}-{side}"
        overrides = qlora_overrides(workload, self.model_dir, data, self.work, out, self.qlora_extra)
        if probe:
            overrides += ["data.eval_fraction=0", "train.check_memory=false"]
        return self.run(side, {"overrides": overrides, "settings": settings, "model_dir": str(self.model_dir),
                               "dataset": str(dataset), "output_dir": str(out), "warmup_steps": warmup_steps,
                               "probe": probe})

    def tokenize(self, workload: Workload, data: Path, probe: bool = False) -> tuple[Path, dict, int]:
        """`data` tokenized for `workload` (see `tokenize_for_both`): the baseline's dataset folder and settings,
        and the number of training sequences."""
        dataset = self.work / f"{data.stem}-{workload.seq_len}"
        overrides = qlora_overrides(workload, self.model_dir, data, self.work, self.work / "runs" / "unused",
                                    self.qlora_extra)
        settings, sequences = tokenize_for_both(overrides + (["data.eval_fraction=0"] if probe else []), dataset)
        return dataset, settings, sequences


def compare(bench: Bench, workload: Workload, data: Path, sides: tuple[str, ...] = SIDES) -> tuple[dict, dict]:
    """Alternate measured runs of the `sides`; every run's figures by side, and the baseline's settings."""
    dataset, settings, sequences = bench.tokenize(workload, data)
    note(f"{sequences} training sequences; {workload.repeats} x ({', '.join(sides)}), {workload.max_steps} steps each")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for repeat in range(workload.repeats):
        for side in sides:
            result = bench.measure(side, workload, data, dataset, settings, workload.warmup_steps)
            runs[side].append(result)
            note(f"run {repeat + 1}/{workload.repeats} {side}: {result['tokens_per_s']:,.0f} tokens/s, "
                 f"peak {size(result['peak_memory_bytes'])}, first step after {result['time_to_first_step_s']:.1f} s")
    return runs, settings


def probe_fits(bench: Bench, workload: Workload, long_data: Path, say: Callable[[str], None] | None = None):
    """fits(side, seq_len): whether two steps of `side` at that seq_len and micro batch 1, on `long_data`, train
    without running out of memory (each length tokenized once; each answer said through `say`, default `note`)."""
    prepared: dict[int, tuple[Path, dict]] = {}

    def fits(side: str, seq_len: int) -> bool:
        probe = replace(workload, seq_len=seq_len, micro_batch_size=1, max_steps=2)
        if seq_len not in prepared:
            prepared[seq_len] = bench.tokenize(probe, long_data, probe=True)[:2]
        dataset, settings = prepared[seq_len]
        result = bench.measure(side, probe, long_data, dataset, settings, warmup_steps=1, probe=True)
        (say or note)(f"longest: {side} at seq_len {seq_len}: {'out of memory' if result.get('oom') else 'fits'}")
        return not result.get("oom")

    return fits


def find_longest(bench: Bench, workload: Workload, data: Path, cap: int, granularity: int) -> dict[str, Longest]:
    """Each side's longest trainable seq_len at micro batch 1 (two steps on sequences of exactly that length)."""
    long_data = bench.work / "long.json"
    write_long_records(data, long_data, cap)
    fits = probe_fits(bench, workload, long_data)
    start = min(max(granularity, workload.seq_len // granularity * granularity), cap)
    return {side: longest_fitting(lambda n, side=side: fits(side, n), start, cap, granularity) for side in SIDES}


FIGURES = ["tokens_per_s", "tokens_per_s_p90", "peak_memory_bytes", "peak_reserved_bytes", "planned_memory_bytes",
           "time_to_first_step_s", "time_to_training_s", "bits_per_quantized_param", "base_bytes", "mfu",
           "tokens_per_step", "trainable_params"]


def table(report: dict) -> str:
    """The report as Markdown: a header (command, date, versions, device, setup) and the figures."""
    medians, ratios, runs = report["medians"], report["ratios"], report["runs"]
    w = report["workload"]
    shape = report["architecture"]

    def each(figure: str, fmt: Callable[[float], str]) -> list[str]:
        cells = []
        for side in SIDES:
            values = [r[figure] for r in runs[side]]
            spread = f" ({' / '.join(fmt(v) for v in values)})" if len(values) > 1 else ""
            cells.append(fmt(medians[side][figure]) + spread)
        return cells

    def row(label: str, figure: str, fmt: Callable[[float], str], digits: int = 2) -> str:
        if figure not in ratios:
            return f"| {label} | n/a | n/a | n/a |"
        return f"| {label} | {' | '.join(each(figure, fmt))} | {ratios[figure]:.{digits}f} |"

    def planned() -> str:
        plan = medians["qlora"].get("planned_memory_bytes")
        if plan is None:
            return "| qlora's memory plan for its peak (plan / measured) | n/a | not planned | |"
        return (f"| qlora's memory plan for its peak (plan / measured) | {size(plan)} "
                f"({plan / medians['qlora']['peak_memory_bytes']:.2f}) | not planned | |")

    def recomputed(side: str) -> str:
        counts = sorted({r["recomputed_layers"] for r in runs[side]})
        return f"{' / '.join(map(str, counts))} of {shape['num_hidden_layers']}"

    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    if report["code_changed_during_run"]:
        versions += " (qlora/ or configs/ changed during the run)"
    lines = [
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; device: {report['device']}; {versions}  ",
        f"Model: {report['model']}, {report['parameters']:,} parameters (hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers, MLP {shape['intermediate_size']}, {shape['num_attention_heads']} heads, "
        f"{shape['num_key_value_heads']} KV heads, vocab {report['vocab_size']:,}); nf4 + double quant, "
        f"{report['compute_dtype']} compute{' with bf16 autocast' if report['compute_dtype'] == 'bfloat16' else ''}  ",
        f"Training: seq_len {w['seq_len']}, micro batch {w['micro_batch_size']}, {w['max_steps']} steps "
        f"(the first {w['warmup_steps']} not timed), LoRA r={report['settings']['lora_r']} "
        f"alpha={report['settings']['lora_alpha']:g} dropout={report['settings']['lora_dropout']:g} on all linear "
        f"layers, paged_adamw_8bit lr {report['settings']['lr']:g}; "
        f"{w['repeats']} alternating runs per side (median, then each run in brackets)"
        + (f"; qlora also with {' '.join(report['qlora_overrides'])}" if report["qlora_overrides"] else "")
        + "; malloc: " + ", ".join(f"{side} {' '.join(f'{k}={v}' for k, v in env.items()) or 'glibc defaults'}"
                                   for side, env in report.get("malloc", {}).items()),
        "",
        "| figure | qlora | baseline | qlora / baseline |",
        "| --- | --- | --- | --- |",
        "| data | packed rows (data.packing=true) | padded to the longest in the batch, length-grouped | |",
        f"| decoder layers recomputed in backward (qlora: train.gradient_checkpointing, auto unless overridden) | "
        f"{recomputed('qlora')} | "
        f"{recomputed('baseline')} | |",
        row("tokens per second (non-padding, steady state)", "tokens_per_s", lambda v: f"{v:,.0f}"),
        row("tokens per second, least disturbed steps (90th percentile of steps)", "tokens_per_s_p90",
            lambda v: f"{v:,.0f}"),
        row("peak memory (" + ("CUDA max allocated" if report["cuda"] else "peak resident set") + ")",
            "peak_memory_bytes", size),
        *([row("peak memory reserved (CUDA max reserved)", "peak_reserved_bytes", size)] if report["cuda"] else []),
        planned(),
        row("time to first step (start to quantized base with LoRA)", "time_to_first_step_s", lambda v: f"{v:.1f} s"),
        row("time to training (start to the first step's start)", "time_to_training_s", lambda v: f"{v:.1f} s"),
        row("bits per quantized parameter", "bits_per_quantized_param", lambda v: f"{v:.3f}", digits=3),
        row("base model bytes (as loaded)", "base_bytes", size, digits=3),
        row("MFU (frozen-base model FLOPs)" if report["cuda"] else "MFU (GPU only)", "mfu", lambda v: f"{v:.1%}"),
        row("non-padding tokens per step", "tokens_per_step", lambda v: f"{v:,.0f}"),
        row("trainable parameters (same LoRA: ratio 1)", "trainable_params", lambda v: f"{v:,.0f}", digits=3),
    ]
    longest = report.get("longest")
    if longest:
        def length(side: str) -> str:
            found = longest[side]
            return ("≥ " if found["capped"] else "") + f"{found['seq_len']:,}"

        ratio = longest["qlora"]["seq_len"] / longest["baseline"]["seq_len"] if longest["baseline"]["seq_len"] else 0
        lines.append(f"| longest seq_len at micro batch 1 (to {longest['granularity']} tokens) | {length('qlora')} | "
                     f"{length('baseline')} | {ratio:.2f} |")
    return "\n".join(lines)


def size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def note(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    """Python's and the packages' versions, and the checkout's commit."""
    from importlib.metadata import PackageNotFoundError, version

    import qlora

    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "qlora"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:  # qlora from a checkout on PYTHONPATH, not installed (a lent GPU machine)
            found[package] = qlora.__version__ if package == "qlora" else "not installed"
    found["qlora commit"] = commit()
    return found


def commit() -> str:
    """The checkout's commit, marked when qlora/ or configs/ differ from it ("" outside a git checkout)."""
    head = _git("rev-parse", "--short", "HEAD")
    return head + (" with uncommitted changes" if head and _git("status", "--porcelain", "qlora", "configs") else "")


def code_state() -> str:
    """What identifies the code measured: the trees of qlora/ and configs/, and any uncommitted changes to them."""
    return _git("rev-parse", "HEAD:qlora", "HEAD:configs") + _git("diff", "HEAD", "--", "qlora", "configs")


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def device_name(cuda: bool) -> str:
    """The GPU's CUDA name, or the CPU's model name and the cores this process may use."""
    import torch

    if cuda:
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    return f"CPU: {model}, {len(os.sched_getaffinity(0))} cores"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=WORKLOADS, default="cpu", help="model size and run length (default cpu)")
    parser.add_argument("--repeats", type=int, help="measured runs per side (default: the workload's)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: the workload's)")
    parser.add_argument("--micro-batch", type=int, help="sequences per step (default: the workload's)")
    parser.add_argument("--seq-len", type=int, help="train.seq_len (default: the workload's)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: the GPU when there is one")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="an Alpaca-layout JSON file")
    parser.add_argument("--model", type=Path, help="a pretrained model folder, for --workload smollm2 (which needs it)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--qlora", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the qlora side (and what the baseline reads from its config), "
                             "e.g. train.gradient_checkpointing=true; repeatable")
    parser.add_argument("--compact-malloc", action="store_true",
                        help="run both sides with the malloc settings of QLORA_MALLOC=compact (default: glibc's)")
    parser.add_argument("--longest", action="store_true", help="also find each side's longest seq_len at batch 1")
    parser.add_argument("--max-seq-len", type=int, help="upper end of the --longest search (default: the workload's)")
    parser.add_argument("--granularity", type=int, default=256, help="--longest resolution in tokens (default 256)")
    parser.add_argument("--peak-flops", type=float, help="the device's peak FLOP/s for MFU (default: from a table)")
    parser.add_argument("--work", type=Path, help="working folder, kept (default: a temporary one, removed); a "
                        "model built there before with the same shape is reused")
    parser.add_argument("--child", choices=[*SIDES, "build"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child, args.spec, args.result)
        return 0
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    workload = WORKLOADS[args.workload]
    workload = replace(workload, repeats=args.repeats or workload.repeats, max_steps=args.steps or workload.max_steps,
                       micro_batch_size=args.micro_batch or workload.micro_batch_size,
                       seq_len=args.seq_len or workload.seq_len, max_seq_len=args.max_seq_len or workload.max_seq_len)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda, but torch sees no GPU")
    if args.workload == "gpu" and not cuda:
        raise SystemExit("bench: --workload gpu needs a CUDA GPU (an 8B model)")
    if not args.data.is_file():
        raise SystemExit(f"bench: --data {args.data} does not exist")
    data = args.data.resolve()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if (workload.shape is None) != (args.model is not None):
        raise SystemExit(f"bench: --model goes with --workload smollm2 (a pretrained folder) and no other workload"
                         f"{'' if args.model else '; build one with python ../shared/models/smollm2.py DIR'}")
    if args.model is not None and not (args.model / "config.json").is_file():
        raise SystemExit(f"bench: --model {args.model} is not a model folder (no config.json)")
    work = args.work or Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        bench = Bench(work.resolve(), env, tuple(args.qlora), args.compact_malloc)
        if args.model is not None:
            bench.model_dir = args.model.resolve()
        report = benchmark(bench, workload, args, data, cuda)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def benchmark(bench: Bench, workload: Workload, args: argparse.Namespace, data: Path, cuda: bool,
              reuse: dict[str, list[dict]] | None = None) -> dict:
    """Build the model, run both sides (and the --longest search); every figure, as the JSON report holds them.

    `reuse`: runs of a side measured before (an earlier report's "runs", same workload and device) that are taken
    as they are instead of running that side again (scripts/gpu_check.py's second qlora setting, against the
    baseline of the first)."""
    # The code measured is the checkout's at the start; one whose qlora/ or configs/ change during the run is flagged.
    measured, found_versions = code_state(), versions()
    if workload.shape is None:
        note(f"the pretrained model in {bench.model_dir}")
    elif cuda:  # in a process of its own: here, CUDA's context would hold GPU memory through every measured run
        note(f"building the model in {bench.model_dir}")
        bench.run("build", {"folder": str(bench.model_dir), "shape": asdict(workload.shape), "corpus": str(data),
                            "device": "cuda"})
    else:
        note(f"building the model in {bench.model_dir}")
        build_model_folder(bench.model_dir, workload.shape, data, "cpu")
    from transformers import AutoConfig

    arch = AutoConfig.from_pretrained(bench.model_dir)
    reuse = reuse or {}
    runs, settings = compare(bench, workload, data, tuple(s for s in SIDES if s not in reuse))
    runs = {side: reuse.get(side) or runs[side] for side in SIDES}
    device = runs["qlora"][0]["device"]
    flops = flops_per_token(arch, workload.seq_len)
    peak = args.peak_flops or (peak_flops_of(device) if cuda else None)
    if cuda and peak is None:
        note(f"no peak FLOP/s known for {device}: pass --peak-flops for MFU")
    for result in (r for side in SIDES for r in runs[side]):
        result["tokens_per_s_p90"] = least_disturbed_rate(result["step_tokens"], result["step_seconds"],
                                                          workload.warmup_steps)
        if peak:
            result["mfu"] = mfu(result["tokens_per_s"], flops, peak)
    medians, ratios = summarize(runs, FIGURES)
    report = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": date.today().isoformat(),
        "versions": found_versions,
        "device": device,
        "cuda": cuda,
        "compute_dtype": " / ".join(sorted({r["compute_dtype"] for side in SIDES for r in runs[side]})),
        "workload": {"name": args.workload, **asdict(workload)},
        "model": (f"random-init {arch.model_type.capitalize()} architecture" if workload.shape is not None else
                  f"pretrained {bench.model_dir.name} ({arch.model_type} architecture)"),
        "architecture": {k: getattr(arch, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                       "num_attention_heads", "num_key_value_heads")},
        "parameters": arch_parameters(arch),
        "vocab_size": arch.vocab_size,
        "settings": settings,
        "qlora_overrides": list(bench.qlora_extra),
        "reused_runs": sorted(reuse),
        "malloc": {side: bench.malloc(side) for side in SIDES},
        "flops_per_token": flops,
        "peak_flops": peak,
        "runs": runs,
        "medians": medians,
        "ratios": ratios,
    }
    if args.longest:
        found = find_longest(bench, workload, data, workload.max_seq_len, args.granularity)
        report["longest"] = {"granularity": args.granularity, **{side: asdict(found[side]) for side in SIDES}}
    report["code_changed_during_run"] = code_state() != measured
    return report


def arch_parameters(arch) -> int:
    """Parameters of the model `arch` describes (counted on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    sys.exit(main())
