"""Attention over packed rows, one sample at a time.

A packed row holds several samples, and transformers keeps them apart with a block-diagonal causal mask: SDPA then
scores every pair of the row's tokens and throws most of them away (at 512 tokens holding ~150-token samples,
about seven pairs in eight). `PER_SAMPLE_SDPA` is SDPA that computes each sample's causal attention on its own:
on a GPU in bf16 / fp16 one call of torch's variable-length flash attention over the whole batch, elsewhere one
causal SDPA call per sample. Whatever is not a packed batch (padded batches, generation with a KV cache, sliding
windows, softcapped scores) goes to transformers' SDPA with its mask, unchanged.

Samples are found as transformers finds them: a new one starts wherever the position ids do not count up by one
(and at every row's start). qlora's collator gives each packed sample, and a row's padding, positions from 0.

    use_per_sample_sdpa(model)   # a model loaded with attn_implementation="sdpa"

`check_packed_attention` proves, on a run's first batch, that whatever attention the model uses keeps packed samples
apart.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.9
    varlen_attn = None

from qlora.errors import QloraError

log = logging.getLogger(__name__)

PER_SAMPLE_SDPA = "qlora_per_sample_sdpa"

_segments_of: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""The segments of a position-ids tensor: every layer of a forward pass (and its recomputation) gets the same one."""


def use_per_sample_sdpa(model) -> bool:
    """Switch a transformers model loaded with SDPA attention to per-sample SDPA; False (and the model unchanged)
    when it uses another attention implementation (eager, flash_attention_2, ...)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(PER_SAMPLE_SDPA, per_sample_sdpa)
    AttentionMaskInterface.register(PER_SAMPLE_SDPA, sdpa_mask)  # what falls back to SDPA needs SDPA's mask
    model.set_attn_implementation(PER_SAMPLE_SDPA)
    return True


def per_sample_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query [batch, heads, tokens, dim], key and value [batch,
    kv heads, tokens, dim]; returns [batch, tokens, heads, dim]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = _packed_segments(position_ids, query, key) if _plain_causal(module, kwargs) else None
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    batch, heads, tokens, dim = query.shape
    gqa = key.shape[1] != heads
    q, k, v = (t.transpose(1, 2).reshape(batch * tokens, t.shape[1], dim) for t in (query, key, value))
    bounds, longest = segments
    if varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0:
        cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0), enable_gqa=gqa)
    else:
        out = torch.cat([
            F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                           dropout_p=dropout, is_causal=True, scale=scaling,
                                           enable_gqa=gqa).transpose(0, 1)
            for s, e in zip(bounds[:-1], bounds[1:], strict=True)])
    return out.reshape(batch, tokens, heads, dim), None


def _plain_causal(module: torch.nn.Module, kwargs: dict) -> bool:
    """Attention that per-sample causal SDPA computes exactly: causal, no sliding window, no softcap."""
    config = getattr(module, "config", None)
    return (getattr(module, "is_causal", True) and getattr(module, "sliding_window", None) is None
            and kwargs.get("softcap") is None and getattr(config, "attn_logit_softcapping", None) is None)


def _packed_segments(position_ids: torch.Tensor | None, query: torch.Tensor,
                     key: torch.Tensor) -> tuple[list[int], int] | None:
    """Where the samples of a packed batch start and end in the flattened [batch x tokens] order, and the longest
    one; None when the batch is not packed (no row holds a second sample) or keys are not the queries' tokens."""
    batch, _, tokens, _ = query.shape
    if position_ids is None or key.shape[2] != tokens or position_ids.shape[-1] != tokens:
        return None
    if position_ids not in _segments_of:
        positions = position_ids.expand(batch, tokens)
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        if not starts[:, 1:].any():
            _segments_of[position_ids] = None
        else:
            bounds = [*starts.flatten().nonzero().flatten().tolist(), batch * tokens]
            _segments_of[position_ids] = bounds, max(e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True))
    return _segments_of[position_ids]


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
