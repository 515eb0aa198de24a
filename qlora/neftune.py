"""NEFTune (Jain et al. 2023): uniform noise on the input embeddings of training forwards.

Each position of a sample of L real tokens gets noise uniform in [-1, 1] x alpha / sqrt(L x hidden) on its embedding:
L is the sample's own length (a packed row holds several samples, told apart by position ids restarting at 0), and
padded positions get none. The noise is added only inside `noisy(model, batch)`, which the training step wraps
around its forward, and only while the embeddings are in training mode: evaluation, generation and export never
see it (export loads the adapter afresh, without this hook).

    neftune.attach(peft_model, alpha=5.0)           # once, after the adapter is attached
    with neftune.noisy(peft_model, batch):           # a training forward
        loss = loss_module(**inputs)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class _Noise:
    """The hook on the input embeddings, and the per-position scale of the batch being trained."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.scale: torch.Tensor | None = None  # [batch, tokens]: alpha / sqrt(L x hidden), 0 on padding

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
        if self.scale is None or not module.training:
            return None
        if self.scale.shape != output.shape[:2]:
            raise AssertionError(f"NEFTune: scale {tuple(self.scale.shape)} for embeddings {tuple(output.shape)}")
        noise = torch.empty_like(output).uniform_(-1, 1)
        return output + noise * self.scale[..., None].to(output.dtype)


def attach(model: nn.Module, alpha: float | None) -> None:
    """Register NEFTune with noise level `alpha` on `model`'s input embeddings (None: nothing)."""
    if alpha is None:
        return
    embeddings = model.get_input_embeddings()
    noise = _Noise(alpha)
    embeddings.register_forward_hook(noise)
    embeddings._qlora_neftune = noise


def scale(attention_mask: torch.Tensor, position_ids: torch.Tensor | None, alpha: float,
          hidden: int) -> torch.Tensor:
    """alpha / sqrt(L x hidden) at each position, L the real length of the sample it belongs to; 0 on padding.

    Without position ids every row is one sample; with them, a sample starts wherever the position is 0.
    """
    mask = attention_mask.to(torch.float32)
    if position_ids is None:
        segment = torch.zeros_like(attention_mask, dtype=torch.long)
    else:
        segment = (position_ids == 0).long().cumsum(dim=1) - 1
        segment = segment.clamp(min=0)  # a row that does not start at position 0 (never made by the collator)
    lengths = torch.zeros_like(mask).scatter_add_(1, segment, mask).gather(1, segment)
    return alpha / torch.sqrt(lengths.clamp(min=1) * hidden) * mask


@contextmanager
def noisy(model: nn.Module, batch: dict[str, torch.Tensor]):
    """Within: training forwards of `model` on `batch` (its attention_mask and position_ids, if packed) get
    NEFTune noise, if `attach` registered it."""
    noise = getattr(model.get_input_embeddings(), "_qlora_neftune", None)
    if noise is None:
        yield
        return
    hidden = model.get_input_embeddings().embedding_dim
    device = model.get_input_embeddings().weight.device
    noise.scale = scale(batch["attention_mask"], batch.get("position_ids"), noise.alpha, hidden).to(device)
    try:
        yield
    finally:
        noise.scale = None
