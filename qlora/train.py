"""The QLoRA fine-tuning recipe: one function that reads top to bottom, and the loop it owns.

config -> validate -> (checkpoint to resume) -> tokenizer -> data -> load + quantize base -> attach LoRA ->
the objective's module (qlora.objective: SFT, or DPO / ORPO / SimPO) -> optimizer -> (restore) -> commit the run
folder -> loop with checkpoints -> save.
Data comes before the weights so that a bad record stops the run before minutes of loading, and nothing is
written to output_dir before all of it has worked.

Beside it: qlora.resume (signals, continuing a checkpoint), qlora.progress (the bar, the last words).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from qlora import checkpoint, demo, distributed, hub, memory, neftune, resume, runfolder
from qlora import data as qdata
from qlora import objective as objectives
from qlora.attention import check_packed_attention, use_per_sample_sdpa
from qlora.checkpoint import TrainState
from qlora.composition import recipe_description, recipe_paths
from qlora.config import Config, DistStrategy, OnNonFinite, OptimConfig, TrainConfig, validate
from qlora.errors import QloraError
from qlora.evaluation import score, scored_tokens
from qlora.files import disk_full, out_of_space
from qlora.generate import greedy_answers
from qlora.lora import attach_lora, init_adapter
from qlora.loss import loss_inputs
from qlora.metrics import MetricsLog, NoMetrics, perplexity
from qlora.model import (
    autocast_dtype,
    check_model_config,
    compute_dtype,
    dtype_name,
    enable_checkpointing,
    load_base_model,
    load_tokenizer,
    log_base,
    max_positions,
    mixed_precision,
    prepare_kbit,
    with_attention,
)
from qlora.optim import build_optimizer, build_scheduler, param_groups
from qlora.plan import Plan, check_fits, checkpointed_layers, oom_message
from qlora.progress import Progress, log_outcome
from qlora.report import report_finished_run

log = logging.getLogger(__name__)


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


@dataclass(kw_only=True)
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
    processes = accelerator.num_processes
    set_seed(config.seed)
    log.info("qlora run -> %s (device %s, compute dtype %s, mixed precision %s; %s)%s", out, device,
             dtype_name(compute_dtype(config.quant, device)), accelerator.mixed_precision,
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
    config = dataclasses.replace(config, model=with_attention(config.model, model_config))
    tokenizer = load_tokenizer(config.model)

    config, data = _setup_data(config, tokenizer, accelerator, positions=max_positions(model_config))
    state = resume.state_to_resume(resumed, config)
    resume.check_processes(state, processes, config.force_resume)
    state.processes = processes
    memory_plan = check_fits(config, device.type)
    data = qdata.bounded_eval(data, config.data, config.train.eval_max_sequences)
    held_out = qdata.held_out_samples(data, config.data, config.train.samples_from_eval)
    train_loader, eval_loader = qdata.loaders(
        data, config.data, micro_batch_size=config.train.micro_batch_size, seq_len=config.train.seq_len,
        pad_id=tokenizer.pad_token_id, seed=config.seed, num_workers=config.train.num_workers,
        rank=accelerator.process_index, world=processes)

    model, base, checkpointed = _setup_model(config, device, memory_plan=memory_plan, fresh=resumed is None)
    trainable_count, total_count = model.get_nb_trainable_parameters()
    parameters = {"base": total_count - trainable_count, "quantized": base.quantized_params if base else 0,
                  "trainable": trainable_count}
    if config.data.packing:
        check_packed_attention(model, qdata.first_batch(train_loader), device)
    if resumed is not None:
        resume.restore_adapter(resumed, model)

    # What trains: the objective inside a module, so that DDP / FSDP see the whole forward (sharded here under FSDP)
    loss = objectives.loss_module(model, config)
    sharded = config.dist.strategy == DistStrategy.fsdp and processes > 1
    if sharded:
        # A pair batch's first two rows: a chosen and a rejected answer (of different pairs: it only runs FSDP's setup)
        distributed.shard(loss, config.dist, loss_inputs(qdata.first_batch(train_loader), device, tokens=8,
                                                         rows=2 if objectives.is_preference(config.objective) else 1))
    # After sharding, which replaces the parameters
    optimizer, scheduler = _setup_optimizer(model, config.optim, config.train, device=device, processes=processes,
                                            unit="pairs" if objectives.is_preference(config.objective) else "sequences")
    # The loaders stay as they are: each process's sampler already draws its own share, and _step moves batches.
    if sharded:
        optimizer = accelerator.prepare(optimizer)  # FSDP is applied above; accelerate would wrap the model in DDP
    else:
        loss, optimizer = accelerator.prepare(loss, optimizer)
    if resumed is not None:
        resume.restore_training(resumed, accelerator, model=model, optimizer=optimizer, scheduler=scheduler)
    if config.objective.precompute_reference:
        _precompute_reference(config, loss, train_loader, eval_loader, tokenizer.pad_token_id, accelerator)

    prompts = [qdata.prompt_ids(p, config.data, tokenizer) for p in config.train.sample_prompts]
    prompts += [s.ids for s in held_out]
    before = resumed.state.get("samples_before", []) if resumed else []
    if len(before) != len(prompts):  # a fresh run, or the sample prompts changed since the checkpoint
        before = greedy_answers(model, tokenizer, prompts, max_new_tokens=config.train.max_new_tokens, device=device)

    # Everything checked: from here on, output_dir holds this run
    accelerator.wait_for_everyone()  # every process has read output_dir (its checkpoints) before it changes
    if accelerator.is_main_process:
        with _stop_when_disk_full(out, model, optimizer):
            runfolder.commit(config, tokenizer, runlog, recipe)
        metrics = MetricsLog(out, config.train.loggers, config.train.project, out.resolve().name, asdict(config),
                             start=state.step, history=None if resumed is None
                             else checkpoint.run_dir_of(resumed.path) / "metrics.jsonl")
    else:
        metrics = NoMetrics()
    training = Training(config=config, out=out, accelerator=accelerator, model=model, loss=loss, optimizer=optimizer,
                        scheduler=scheduler, train_loader=train_loader, sampler=train_loader.batch_sampler,
                        eval_loader=eval_loader, metrics=metrics, samples_before=before)
    try:
        if resumed is not None:
            checkpoint.set_rng_state(resumed.rng)  # last: what the uninterrupted run would draw next
        with _stop_when_disk_full(out, model, optimizer):
            train_loop(training, state)
    finally:
        metrics.close()

    after = greedy_answers(model, tokenizer, prompts, max_new_tokens=config.train.max_new_tokens, device=device)
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
                   "checkpointed_layers": checkpointed, "processes": processes,
                   "global_batch": config.train.micro_batch_size * config.train.grad_accum_steps * processes}
        runfolder.save_results(out, model, adapter, samples=samples, summary={**asdict(state), **summary})
        if config.train.report:
            report_finished_run(out)
    accelerator.wait_for_everyone()
    log_outcome(samples, state, config.train, seconds=seconds, eval_seconds=training.eval_seconds,
                preference=objectives.is_preference(config.objective))
    log.info("saved adapter, tokenizer and config to %s", out)
    return RunResult(out, state, samples, model, tokenizer, optimizer.optimizer)


def _setup_data(config: Config, tokenizer, accelerator: Accelerator, *,
                positions: int | None) -> tuple[Config, qdata.TokenizedData]:
    """Tokenized (or read from the cache) and checked before any weights load; train.seq_len=auto is chosen from it
    (at most the model's `positions`). Returns the config with the autos as numbers, as a checkpoint records them."""
    qdata.use_chat_template(config.data, tokenizer)
    with accelerator.main_process_first():
        config = qdata.with_seq_len(config, tokenizer, positions)
        data = qdata.load(config.data, tokenizer, seq_len=config.train.seq_len, seed=config.seed,
                          cache_dir=Path(config.cache_dir).expanduser())
    log.info("data %s (%s): %s; %d train / %d eval sequences%s", config.data.path, config.data.format.value,
             data.stats.describe(config.train.seq_len), len(data.train), len(data.eval),
             ", packed" if config.data.packing else "")
    return config, data


def _setup_model(config: Config, device: torch.device, *, memory_plan: Plan | None, fresh: bool):
    """The base, quantized and frozen, with LoRA attached (initialised per lora.init when `fresh`, not resumed);
    its quantization report (None when unquantized) and the layers gradient checkpointing recomputes (None: all)."""
    t0 = time.perf_counter()
    model = load_base_model(config.model, config.quant, device,
                            distributed.storage_dtype(config.dist, compute_dtype(config.quant, device)))
    base = log_base(model, config.model, config.quant, time.perf_counter() - t0)
    if config.data.packing and config.train.per_sample_attention and use_per_sample_sdpa(model):
        log.info("attention: per packed sample (train.per_sample_attention)")
    if config.quant.method.value != "none" and config.train.prepare_kbit:
        model = prepare_kbit(model, config.train.float32_embeddings, config.lora.modules_to_save)
    checkpointed = enable_checkpointing(model, checkpointed_layers(config, device.type, memory_plan))
    model.config.use_cache = False
    model = attach_lora(model, config.lora)
    if fresh:
        init_adapter(model, config.lora, config.model)
    neftune.attach(model, config.train.neftune_alpha)
    return model, base, checkpointed


def _setup_optimizer(model, optim: OptimConfig, train: TrainConfig, *, device: torch.device, processes: int,
                     unit: str = "sequences"):
    """The optimizer over the trainable parameters, and its learning-rate schedule (logged with the batch, counted
    in `unit`)."""
    optimizer = build_optimizer(param_groups(model, optim), optim, device)
    scheduler = build_scheduler(optimizer, optim, train.max_steps)
    log.info("optimizer %s (lr %g, %s schedule, %d warmup steps, clip %g); batch %d x %d accumulation%s = %d "
             "%s", type(optimizer).__name__, optim.lr, optim.schedule.value, optim.warmup_steps,
             optim.max_grad_norm, train.micro_batch_size, train.grad_accum_steps,
             f" x {processes} processes" if processes > 1 else "",
             train.micro_batch_size * train.grad_accum_steps * processes, unit)
    return optimizer, scheduler


def _precompute_reference(config: Config, loss, train_loader, eval_loader, pad_id: int,
                          accelerator: Accelerator) -> None:
    """objective.precompute_reference: score every pair under the reference once, before training (from cache_dir
    when scored before), and give the scores to the loaders, whose batches then carry them."""
    module = accelerator.unwrap_model(loss)
    cache = Path(config.cache_dir).expanduser() / "reference" if config.data.cache else None
    t0 = time.perf_counter()
    accelerator.wait_for_everyone()  # every process sees the same cache (each one computes: FSDP's forwards need all)
    for loader, train_mode in ((train_loader, True), (eval_loader, False)):
        if loader is not None:
            loader.collate_fn.reference = objectives.reference_scores(
                module, loader.dataset, pad_id=pad_id, pairs_per_batch=config.train.micro_batch_size,
                device=accelerator.device, autocast=autocast_dtype(config.train.mixed_precision),
                train_mode=train_mode, cache=cache, write=accelerator.is_main_process,
                key_parts=objectives.reference_key(config, accelerator.device))
    log.info("reference log-probs of %d pairs precomputed in %.1fs (objective.precompute_reference)",
             len(train_loader.dataset) + (len(eval_loader.dataset) if eval_loader else 0), time.perf_counter() - t0)


@contextmanager
def _stop_when_disk_full(out: Path, model, optimizer) -> Iterator[None]:
    """A run-folder write (train.log, metrics.jsonl, config.yaml, the tokenizer) that finds the disk full stops the
    run with one line naming the folder, what the run still needs and the checkpoint that is intact (checkpoint
    writes say so themselves)."""
    try:
        yield
    except OSError as e:
        if not out_of_space(e):
            raise
        found = checkpoint.complete_checkpoints(out)
        kept = f"checkpoint {found[-1]} is intact" if found else "no checkpoint was written yet"
        needed = checkpoint.estimated_bytes(runfolder.trainable_state(model), optimizer.state_dict())
        raise QloraError(f"{disk_full(out, 'the run (its next checkpoint)', needed)}; {kept}. free disk space, then "
                         "continue with resume=auto") from e


def save_checkpoint(training: Training, state: TrainState) -> Path:
    """Checkpoint the run at `state` (atomically; the main process writes, every process must call this);
    returns its folder."""
    accelerator, model = training.accelerator, training.model
    # Gathered whole when sharded: collectives, so every process takes part before the main one writes.
    adapter = distributed.adapter_state(model)
    optimizer = distributed.optimizer_state(model, training.optimizer.optimizer)
    path = checkpoint.folder(training.out, state.step)
    if accelerator.is_main_process:
        checkpoint.save(training.out, state.step, lambda folder: checkpoint.write_parts(
            folder, model=model, adapter=adapter, optimizer=optimizer, scheduler=training.scheduler.state_dict(),
            scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            state={**asdict(state), "samples_before": training.samples_before},
            config_yaml=runfolder.config_yaml(training.config)), training.config.train.keep_checkpoints,
            needed=checkpoint.estimated_bytes(adapter if adapter is not None else runfolder.trainable_state(model),
                                              optimizer))
        log.info("step %d: checkpoint %s", state.step, path)
    accelerator.wait_for_everyone()  # no process reads checkpoints or stops before this one is complete
    return path


def train_loop(training: Training, state: TrainState) -> None:
    """Run optimizer steps from `state` up to train.max_steps, checkpointing as configured.

    Stops early, after checkpointing, on SIGINT / SIGTERM (raising Interrupted), and on a non-finite loss
    (raising QloraError) unless train.on_nonfinite_loss=skip.
    """
    cfg, accelerator = training.config.train, training.accelerator
    batches = qdata.batches_from(training.train_loader, training.sampler, state)
    trainable = [p for p in training.model.parameters() if p.requires_grad]
    evaluate_now = training.eval_loader is not None and cfg.eval_every_steps > 0
    progress = Progress(cfg, accelerator.is_main_process, state.step)
    if evaluate_now and state.step == 0:
        values = _evaluate(training)
        state.first_eval_loss = state.final_eval_loss = values["loss"]
        training.metrics.write({"step": 0, **{f"eval_{k}": v for k, v in values.items()}})
        progress.write(f"step 0: {_describe_eval(training, values)} on {len(training.eval_loader.dataset)} held-out "
                       f"{'pairs' if objectives.is_preference(training.config.objective) else 'sequences'}, "
                       f"{training.eval_seconds:.1f}s")
    window_start, window_tokens = time.perf_counter(), 0
    nonfinite_in_a_row = 0
    saved_at = state.step if state.step > 0 else None  # a resumed run starts on a checkpoint
    stop = False
    training.loss.train()
    with resume.StopSignals() as signals:
        while state.step < cfg.max_steps and not stop:
            try:
                values, n_trained, n_seen, grad_norm = _step(training, batches, trainable)
            except torch.OutOfMemoryError as e:
                raise QloraError(oom_message(cfg, state.step + 1)) from e
            loss = values["loss"]
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
                row = _train_row(training, state, values, grad_norm, tokens_per_s)
                training.metrics.write(row)
                progress.show(row)
                window_start, window_tokens = time.perf_counter(), 0
            if evaluate_now and (state.step % cfg.eval_every_steps == 0 or last):
                values = _evaluate(training)
                state.final_eval_loss = values["loss"]
                training.metrics.write({"step": state.step, **{f"eval_{k}": v for k, v in values.items()}})
                progress.write(f"step {state.step}: {_describe_eval(training, values)}")
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
            raise resume.Interrupted(f"stopped by {signal.Signals(signum).name} after step {state.step}; "
                                     f"checkpoint {path} saved. To continue, run the same command with "
                                     f"output_dir={training.out} resume=auto", signum)


def _train_row(training: Training, state: TrainState, values: dict[str, float], grad_norm: float | None,
               tokens_per_s: float) -> dict:
    row = {"step": state.step, "epoch": state.epoch, **values, "lr": training.scheduler.get_last_lr()[0],
           "tokens_per_s": tokens_per_s, "tokens_seen": state.tokens_seen}
    if grad_norm is not None:
        row["grad_norm"] = grad_norm
    row["memory_gb"] = memory.peak_gb(training.accelerator.device)
    return row


def _step(training: Training, batches, trainable) -> tuple[dict[str, float], int, int, float | None]:
    """Forward and backward over one optimizer step's micro batches, gradients clipped; the optimizer is not
    stepped. Returns the objective's metrics (its loss per trained token, or per pair), trained and seen token
    counts, and the gradient norm."""
    config, accelerator = training.config, training.accelerator
    # Fetch the step's micro batches first, so each one's loss is weighted by its share of the step's units, trained
    # tokens or pairs (a plain mean of micro-batch means over-weights short sequences).
    micro = [next(batches) for _ in range(config.train.grad_accum_steps)]
    # Counted on the host, before the batches move to the device: no device sync. Then summed over processes.
    n_units, n_trained, n_seen = distributed.sum_over_processes(accelerator, [
        sum(objectives.units(config.objective, b) for b in micro), sum(scored_tokens(b["labels"]) for b in micro),
        sum(int(b["attention_mask"].sum()) for b in micro)])
    # DDP and FSDP average gradients over the processes; scaling by their number makes the step's gradient the
    # single-process one: every process's summed loss over all the step's units.
    scale = accelerator.num_processes / max(n_units, 1)
    sums = None
    for i, batch in enumerate(micro):
        with distributed.maybe_no_sync(accelerator, training.loss, sync=i == len(micro) - 1), accelerator.autocast(), \
                neftune.noisy(training.model, batch):
            out = training.loss(**loss_inputs(batch, accelerator.device)).reshape(-1)  # [loss, other terms...]
            accelerator.backward(out[0] * scale)
        sums = out.detach() if sums is None else sums + out.detach()
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, "sum")
    if config.optim.max_grad_norm <= 0:
        return objectives.means(config.objective, sums.tolist(), n_units), n_trained, n_seen, None
    norm = distributed.full(accelerator.clip_grad_norm_(trainable, config.optim.max_grad_norm))
    *values, grad_norm = torch.cat([sums.float(), norm.float().reshape(1)]).tolist()  # one wait for the device
    return objectives.means(config.objective, values, n_units), n_trained, n_seen, grad_norm


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


def _evaluate(training: Training) -> dict[str, float]:
    """The objective's metrics over the eval split (its first train.eval_max_sequences sequences): the mean loss per
    trained token, or per pair with the rewards. Computed by the training loss module: with train.loss_chunk_tokens
    no full logits, so evaluation needs no more memory than a training step."""
    # Every process scores the whole (bounded) eval split with the same weights: the same loss everywhere, and
    # under FSDP the forwards every process must take part in.
    t0 = time.perf_counter()
    autocast, objective = autocast_dtype(training.config.train.mixed_precision), training.config.objective
    if objectives.is_preference(objective):
        values = objectives.evaluate(training.loss, objective, training.eval_loader,
                                     device=training.accelerator.device, autocast=autocast)
    else:
        values = {"loss": score(training.model, training.eval_loader, autocast=autocast, loss=training.loss).mean_loss}
    training.eval_seconds += time.perf_counter() - t0
    return values


def _describe_eval(training: Training, values: dict[str, float]) -> str:
    if objectives.is_preference(training.config.objective):
        return (f"eval loss {values['loss']:.4f}, reward accuracy {values['reward_accuracy']:.3f}, margin "
                f"{values['reward_margin']:.4f}")
    return f"eval loss {values['loss']:.4f} (perplexity {perplexity(values['loss']):.2f})"
