"""Stopping a run and continuing it.

SIGINT / SIGTERM while training let the current step finish; the loop then checkpoints and raises `Interrupted`.
A later run with resume= reads that checkpoint (qlora.checkpoint), checks that it fits this config and launch,
and puts the adapter, optimizer, schedule and scaler back, so it continues as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from contextlib import contextmanager

from accelerate import Accelerator

from qlora import checkpoint, distributed
from qlora.checkpoint import Checkpoint, TrainState
from qlora.config import Config
from qlora.errors import QloraError, first_line

log = logging.getLogger(__name__)


class Interrupted(QloraError):
    """SIGINT / SIGTERM stopped the run after a checkpoint was saved."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """Catch SIGINT / SIGTERM while training: the current step finishes, then the loop checkpoints and stops.

    A second signal acts at once (checkpoints are atomic, so even that loses nothing saved).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
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


def state_to_resume(resumed: Checkpoint | None, config: Config) -> TrainState:
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


def check_processes(state: TrainState, processes: int, force: bool) -> None:
    """A resumed run continues with as many processes as it had: the data position counts batches per process."""
    if state.step == 0 or state.processes == processes:
        return
    if not force:
        raise QloraError(f"the checkpoint was trained by {state.processes} process(es) and this run has {processes}; "
                         f"launch {state.processes}, or pass force_resume=true to continue near the same data position")
    log.warning("force_resume=true: %d processes continue a run trained by %d; the data position is rounded",
                processes, state.processes)
    state.batch = state.batch * state.processes // processes


def restore_adapter(resumed: Checkpoint, model) -> None:
    """Put the checkpoint's adapter weights into the fresh (not yet sharded) model."""
    from peft import set_peft_model_state_dict

    with _not_fitting(resumed):
        loaded = set_peft_model_state_dict(model, resumed.adapter)
        missing = [k for k in loaded.missing_keys if "lora_" in k or "modules_to_save" in k]
        if loaded.unexpected_keys or missing:
            raise ValueError(f"{len(loaded.unexpected_keys)} unexpected and {len(missing)} missing adapter tensors")


def restore_training(resumed: Checkpoint, accelerator: Accelerator, *, model, optimizer, scheduler) -> None:
    """Put the checkpoint's optimizer, schedule and gradient scaler state into the fresh run (`optimizer` as
    accelerate prepared it)."""
    with _not_fitting(resumed):
        distributed.load_optimizer_state(model, optimizer.optimizer, resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
        if resumed.scaler is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(resumed.scaler)


@contextmanager
def _not_fitting(resumed: Checkpoint):
    try:
        yield
    except (ValueError, RuntimeError, KeyError) as e:
        raise QloraError(f"checkpoint {resumed.path} does not fit this model ({first_line(e)}); resume "
                         "with the config that wrote it") from e
