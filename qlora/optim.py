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


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """The trainable parameters of `model` as optimizer groups: one at optim.lr; with optim.lora_plus_ratio, the
    LoRA B matrices (lora_B, lora_embedding_B) in a second group at lr x ratio (LoRA+), after the first, so the
    first group's lr is the logged one."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if cfg.lora_plus_ratio is None:
        return [{"params": [p for _, p in trainable]}]
    is_b = [".lora_B." in name or ".lora_embedding_B." in name for name, _ in trainable]
    groups = [{"params": [p for (_, p), b in zip(trainable, is_b, strict=True) if not b]},
              {"params": [p for (_, p), b in zip(trainable, is_b, strict=True) if b],
               "lr": cfg.lr * cfg.lora_plus_ratio}]
    log.info("LoRA+: %d B matrices at lr %g (x%g), %d other tensors at lr %g", len(groups[1]["params"]),
             groups[1]["lr"], cfg.lora_plus_ratio, len(groups[0]["params"]), cfg.lr)
    return groups


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | list[dict], cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """The configured optimizer over `params`: the trainable LoRA parameters, or their groups (`param_groups`)."""
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
