"""What a run shows while it trains: one progress bar on a terminal (step, loss, lr, tokens/s, memory, ETA);
elsewhere, or with train.progress=false, one log line per metrics row, so logs and CI get no bar redraws. And what
it says when it is done (`log_outcome`)."""

from __future__ import annotations

import logging
import sys
import time

from qlora.checkpoint import TrainState
from qlora.config import TrainConfig
from qlora.metrics import perplexity

log = logging.getLogger(__name__)


class Progress:
    """The bar (or the log lines) of one run's steps, from step `start` to train.max_steps."""

    def __init__(self, cfg: TrainConfig, main_process: bool, start: int) -> None:
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


def log_outcome(samples: list[dict], state: TrainState, cfg: TrainConfig, *, seconds: float,
                eval_seconds: float, preference: bool = False) -> None:
    """The samples before and after training, where the time went, and the eval loss from first to last."""
    for s in samples:
        reference = f"\n  reference: {s['reference']}" if "reference" in s else ""
        log.info("sample: %s%s\n  before: %s\n  after:  %s", s["prompt"], reference, s["before"] or "(nothing)",
                 s["after"] or "(nothing)")
    if eval_seconds:
        log.info("evaluation took %.0fs of %.0fs (%.0f%%; train.eval_max_sequences=%d, train.eval_every_steps=%d)",
                 eval_seconds, seconds, 100 * eval_seconds / seconds, cfg.eval_max_sequences, cfg.eval_every_steps)
    if state.first_eval_loss is not None and state.final_eval_loss is not None:
        if preference:
            log.info("eval loss %.4f -> %.4f (per pair)", state.first_eval_loss, state.final_eval_loss)
        else:
            log.info("eval loss %.4f -> %.4f (perplexity %.2f -> %.2f)", state.first_eval_loss, state.final_eval_loss,
                     perplexity(state.first_eval_loss), perplexity(state.final_eval_loss))
