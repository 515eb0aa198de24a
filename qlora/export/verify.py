"""Does the export compute what was trained? Next-token distributions of two models on the same probe text.

The probe is held-out data: the run's eval split (its trained tokens score perplexity), or, when the run's data
is not at hand, a fixed text scored on every token. Logits of the reference are kept on the CPU in float32, so
the model that produced them can be freed before the next one loads.

A bfloat16 export cannot equal the trained model: rounding the weights alone moves a real model's predictions
by more than some wrong merges do. So the reference is the trained model as its merge, stored in the export's
dtype, computes (`as_merged`), and a right export matches it to floating-point operation order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qlora.config import Config
from qlora.errors import QloraError, first_line
from qlora.evaluation import scored_tokens, token_loss_sum
from qlora.metrics import perplexity

log = logging.getLogger(__name__)


PROBE_TEXT = (
    "The water cycle describes how water moves through the environment. Heat from the sun evaporates water from "
    "oceans, lakes and rivers; the vapour rises, cools and condenses into clouds, and returns to the ground as rain "
    "or snow. Some of it soaks into the soil and feeds plants and springs, some flows back to the sea in rivers, and "
    "the cycle begins again. Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nName three primary colors.\n\n### Response:\nRed, blue and yellow."
)


@dataclass
class Probe:
    """Token sequences to compare models on, with the positions whose next token is scored."""

    sequences: list[torch.Tensor]
    """1-D input ids, one sequence per forward pass (no padding)."""
    labels: list[torch.Tensor]
    """Same shape; IGNORE_INDEX where the next-token prediction is not scored for perplexity."""
    source: str


def probe(config: Config, tokenizer, samples: int, seq_len: int) -> Probe:
    """Up to `samples` held-out sequences of the run's data, else the fixed probe text."""
    from qlora import data as qdata

    seq_len = min(seq_len, config.train.seq_len)
    try:
        loaded = qdata.load(config.data, tokenizer, seq_len=config.train.seq_len, seed=config.seed,
                            cache_dir=Path(config.cache_dir).expanduser())
        examples = loaded.eval or loaded.train
        where = "eval split" if loaded.eval else "training data (the run had no eval split)"
    except (QloraError, OSError) as e:
        log.warning("the run's data is not available (%s); verifying on a fixed probe text", first_line(e))
        examples = []
    if examples:
        chosen = examples[:samples]
        return Probe([torch.tensor(e.input_ids[:seq_len], dtype=torch.long) for e in chosen],
                     [torch.tensor(e.labels[:seq_len], dtype=torch.long) for e in chosen],
                     f"{len(chosen)} sequences of the run's {where} ({config.data.path})")
    ids = torch.tensor(tokenizer(PROBE_TEXT)["input_ids"][:seq_len])
    return Probe([ids], [ids.clone()], "a fixed probe text")


@torch.no_grad()
def logits_of(model, probe: Probe, autocast: torch.dtype | None = None) -> list[torch.Tensor]:
    """The model's logits for each probe sequence, float32 on the CPU."""
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    was_training = model.training
    model.eval()
    out = []
    for ids in probe.sequences:
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0]
        out.append(logits.float().cpu())
    model.train(was_training)
    return out


@dataclass
class Comparison:
    """How far a candidate's next-token distributions are from a reference's, over every probe position."""

    max_abs_logit_diff: float
    mean_kl: float
    """KL(reference || candidate) in nats, averaged over positions."""
    top1_agreement: float
    """Share of positions where both models' most likely next token is the same."""
    perplexity_reference: float
    perplexity_candidate: float

    def row(self) -> dict:
        return {k: float(f"{v:.6g}") for k, v in asdict(self).items()}


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor], probe: Probe) -> Comparison:
    """Compare two models' logits (from `logits_of`) on the same probe."""
    max_diff, kl_sum, agree, positions = 0.0, 0.0, 0, 0
    nll = {"reference": 0.0, "candidate": 0.0}
    scored = 0
    for ref, cand, labels in zip(reference, candidate, probe.labels, strict=True):
        if ref.shape != cand.shape:
            raise QloraError(f"the two models disagree on the vocabulary ({ref.shape[-1]} vs {cand.shape[-1]} "
                             "logits); the export does not match the trained model")
        max_diff = max(max_diff, (ref - cand).abs().max().item())
        log_p, log_q = F.log_softmax(ref.double(), -1), F.log_softmax(cand.double(), -1)  # KL of ~1e-9 is not noise
        kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        positions += ref.shape[0]
        for key, log_probs in (("reference", log_p), ("candidate", log_q)):  # perplexity as `qlora eval` counts it
            nll[key] += token_loss_sum(log_probs[None], labels[None]).item()
        scored += scored_tokens(labels[None])
    scored = max(scored, 1)
    return Comparison(max_diff, kl_sum / positions, agree / positions,
                      perplexity(nll["reference"] / scored), perplexity(nll["candidate"] / scored))


def stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor`'s values as a `dtype` checkpoint holds them, read back in float32 (an exact upcast)."""
    return tensor.detach().to(dtype).float()


@contextmanager
def as_merged(model, dtype: torch.dtype) -> Iterator[None]:
    """Inside the block, the peft `model` computes what its merge, stored in `dtype` and loaded in float32, would.

    The reference an export is checked against: the trained model itself, changed only by the rounding the
    checkpoint's dtype applies, so a right merge differs from it by floating-point operation order alone. Every
    adapted layer multiplies by stored(W + dW), with W the base weight as its forward sees it (bitsandbytes'
    dequantization of the codes, or the plain weight) and dW peft's own `get_delta_weight` (DoRA: each row then
    rescaled to the trained magnitude); a quantized layer without an adapter by stored(W). Every other floating
    parameter and persistent buffer (norms, embeddings, modules_to_save copies) holds its stored value in float32,
    as the export loaded with `dtype=torch.float32` does, and gets its own tensor back, untouched, on exit. A
    merged weight exists only during its layer's forward, so memory grows by one dequantized layer.

    Raises:
        QloraError: LoRA on a layer type other than linear or embedding (nothing to model it with).
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    from qlora.export.merge import ADAPTER

    hooks, saved_params, saved_buffers = [], [], []
    covered: list[str] = []  # modules whose output a hook computes: their own tensors are not rounded in place
    try:
        for name, module in model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in covered):
                continue
            if isinstance(module, LoraLayer):
                hooks.append(module.register_forward_hook(_merged_forward(module, name, dtype, ADAPTER)))
                covered.append(name)
            elif isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
                hooks.append(module.register_forward_hook(_merged_forward(module, name, dtype, None)))
                covered.append(name)
        for name, param in model.named_parameters():
            if param.is_floating_point() and not any(name.startswith(prefix + ".") for prefix in covered):
                saved_params.append((param, param.data))
                param.data = stored(param.data, dtype)
        for name, buffer in model.named_buffers():
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            # non-persistent buffers (rotary tables) are not in the checkpoint: transformers recomputes them at load
            if buffer.is_floating_point() and leaf not in owner._non_persistent_buffers_set \
                    and not any(name.startswith(prefix + ".") for prefix in covered):
                saved_buffers.append((owner, leaf, buffer))
                owner._buffers[leaf] = stored(buffer, dtype)
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for param, data in saved_params:
            param.data = data
        for owner, leaf, buffer in saved_buffers:
            owner._buffers[leaf] = buffer


def _merged_forward(module, name: str, dtype: torch.dtype, adapter: str | None):
    """A forward hook that replaces the layer's output with the stored merged weight's."""
    from peft.utils.integrations import dequantize_bnb_weight

    base = module.get_base_layer() if adapter is not None else module
    embedding = isinstance(base, torch.nn.Embedding)
    if not (embedding or isinstance(base, torch.nn.Linear)):  # bitsandbytes' layers are nn.Linear subclasses
        raise QloraError(f"LoRA adapts {name}, a {type(base).__name__} layer; export verification models linear "
                         "and embedding layers only. Export with export.format=adapter")

    @torch.no_grad()
    def merged_weight() -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = base.weight
        if type(weight).__name__ in ("Params4bit", "Int8Params"):  # peft's dequantize_module_weight re-wraps int8
            weight = dequantize_bnb_weight(weight, state=getattr(base, "state", None))
        weight = weight.float()
        bias = base.bias.float() if getattr(base, "bias", None) is not None else None
        if adapter is not None:
            delta = module.get_delta_weight(adapter).float()
            if module.use_dora.get(adapter):  # peft's own weight norm, of the unmerged weight as forward takes it
                magnitude = module.lora_magnitude_vector[adapter]
                norm = magnitude.get_weight_norm(weight, delta, scaling=1).float()
                weight = (magnitude.weight.float() / norm).unsqueeze(1) * (weight + delta)
            else:
                weight = weight + delta
            if getattr(module, "lora_bias", {}).get(adapter):
                bias = bias + module.lora_B[adapter].bias.float()
        return stored(weight, dtype), None if bias is None else stored(bias, dtype)

    def hook(_module, args, _output):
        weight, bias = merged_weight()
        x = args[0]
        if embedding:
            return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                               base.sparse)
        # under autocast F.linear casts both to the autocast dtype, as the export's nn.Linear does
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    return hook
