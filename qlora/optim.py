"""Optimizers (bitsandbytes' paged / 8-bit ones, torch AdamW) and the learning-rate schedule."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable

import torch

from qlora.config import OptimConfig, OptimizerName, Schedule

log = logging.getLogger(__name__)

_BNB_CLASSES = {
    OptimizerName.paged_adamw_8bit: "PagedAdamW8bit",
    OptimizerName.paged_adamw_32bit: "PagedAdamW32bit",
    OptimizerName.paged_lion_8bit: "PagedLion8bit",
    OptimizerName.adamw_8bit: "AdamW8bit",
}


def is_paged(name: OptimizerName) -> bool:
    return name.value.startswith("paged_")


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """The configured optimizer over `params` (the trainable LoRA parameters)."""
    params = list(params)
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.name == OptimizerName.adamw:
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)

    import bitsandbytes as bnb

    cls = getattr(bnb.optim, _BNB_CLASSES[cfg.name])
    kwargs = dict(lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, min_8bit_size=cfg.min_8bit_size)
    if cfg.name != OptimizerName.paged_lion_8bit:
        kwargs["eps"] = cfg.eps
    if is_paged(cfg.name) and device.type != "cuda":
        # bitsandbytes pages optimizer state through CUDA unified memory; elsewhere it keeps state in
        # ordinary memory and warns on every parameter. Say it once instead.
        log.warning("optim.name=%s: paging needs CUDA; on %s the optimizer state is not paged", cfg.name.value,
                    device.type)
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    return cls(params, **kwargs)


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Multiplier of the peak lr at each optimizer step: linear warmup, then the configured shape."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == Schedule.constant:
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        if cfg.schedule == Schedule.linear:
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, max_steps))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore optimizer state saved by `state_dict()`, keeping paged optimizers paged.

    bitsandbytes' load_state_dict puts the saved moments back as ordinary device tensors, so after a resume a
    paged optimizer's state would silently stop paging (and hold its full size in GPU memory). Large moment
    buffers are moved back into paged (CUDA unified) memory, as bitsandbytes allocates them in the first step.
    """
    optimizer.load_state_dict(state)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    if not getattr(inner, "is_paged", False):
        return
    import bitsandbytes.functional as bnb_f

    for param, values in inner.state.items():
        if param.device.type != "cuda" or param.numel() < 1e5:  # bitsandbytes pages buffers of 1e5+ elements
            continue
        for key in ("state1", "state2"):
            value = values.get(key)
            if isinstance(value, torch.Tensor) and not getattr(value, "is_paged", False):
                paged = bnb_f.get_paged(*value.shape, dtype=value.dtype, device=param.device)
                paged.copy_(value)
                inner.page_mng.paged_tensors.append(paged)
                values[key] = paged
