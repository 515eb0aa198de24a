"""The QLoRA fine-tuning recipe: one function that reads top to bottom, and the loop it owns.

config -> validate -> (checkpoint to resume) -> tokenizer -> data -> load + quantize base -> attach LoRA ->
optimizer -> (restore) -> commit the run folder -> loop with checkpoints -> save.
Data comes before the weights so that a bad record stops the run before minutes of loading, and nothing is
written to output_dir before all of it has worked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from qlora import checkpoint, demo, distributed, hub, memory, neftune, runfolder
from qlora import data as qdata
from qlora.attention import use_per_sample_sdpa
from qlora.composition import recipe_description, recipe_paths
from qlora.config import AUTO, Config, DistStrategy, OnNonFinite, validate
from qlora.errors import QloraError
from qlora.evaluation import perplexity, score, scored_tokens
from qlora.files import write_folder_atomic, write_text_atomic
from qlora.lora import attach_lora, init_adapter
from qlora.loss import CausalLMLoss
from qlora.metrics import MetricsLog, NoMetrics
from qlora.model import (
    QuantReport,
    attention_implementation,
    autocast_dtype,
    check_model_config,
    compute_dtype,
    enable_checkpointing,
    load_base_model,
    load_tokenizer,
    max_positions,
    mixed_precision,
    prepare_kbit,
    quant_report,
)
from qlora.optim import build_optimizer, build_scheduler, param_groups
from qlora.plan import check_fits, checkpointed_layers

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where the run is: everything the loop advances, saved in every checkpoint."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Completed passes over the training data."""
    batch: int = 0
    """Micro batches drawn in the current epoch: with the epoch, the exact data position."""
    tokens_seen: int = 0
    """Non-padding tokens consumed (prompt and response)."""
    tokens_trained: int = 0
    """Tokens that carried loss."""
    first_eval_loss: float | None = None
    final_eval_loss: float | None = None
    skipped_steps: int = 0
    """Updates skipped for a non-finite loss (train.on_nonfinite_loss=skip)."""
    processes: int = 1
    """Processes that trained (each draws its own share of the batches, so `batch` counts per process)."""


@dataclass
class RunResult:
    """What a finished run leaves in memory, for programmatic use and tests."""

    output_dir: Path
    state: TrainState
    samples: list[dict]
    model: torch.nn.Module
    """The peft model (quantized base + trained adapter)."""
    tokenizer: object
    optimizer: torch.optim.Optimizer

    @property
    def first_eval_loss(self) -> float | None:
        return self.state.first_eval_loss

    @property
    def final_eval_loss(self) -> float | None:
        return self.state.final_eval_loss


@dataclass
class Training:
    """What the loop drives, as `run` assembled it."""

    config: Config
    out: Path
    accelerator: Accelerator
    model: torch.nn.Module
    """The peft model (sharded under FSDP): what is saved, evaluated and sampled."""
    loss: torch.nn.Module
    """The loss module around it, as accelerate prepared it (DDP-wrapped under dist=ddp): what trains."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: torch.utils.data.DataLoader
    sampler: qdata.LengthGroupedBatches
    """The train loader's batch sampler, which the data position is set on."""
    eval_loader: torch.utils.data.DataLoader | None
    metrics: MetricsLog | NoMetrics
    samples_before: list[str]
    """Answers to the sample prompts before training (kept in checkpoints for the final samples.json)."""
    eval_seconds: float = 0.0
    """Time spent in evaluation so far (this process, since it started)."""


class Interrupted(QloraError):
    """SIGINT / SIGTERM stopped the run after a checkpoint was saved."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def run(config: Config, recipe: str | None = None) -> RunResult:
    """Fine-tune per `config`, writing the run folder; returns where it went and how it ended.

    `recipe` names the recipe the config was composed from, recorded in config.yaml for model cards.

    With config.resume, continue from a checkpoint instead: the same steps, losses and adapter as a run that
    was never interrupted (bit for bit on CPU).
    """
    validate(config)
    accelerator = distributed.make_accelerator(config.dist, mixed_precision(config.train.mixed_precision))
    config = distributed.same_output_dir(config, accelerator)
    runfolder.check_output_dir(config)
    with runfolder.RunLog() as runlog:
        if not accelerator.is_main_process:
            logging.getLogger("qlora").setLevel(logging.WARNING)  # one process tells the story
        try:
            return _run(config, accelerator, checkpoint.find(config), runlog, recipe)
        except QloraError as e:
            runlog.error(str(e))
            raise


def _run(config: Config, accelerator: Accelerator, resumed: checkpoint.Checkpoint | None,
         runlog: runfolder.RunLog, recipe: str | None) -> RunResult:
    from accelerate.utils import set_seed

    started = time.perf_counter()
    out = Path(config.output_dir)
    device = accelerator.device
    set_seed(config.seed)
    log.info("qlora run -> %s (device %s, compute dtype %s, mixed precision %s; %s)%s", out, device,
             _name(compute_dtype(config.quant, device)), accelerator.mixed_precision,
             distributed.describe(accelerator, config.dist),
             f"; resuming from {resumed.path} at step {resumed.step}" if resumed else "")
    if (recipe_file := recipe_paths().get(recipe)) is not None:
        log.info("recipe %s: %s", recipe, recipe_description(recipe_file))

    # Tokenizer (and whatever the demo generates); hub ids fail fast when there is no network. The main process
    # goes first where files are written (generated assets, the token cache); the others then read them.
    with accelerator.main_process_first():
        hub.prepare(hub.hub_ids(config))
        demo.prepare_assets(config)
    model_config = check_model_config(config.model, config.train.seq_len)
    config = _with_attention(config, model_config)
    tokenizer = load_tokenizer(config.model)

    # Data: tokenized (or read from the cache) and checked before any weights load; train.seq_len=auto is chosen
    # from it. Then the autos are numbers, as the checkpoint to resume recorded them.
    qdata.use_chat_template(config.data, tokenizer)
    with accelerator.main_process_first():
        config = qdata.with_seq_len(config, tokenizer, max_positions(model_config))
        data = qdata.load(config.data, tokenizer, config.train.seq_len, config.seed,
                          Path(config.cache_dir).expanduser())
    log.info("data %s (%s): %s; %d train / %d eval sequences%s", config.data.path, config.data.format.value,
             data.stats.describe(config.train.seq_len), len(data.train), len(data.eval),
             ", packed" if config.data.packing else "")
    state = _state_to_resume(resumed, config)
    _check_processes(state, accelerator.num_processes, config.force_resume)
    state.processes = accelerator.num_processes
    memory_plan = check_fits(config, device.type)
    data = dataclasses.replace(data, eval=data.eval[:config.train.eval_max_sequences])
    held_out = qdata.held_out_samples(data, config.data, config.train.samples_from_eval)
    train_loader, eval_loader = qdata.loaders(data, config.data, config.train.micro_batch_size,
                                              config.train.seq_len, tokenizer.pad_token_id, config.seed,
                                              config.train.num_workers, accelerator.process_index,
                                              accelerator.num_processes)
    sampler = train_loader.batch_sampler

    # Base model, quantized and frozen
    t0 = time.perf_counter()
    sharded = config.dist.strategy == DistStrategy.fsdp and accelerator.num_processes > 1
    model = load_base_model(config.model, config.quant, device,
                            distributed.storage_dtype(config.dist, compute_dtype(config.quant, device)))
    base = _log_base(model, config, time.perf_counter() - t0)
    if config.data.packing and config.train.per_sample_attention and use_per_sample_sdpa(model):
        log.info("attention: per packed sample (train.per_sample_attention)")
    if config.quant.method.value != "none" and config.train.prepare_kbit:
        model = prepare_kbit(model, config.train.float32_embeddings, config.lora.modules_to_save)
    checkpointed = enable_checkpointing(model, checkpointed_layers(config, device.type, memory_plan))
    model.config.use_cache = False

    # LoRA
    model = attach_lora(model, config.lora)
    if resumed is None:  # a resumed run restores its adapter instead
        init_adapter(model, config.lora, config.model)
    neftune.attach(model, config.train.neftune_alpha)
    trainable_count, total_count = model.get_nb_trainable_parameters()
    parameters = {"base": total_count - trainable_count, "quantized": base.quantized_params if base else 0,
                  "trainable": trainable_count}
    if config.data.packing:
        check_packed_attention(model, qdata.first_batch(train_loader), device)
    if resumed is not None:
        _restore_adapter(resumed, model)

    # What trains: the loss inside a module, so that DDP / FSDP see the whole forward (sharded here under FSDP)
    loss = CausalLMLoss(model, config.train.loss_chunk_tokens)
    if sharded:
        distributed.shard(loss, config.dist, _loss_inputs(qdata.first_batch(train_loader), device, rows=1, tokens=8))

    # Optimizer and schedule (after sharding, which replaces the parameters)
    optimizer = build_optimizer(param_groups(model, config.optim), config.optim, device)
    scheduler = build_scheduler(optimizer, config.optim, config.train.max_steps)
    processes = accelerator.num_processes
    log.info("optimizer %s (lr %g, %s schedule, %d warmup steps, clip %g); batch %d x %d accumulation%s = %d "
             "sequences", type(optimizer).__name__, config.optim.lr, config.optim.schedule.value,
             config.optim.warmup_steps, config.optim.max_grad_norm, config.train.micro_batch_size,
             config.train.grad_accum_steps, f" x {processes} processes" if processes > 1 else "",
             config.train.micro_batch_size * config.train.grad_accum_steps * processes)

    # The loaders stay as they are: each process's sampler already draws its own share, and _step moves batches.
    if sharded:
        optimizer = accelerator.prepare(optimizer)  # FSDP is applied above; accelerate would wrap the model in DDP
    else:
        loss, optimizer = accelerator.prepare(loss, optimizer)
    if resumed is not None:
        _restore_training(resumed, accelerator, model, optimizer, scheduler)

    prompts = [qdata.prompt_ids(p, config.data, tokenizer) for p in config.train.sample_prompts]
    prompts += [s.ids for s in held_out]
    before = resumed.state.get("samples_before", []) if resumed else []
    if len(before) != len(prompts):  # a fresh run, or the sample prompts changed since the checkpoint
        before = generate(model, tokenizer, prompts, config.train.max_new_tokens, device)

    # Everything checked: from here on, output_dir holds this run
    accelerator.wait_for_everyone()  # every process has read output_dir (its checkpoints) before it changes
    _commit(config, tokenizer, runlog, accelerator, recipe)
    if accelerator.is_main_process:
        metrics = MetricsLog(out, config.train.loggers, config.train.project, out.resolve().name, asdict(config),
                             start=state.step, history=None if resumed is None
                             else checkpoint.run_dir_of(resumed.path) / "metrics.jsonl")
    else:
        metrics = NoMetrics()
    training = Training(config, out, accelerator, model, loss, optimizer, scheduler, train_loader, sampler,
                        eval_loader, metrics, before)
    try:
        if resumed is not None:
            checkpoint.set_rng_state(resumed.rng)  # last: what the uninterrupted run would draw next
        train_loop(training, state)
    finally:
        metrics.close()

    after = generate(model, tokenizer, prompts, config.train.max_new_tokens, device)
    asked = [{"prompt": p} for p in config.train.sample_prompts]
    asked += [{"prompt": s.prompt, "reference": s.reference} for s in held_out]
    samples = [{**a, "before": b, "after": c} for a, b, c in zip(asked, before, after, strict=True)]
    adapter = distributed.adapter_state(model)
    seconds = time.perf_counter() - started
    if accelerator.is_main_process:
        summary = {"parameters": parameters, "base_bytes": base.total_bytes if base else None,
                   "peak_memory_gb": memory.peak_gb(device), "seconds": seconds,
                   "eval_seconds": training.eval_seconds, "eval_share": training.eval_seconds / seconds,
                   "planned_memory_gb": memory_plan.total_bytes / 2**30 if memory_plan else None,
                   "seq_len": config.train.seq_len, "skipped_records": data.skipped,
                   "checkpointed_layers": checkpointed, "processes": accelerator.num_processes,
                   "global_batch": config.train.micro_batch_size * config.train.grad_accum_steps
                   * accelerator.num_processes}
        _save_results(out, model, adapter, samples, state, summary)
        if config.train.report:
            _write_report(out)
    accelerator.wait_for_everyone()
    for s in samples:
        reference = f"\n  reference: {s['reference']}" if "reference" in s else ""
        log.info("sample: %s%s\n  before: %s\n  after:  %s", s["prompt"], reference, s["before"] or "(nothing)",
                 s["after"] or "(nothing)")
    if training.eval_seconds:
        log.info("evaluation took %.0fs of %.0fs (%.0f%%; train.eval_max_sequences=%d, train.eval_every_steps=%d)",
                 training.eval_seconds, seconds, 100 * training.eval_seconds / seconds,
                 config.train.eval_max_sequences, config.train.eval_every_steps)
    if state.first_eval_loss is not None and state.final_eval_loss is not None:
        log.info("eval loss %.4f -> %.4f (perplexity %.2f -> %.2f)", state.first_eval_loss, state.final_eval_loss,
                 perplexity(state.first_eval_loss), perplexity(state.final_eval_loss))
    log.info("saved adapter, tokenizer and config to %s", out)
    return RunResult(out, state, samples, model, tokenizer, optimizer.optimizer)


def _with_attention(config: Config, model_config) -> Config:
    """`config` with model.attn_implementation=auto replaced by the implementation chosen for the architecture."""
    if config.model.attn_implementation != AUTO:
        return config
    chosen = attention_implementation(config.model, model_config)
    if chosen is None:
        log.info("attention: transformers' default for %s (model.attn_implementation=auto, remote code)",
                 config.model.name_or_path)
        return config
    log.info("attention: %s (model.attn_implementation=auto: %s for %s)", chosen,
             "supported" if chosen == "sdpa" else "transformers has no sdpa", type(model_config).__name__)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, attn_implementation=chosen))


def _state_to_resume(resumed: checkpoint.Checkpoint | None, config: Config) -> TrainState:
    """The checkpoint's TrainState, once its config is known to be compatible; a fresh one without a checkpoint."""
    if resumed is None:
        if config.resume == "auto":
            log.info("resume=auto: no checkpoint in %s; starting from step 0", config.output_dir)
        return TrainState()
    changed = checkpoint.differences(resumed.config, config)
    if changed and not config.force_resume:
        raise QloraError(f"resume: the config differs from checkpoint {resumed.path}'s in what it computes: "
                         f"{'; '.join(changed)}. Resume with the checkpoint's values, or pass force_resume=true")
    if changed:
        log.warning("force_resume=true: continuing %s with a different config: %s", resumed.path, "; ".join(changed))
    if resumed.step >= config.train.max_steps and checkpoint.is_finished(checkpoint.run_dir_of(resumed.path)):
        raise QloraError(f"the run in {checkpoint.run_dir_of(resumed.path)} already finished {resumed.step} steps; "
                         f"raise train.max_steps above {resumed.step} to train it further")
    saved_max = resumed.config.get("train", {}).get("max_steps")
    if saved_max != config.train.max_steps:
        log.info("train.max_steps %s -> %d: the learning-rate schedule is stretched from step %d on", saved_max,
                 config.train.max_steps, resumed.step)
    fields = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in resumed.state.items() if k in fields})


def _check_processes(state: TrainState, processes: int, force: bool) -> None:
    """A resumed run continues with as many processes as it had: the data position counts batches per process."""
    if state.step == 0 or state.processes == processes:
        return
    if not force:
        raise QloraError(f"the checkpoint was trained by {state.processes} process(es) and this run has {processes}; "
                         f"launch {state.processes}, or pass force_resume=true to continue near the same data position")
    log.warning("force_resume=true: %d processes continue a run trained by %d; the data position is rounded",
                processes, state.processes)
    state.batch = state.batch * state.processes // processes


def _restore_adapter(resumed: checkpoint.Checkpoint, model) -> None:
    """Put the checkpoint's adapter weights into the fresh (not yet sharded) model."""
    from peft import set_peft_model_state_dict

    with _not_fitting(resumed):
        loaded = set_peft_model_state_dict(model, resumed.adapter)
        missing = [k for k in loaded.missing_keys if "lora_" in k or "modules_to_save" in k]
        if loaded.unexpected_keys or missing:
            raise ValueError(f"{len(loaded.unexpected_keys)} unexpected and {len(missing)} missing adapter tensors")


def _restore_training(resumed: checkpoint.Checkpoint, accelerator: Accelerator, model, optimizer, scheduler) -> None:
    """Put the checkpoint's optimizer, schedule and gradient scaler state into the fresh run."""
    with _not_fitting(resumed):
        distributed.load_optimizer_state(model, optimizer.optimizer, resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
        if resumed.scaler is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(resumed.scaler)


@contextmanager
def _not_fitting(resumed: checkpoint.Checkpoint):
    try:
        yield
    except (ValueError, RuntimeError, KeyError) as e:
        raise QloraError(f"checkpoint {resumed.path} does not fit this model ({str(e).splitlines()[0]}); resume "
                         "with the config that wrote it") from e


def _commit(config: Config, tokenizer, runlog: runfolder.RunLog, accelerator, recipe: str | None) -> None:
    """Take over output_dir: the run passed every check, so an old run may now be replaced."""
    out = Path(config.output_dir)
    if not accelerator.is_main_process:
        return
    out.mkdir(parents=True, exist_ok=True)
    if config.overwrite:
        runfolder.clear(out)
    checkpoint.remove_partial(out)
    write_text_atomic(out / "config.yaml", runfolder.config_yaml(config, recipe))
    write_folder_atomic(out / "tokenizer", lambda folder: tokenizer.save_pretrained(str(folder)))
    runlog.commit(out / "train.log")


def save_checkpoint(training: Training, state: TrainState) -> Path:
    """Checkpoint the run at `state` (atomically; the main process writes, every process must call this);
    returns its folder."""
    accelerator = training.accelerator
    model = training.model
    # Gathered whole when sharded: collectives, so every process takes part before the main one writes.
    adapter = distributed.adapter_state(model)
    optimizer = distributed.optimizer_state(model, training.optimizer.optimizer)

    def write(folder: Path) -> None:
        model.save_pretrained(str(folder / "adapter"), state_dict=adapter)
        torch.save(optimizer, folder / "optimizer.pt")
        torch.save(training.scheduler.state_dict(), folder / "scheduler.pt")
        torch.save(checkpoint.rng_state(), folder / "rng.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), folder / "scaler.pt")
        (folder / "state.json").write_text(json.dumps(
            {**asdict(state), "samples_before": training.samples_before}, indent=2) + "\n")
        (folder / "config.yaml").write_text(runfolder.config_yaml(training.config))

    path = checkpoint.folder(training.out, state.step)
    if accelerator.is_main_process:
        checkpoint.save(training.out, state.step, write, training.config.train.keep_checkpoints)
        log.info("step %d: checkpoint %s", state.step, path)
    accelerator.wait_for_everyone()  # no process reads checkpoints or stops before this one is complete
    return path


def _save_results(out: Path, model, adapter: dict | None, samples: list[dict], state: TrainState,
                  summary: dict) -> None:
    """The run's adapter (`adapter` holds its tensors when they were gathered from shards), samples, summary."""
    try:
        write_folder_atomic(out / "adapter", lambda folder: model.save_pretrained(str(folder), state_dict=adapter))
        if samples:
            write_text_atomic(out / "samples.json", json.dumps(samples, indent=2) + "\n")
        write_text_atomic(out / "summary.json", json.dumps({**asdict(state), **summary}, indent=2) + "\n")
    except OSError as e:
        found = checkpoint.complete_checkpoints(out)
        kept = f"checkpoint {found[-1]} holds the trained weights" if found else "no checkpoint holds them"
        raise QloraError(checkpoint.no_space_message(e, f"the adapter to {out}", kept)) from e


def _write_report(out: Path) -> None:
    """The run's report.html / report.png; a failure to draw it is logged, never fatal to a finished run."""
    from qlora.report import write_report

    try:
        png, html = write_report(out)
        log.info("report: %s (and %s)", html, png.name)
    except (QloraError, OSError, ValueError) as e:
        log.warning("the run finished, but its report could not be written (%s); "
                    "qlora report %s retries", str(e).splitlines()[0], out)


def train_loop(training: Training, state: TrainState) -> None:
    """Run optimizer steps from `state` up to train.max_steps, checkpointing as configured.

    Stops early, after checkpointing, on SIGINT / SIGTERM (raising Interrupted), and on a non-finite loss
    (raising QloraError) unless train.on_nonfinite_loss=skip.
    """
    cfg, config, accelerator = training.config.train, training.config, training.accelerator
    batches = _batches(training.train_loader, training.sampler, state)
    trainable = [p for p in training.model.parameters() if p.requires_grad]
    evaluate_now = training.eval_loader is not None and cfg.eval_every_steps > 0
    progress = Progress(cfg, accelerator.is_main_process, state.step)
    if evaluate_now and state.step == 0:
        state.first_eval_loss = state.final_eval_loss = _evaluate(training)
        training.metrics.write({"step": 0, "eval_loss": state.first_eval_loss})
        progress.write(f"step 0: eval loss {state.first_eval_loss:.4f} (perplexity "
                       f"{perplexity(state.first_eval_loss):.2f}) on {len(training.eval_loader.dataset)} held-out "
                       f"sequences, {training.eval_seconds:.1f}s")
    window_start, window_tokens = time.perf_counter(), 0
    nonfinite_in_a_row = 0
    saved_at = state.step if state.step > 0 else None  # a resumed run starts on a checkpoint
    stop = False
    training.loss.train()
    with _StopSignals() as signals:
        while state.step < cfg.max_steps and not stop:
            try:
                loss, n_trained, n_seen, grad_norm = _step(training, batches, trainable)
            except torch.OutOfMemoryError as e:
                raise QloraError(_oom_message(config, state.step + 1)) from e
            finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
            if finite:
                training.optimizer.step()
                nonfinite_in_a_row = 0
            training.optimizer.zero_grad(set_to_none=True)
            training.scheduler.step()
            state.step += 1
            state.tokens_trained += n_trained
            state.tokens_seen += n_seen
            window_tokens += n_seen
            if not finite:
                nonfinite_in_a_row += 1
                state.skipped_steps += 1
                _handle_nonfinite(training, state, loss, grad_norm, nonfinite_in_a_row)

            last = state.step == cfg.max_steps
            if cfg.log_every_steps and (state.step % cfg.log_every_steps == 0 or last or state.step == 1):
                tokens_per_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                row = _train_row(training, state, loss, grad_norm, tokens_per_s)
                training.metrics.write(row)
                progress.show(row)
                window_start, window_tokens = time.perf_counter(), 0
            if evaluate_now and (state.step % cfg.eval_every_steps == 0 or last):
                state.final_eval_loss = _evaluate(training)
                training.metrics.write({"step": state.step, "eval_loss": state.final_eval_loss})
                progress.write(f"step {state.step}: eval loss {state.final_eval_loss:.4f} "
                               f"(perplexity {perplexity(state.final_eval_loss):.2f})")
                window_start = time.perf_counter()  # eval time is not training throughput
            if last or (cfg.save_every_steps and state.step % cfg.save_every_steps == 0):
                save_checkpoint(training, state)
                saved_at = state.step
                window_start = time.perf_counter()
            progress.update(1)
            # Every process stops after the same step, whichever of them the signal reached.
            stop = distributed.agree(accelerator, signals.received is not None)
        progress.close()
        if stop and state.step < cfg.max_steps:
            signum = signals.received or signal.SIGTERM
            path = checkpoint.folder(training.out, state.step) if saved_at == state.step \
                else save_checkpoint(training, state)
            raise Interrupted(f"stopped by {signal.Signals(signum).name} after step {state.step}; "
                              f"checkpoint {path} saved. To continue, run the same command with "
                              f"output_dir={training.out} resume=auto", signum)


def _train_row(training: Training, state: TrainState, loss: float, grad_norm: float | None,
               tokens_per_s: float) -> dict:
    row = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": training.scheduler.get_last_lr()[0],
           "tokens_per_s": tokens_per_s, "tokens_seen": state.tokens_seen}
    if grad_norm is not None:
        row["grad_norm"] = grad_norm
    row["memory_gb"] = memory.peak_gb(training.accelerator.device)
    return row


def _step(training: Training, batches, trainable) -> tuple[float, int, int, float | None]:
    """Forward and backward over one optimizer step's micro batches, gradients clipped; the optimizer is not
    stepped. Returns the loss per trained token, trained and seen token counts, and the gradient norm."""
    config, accelerator = training.config, training.accelerator
    # Fetch the step's micro batches first, so each one's loss is weighted by its share of the step's trained
    # tokens (a plain mean of micro-batch means over-weights short sequences).
    micro = [next(batches) for _ in range(config.train.grad_accum_steps)]
    # Counted on the host, before the batches move to the device: no device sync. Then summed over processes.
    n_trained, n_seen = _sum_over_processes(accelerator, [sum(scored_tokens(b["labels"]) for b in micro),
                                                          sum(int(b["attention_mask"].sum()) for b in micro)])
    # DDP and FSDP average gradients over the processes; scaling by their number makes the step's gradient the
    # single-process one: every process's summed token loss over all the step's trained tokens.
    scale = accelerator.num_processes / max(n_trained, 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro):
        with _maybe_no_sync(accelerator, training.loss, sync=i == len(micro) - 1), accelerator.autocast(), \
                neftune.noisy(training.model, batch):
            loss = training.loss(**_loss_inputs(batch, accelerator.device))
            accelerator.backward(loss * scale)
        loss_sum += loss.detach()
    if accelerator.num_processes > 1:
        loss_sum = accelerator.reduce(loss_sum, "sum")
    if config.optim.max_grad_norm <= 0:
        return loss_sum.item() / max(n_trained, 1), n_trained, n_seen, None
    norm = distributed.full(accelerator.clip_grad_norm_(trainable, config.optim.max_grad_norm))
    loss_value, grad_norm = torch.stack([loss_sum.float(), norm.float()]).tolist()  # one wait for the device
    return loss_value / max(n_trained, 1), n_trained, n_seen, grad_norm


def _loss_inputs(batch: dict[str, torch.Tensor], device: torch.device, rows: int | None = None,
                 tokens: int | None = None) -> dict[str, torch.Tensor]:
    """The loss module's arguments for a batch (or its first rows x tokens), on `device`."""
    batch = {k: v[:rows, :tokens].to(device, non_blocking=True) for k, v in batch.items()}
    return {**qdata.model_inputs(batch), "labels": batch["labels"]}


def _sum_over_processes(accelerator: Accelerator, counts: list[int]) -> list[int]:
    if accelerator.num_processes == 1:
        return counts
    return accelerator.reduce(torch.tensor(counts, device=accelerator.device), "sum").tolist()


def _handle_nonfinite(training: Training, state: TrainState, loss: float, grad_norm: float | None,
                      in_a_row: int) -> None:
    """A step whose loss or gradient norm is NaN / inf was not applied: stop, or go on per the config."""
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    found = checkpoint.complete_checkpoints(training.out)
    good = f"the newest checkpoint is {found[-1]} (resume=auto continues from it)" if found \
        else "no checkpoint was written yet"
    if training.config.train.on_nonfinite_loss == OnNonFinite.stop:
        raise QloraError(f"{what} at step {state.step}, so training stopped there without applying it; {good}. "
                         "Lower optim.lr, keep optim.max_grad_norm > 0, or set train.on_nonfinite_loss=skip")
    log.warning("step %d: %s; update skipped (%d skipped in all)", state.step, what, state.skipped_steps)
    if in_a_row >= MAX_NONFINITE_IN_A_ROW:
        raise QloraError(f"{what} at {in_a_row} steps in a row (up to step {state.step}): training has diverged; "
                         f"{good}. Lower optim.lr")


MAX_NONFINITE_IN_A_ROW = 10


def _oom_message(config: Config, step: int) -> str:
    t = config.train
    advice = [f"train.micro_batch_size={t.micro_batch_size} (raise train.grad_accum_steps to keep the batch)",
              f"train.seq_len={t.seq_len}"]
    if t.gradient_checkpointing is not True:
        advice.append("or set train.gradient_checkpointing=true")
    return f"out of GPU memory in training step {step}; lower {', '.join(advice)}"


def _evaluate(training: Training) -> float:
    """Mean loss per trained token over the eval split (its first train.eval_max_sequences sequences), computed by
    the training loss module: with train.loss_chunk_tokens no full logits, so evaluation needs no more memory than a
    training step."""
    # Every process scores the whole (bounded) eval split with the same weights: the same loss everywhere, and
    # under FSDP the forwards every process must take part in.
    t0 = time.perf_counter()
    loss = score(training.model, training.eval_loader, autocast=autocast_dtype(training.config.train.mixed_precision),
                 loss=training.loss).mean_loss
    training.eval_seconds += time.perf_counter() - t0
    return loss


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

    The second sample of a packed row must give the same logits as on its own. The same row as one sequence
    (what attention that ignores where samples start computes) sets the scale of a leak.
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
    leaky = model(input_ids=ids, use_cache=False).logits[0, starts[1]:end]
    model.train(was_training)
    error, leak = (packed - alone).abs().max().item(), (leaky.float() - alone).abs().max().item()
    log.info("packing: a packed sample's logits match it alone to %.2g (a leak across samples would be %.2g)",
             error, leak)
    if error > max(0.1 * leak, 1e-5):
        raise QloraError(f"attention implementation {model.config._attn_implementation!r} lets packed samples "
                         "attend to each other; use model.attn_implementation=sdpa (or eager, flash_attention_2), "
                         "train.per_sample_attention=false, or data.packing=false")


def _batches(loader, sampler: qdata.LengthGroupedBatches, state: TrainState):
    """Batches forever from the data position in `state` (epoch, batch), which advances with each one."""
    while True:
        sampler.start_at(state.epoch, state.batch)
        for batch in loader:
            state.batch += 1
            yield batch
        state.epoch += 1
        state.batch = 0


class _StopSignals:
    """Catch SIGINT / SIGTERM while training: the current step finishes, then the loop checkpoints and stops.

    A second signal acts at once (checkpoints are atomic, so even that loses nothing saved).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._receive) for s in self.SIGNALS}
        return self

    def _receive(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, self.previous[signum])
        log.warning("%s: finishing step, then saving a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _maybe_no_sync(accelerator, model, sync: bool):
    from contextlib import nullcontext

    return nullcontext() if sync else accelerator.no_sync(model)


class Progress:
    """One progress bar on a terminal (step, loss, lr, tokens/s, memory, ETA); elsewhere, or with
    train.progress=false, one log line per metrics row, so logs and CI get no bar redraws."""

    def __init__(self, cfg, main_process: bool, start: int) -> None:
        from tqdm.auto import tqdm

        self.total, self.start, self.began = cfg.max_steps, start, time.perf_counter()
        self.main = main_process
        self.bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (cfg.progress and main_process and sys.stderr.isatty()))

    def show(self, row: dict) -> None:
        postfix = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_s']:.0f}",
                   "mem": f"{row['memory_gb']:.2f}G"}
        if not self.bar.disable:
            self.bar.set_postfix(postfix, refresh=False)
        elif self.main:
            done = row["step"] - self.start
            eta = (time.perf_counter() - self.began) / done * (self.total - row["step"]) if done > 0 else 0.0
            log.info("step %d/%d  loss %s  lr %s  %s tokens/s  %s GiB  eta %s", row["step"], self.total,
                     postfix["loss"], postfix["lr"], postfix["tok/s"], f"{row['memory_gb']:.2f}",
                     time.strftime("%H:%M:%S", time.gmtime(eta)))

    def update(self, n: int) -> None:
        self.bar.update(n)

    def write(self, message: str) -> None:
        if not self.bar.disable:
            self.bar.write(message)
        elif self.main:
            log.info("%s", message)

    def close(self) -> None:
        self.bar.close()


def _log_base(model, config: Config, seconds: float) -> QuantReport | None:
    """Log what the base costs; its quantization report (None when unquantized)."""
    if config.quant.method.value == "none":
        n = sum(p.numel() for p in model.parameters())
        log.info("base %s loaded unquantized in %.1fs: %s parameters, %.1f MiB", config.model.name_or_path, seconds,
                 f"{n:,}", model.get_memory_footprint() / 2**20)
        return None
    report = quant_report(model)
    log.info("base %s loaded as %s%s in %.1fs: %s parameters quantized at %.3f bits each, %s kept in %s; "
             "%.1f MiB in all", config.model.name_or_path, config.quant.method.value,
             "+double-quant" if config.quant.double_quant else "", seconds, f"{report.quantized_params:,}",
             report.bits_per_quantized_param, f"{report.other_params:,}", _name(compute_dtype(config.quant,
             model.device)), report.total_bytes / 2**20)
    return report


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
