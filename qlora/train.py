"""The QLoRA fine-tuning recipe: one function that reads top to bottom, and the loop it owns.

config -> validate -> tokenizer -> data -> load + quantize base -> attach LoRA -> optimizer -> loop -> save.
Data comes before the weights so that a bad record stops the run before minutes of loading.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from qlora import data as qdata
from qlora import demo
from qlora.config import Config, MixedPrecision, validate
from qlora.errors import QloraError
from qlora.lora import attach_lora
from qlora.metrics import MetricsLog
from qlora.model import compute_dtype, load_base_model, load_tokenizer, quant_report
from qlora.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where the run is: everything the loop advances."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Completed passes over the training data."""
    tokens_seen: int = 0
    """Non-padding tokens consumed (prompt and response)."""
    tokens_trained: int = 0
    """Tokens that carried loss."""


@dataclass
class RunResult:
    """What a finished run leaves in memory, for programmatic use and tests."""

    output_dir: Path
    state: TrainState
    first_eval_loss: float | None
    final_eval_loss: float | None
    samples: list[dict]
    model: torch.nn.Module
    """The peft model (quantized base + trained adapter)."""
    tokenizer: object
    optimizer: torch.optim.Optimizer


def run(config: Config) -> RunResult:
    """Fine-tune per `config`, writing the run folder; returns where it went and how it ended."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    validate(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))

    accelerator = Accelerator(mixed_precision=_mixed_precision(config.train.mixed_precision))
    device = accelerator.device
    set_seed(config.seed)
    log.info("qlora run -> %s (device %s, compute dtype %s, mixed precision %s)", out, device,
             _name(compute_dtype(config.quant, device)), accelerator.mixed_precision)

    # Tokenizer (and whatever the demo generates)
    demo.prepare_assets(config.model, config.data)
    tokenizer = load_tokenizer(config.model)

    # Data: tokenized (or read from the cache) and checked before any weights load
    qdata.use_chat_template(config.data, tokenizer)
    data = qdata.load(config.data, tokenizer, config.train.seq_len, config.seed, Path(config.cache_dir).expanduser())
    log.info("data %s (%s): %s; %d train / %d eval sequences%s", config.data.path, config.data.format.value,
             data.stats.describe(config.train.seq_len), len(data.train), len(data.eval),
             ", packed" if config.data.packing else "")
    train_loader, eval_loader = qdata.loaders(data, config.data, config.train.micro_batch_size,
                                              config.train.seq_len, tokenizer.pad_token_id, config.seed,
                                              config.train.num_workers)

    # Base model, quantized and frozen
    t0 = time.perf_counter()
    model = load_base_model(config.model, config.quant, device)
    _log_base(model, config, time.perf_counter() - t0)
    if config.quant.method.value != "none" and config.train.prepare_kbit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False

    # LoRA
    model = attach_lora(model, config.lora)
    if config.data.packing:
        check_packed_attention(model, qdata.first_batch(train_loader), device)

    # Optimizer and schedule
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, config.optim, device)
    scheduler = build_scheduler(optimizer, config.optim, config.train.max_steps)
    log.info("optimizer %s (lr %g, %s schedule, %d warmup steps, clip %g); batch %d x %d accumulation = %d sequences",
             type(optimizer).__name__, config.optim.lr, config.optim.schedule.value, config.optim.warmup_steps,
             config.optim.max_grad_norm, config.train.micro_batch_size, config.train.grad_accum_steps,
             config.train.micro_batch_size * config.train.grad_accum_steps * accelerator.num_processes)

    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    prompts = [qdata.prompt_ids(p, config.data, tokenizer) for p in config.train.sample_prompts]
    before = generate(model, tokenizer, prompts, config.train.max_new_tokens, device)

    metrics = MetricsLog(out, config.train.tensorboard)
    try:
        state, first_eval, final_eval = train_loop(model, optimizer, scheduler, train_loader, eval_loader,
                                                   accelerator, metrics, config)
    finally:
        metrics.close()

    after = generate(model, tokenizer, prompts, config.train.max_new_tokens, device)
    samples = [{"prompt": p, "before": b, "after": a}
               for p, b, a in zip(config.train.sample_prompts, before, after, strict=True)]
    if accelerator.is_main_process:
        _save_atomic(out / "adapter", accelerator.unwrap_model(model).save_pretrained)
        _save_atomic(out / "tokenizer", tokenizer.save_pretrained)
        if samples:
            (out / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
        (out / "summary.json").write_text(json.dumps({
            **asdict(state), "first_eval_loss": first_eval, "final_eval_loss": final_eval}, indent=2) + "\n")
    for s in samples:
        log.info("sample: %s\n  before: %s\n  after:  %s", s["prompt"], s["before"] or "(nothing)", s["after"])
    if first_eval is not None and final_eval is not None:
        log.info("eval loss %.4f -> %.4f (perplexity %.2f -> %.2f)", first_eval, final_eval,
                 math.exp(min(first_eval, 50)), math.exp(min(final_eval, 50)))
    log.info("saved adapter, tokenizer and config to %s", out)
    return RunResult(out, state, first_eval, final_eval, samples, accelerator.unwrap_model(model), tokenizer,
                     optimizer.optimizer)


def train_loop(model, optimizer, scheduler, train_loader, eval_loader, accelerator, metrics: MetricsLog,
               config: Config) -> tuple[TrainState, float | None, float | None]:
    """Run `train.max_steps` optimizer steps; returns the final state and the first and last eval loss."""
    cfg = config.train
    state = TrainState()
    batches = _epochs(train_loader, state)
    trainable = [p for p in model.parameters() if p.requires_grad]
    evaluate_now = eval_loader is not None and cfg.eval_every_steps > 0
    first_eval = final_eval = None
    if evaluate_now:
        with accelerator.autocast():
            first_eval = final_eval = evaluate(model, eval_loader, cfg.eval_max_batches)
        metrics.write({"step": 0, "eval_loss": first_eval})
    progress = _progress_bar(cfg, accelerator)
    window_start, window_tokens = time.perf_counter(), 0
    model.train()
    while state.step < cfg.max_steps:
        # One optimizer step: fetch its micro batches first, so each one's loss is weighted by its share of
        # the step's trained tokens (a plain mean of micro-batch means over-weights short sequences).
        micro = [next(batches) for _ in range(cfg.grad_accum_steps)]
        n_trained = sum(int((b["labels"][:, 1:] != qdata.IGNORE_INDEX).sum()) for b in micro)
        n_seen = sum(int(b["attention_mask"].sum()) for b in micro)
        loss_sum = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            with _maybe_no_sync(accelerator, model, sync), accelerator.autocast():
                logits = model(**qdata.model_inputs(batch)).logits
                loss = token_loss_sum(logits, batch["labels"])
                accelerator.backward(loss / max(n_trained, 1))
            loss_sum += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(trainable, config.optim.max_grad_norm) \
            if config.optim.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_trained += n_trained
        state.tokens_seen += n_seen
        window_tokens += n_seen

        last = state.step == cfg.max_steps
        if cfg.log_every_steps and (state.step % cfg.log_every_steps == 0 or last or state.step == 1):
            elapsed = time.perf_counter() - window_start
            row = {"step": state.step, "epoch": state.epoch, "loss": loss_sum.item() / max(n_trained, 1),
                   "lr": scheduler.get_last_lr()[0], "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                   "tokens_seen": state.tokens_seen}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            if torch.cuda.is_available():
                row["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
            metrics.write(row)
            progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            window_start, window_tokens = time.perf_counter(), 0
        if evaluate_now and (state.step % cfg.eval_every_steps == 0 or last):
            with accelerator.autocast():
                final_eval = evaluate(model, eval_loader, cfg.eval_max_batches)
            metrics.write({"step": state.step, "eval_loss": final_eval})
            progress.write(f"step {state.step}: eval loss {final_eval:.4f}")
            window_start = time.perf_counter()  # eval time is not training throughput
        progress.update(1)
    progress.close()
    return state, first_eval, final_eval


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions whose label is not IGNORE_INDEX."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=qdata.IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def evaluate(model, loader, max_batches: int) -> float:
    """Mean loss per trained token over (at most `max_batches` of) the eval loader."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        logits = model(**qdata.model_inputs(batch)).logits
        total += token_loss_sum(logits, batch["labels"]).double().cpu()
        count += int((batch["labels"][:, 1:] != qdata.IGNORE_INDEX).sum())
    model.train()
    return float(total) / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device: torch.device) -> list[str]:
    """Greedy continuations of prompts given as token ids (the new text, special tokens removed)."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    answers = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


@torch.no_grad()
def check_packed_attention(model, batch: dict, device: torch.device) -> None:
    """Refuse to train packed if the model's attention lets a packed sample see the one before it.

    The second sample of a packed row must give the same logits as on its own. The same row with a plain
    causal mask (what attention that ignores position-id restarts computes) sets the scale of a leak.
    """
    positions = batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[1] - starts[0] < 2:
        return  # the first row holds one sample: nothing can leak
    end = starts[2] if len(starts) > 2 else len(positions)
    ids = batch["input_ids"][:1, :end].to(device)
    pos = positions[None, :end].to(device)
    was_training = model.training
    model.eval()
    packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, starts[1]:end].float()
    alone = model(input_ids=ids[:, starts[1]:end], use_cache=False).logits[0].float()
    leaky = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids),
                  use_cache=False).logits[0, starts[1]:end]
    model.train(was_training)
    error, leak = (packed - alone).abs().max().item(), (leaky.float() - alone).abs().max().item()
    log.info("packing: a packed sample's logits match it alone to %.2g (a leak across samples would be %.2g)",
             error, leak)
    if error > max(0.1 * leak, 1e-5):
        raise QloraError(f"attention implementation {model.config._attn_implementation!r} lets packed samples "
                         "attend to each other; use model.attn_implementation=sdpa (or eager, flash_attention_2) "
                         "or set data.packing=false")


def _epochs(loader, state: TrainState):
    """Batches forever, counting completed epochs in `state`."""
    while True:
        yield from loader
        state.epoch += 1


def _maybe_no_sync(accelerator, model, sync: bool):
    from contextlib import nullcontext

    return nullcontext() if sync else accelerator.no_sync(model)


def _progress_bar(cfg, accelerator):
    from tqdm.auto import tqdm

    enabled = cfg.progress and accelerator.is_main_process and sys.stderr.isatty()
    return tqdm(total=cfg.max_steps, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


def _mixed_precision(choice: MixedPrecision) -> str:
    if choice != MixedPrecision.auto:
        return choice.value
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _log_base(model, config: Config, seconds: float) -> None:
    if config.quant.method.value == "none":
        n = sum(p.numel() for p in model.parameters())
        log.info("base %s loaded unquantized in %.1fs: %s parameters, %.1f MiB", config.model.name_or_path, seconds,
                 f"{n:,}", model.get_memory_footprint() / 2**20)
        return
    report = quant_report(model)
    log.info("base %s loaded as %s%s in %.1fs: %s parameters quantized at %.3f bits each, %s kept in %s; "
             "%.1f MiB in all", config.model.name_or_path, config.quant.method.value,
             "+double-quant" if config.quant.double_quant else "", seconds, f"{report.quantized_params:,}",
             report.bits_per_quantized_param, f"{report.other_params:,}", _name(compute_dtype(config.quant,
             model.device)), report.total_bytes / 2**20)


def _save_atomic(target: Path, save) -> None:
    """Write with `save(folder)` into a temporary sibling, then swap it in: never a half-written folder."""
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    save(str(staging))
    for f in staging.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
