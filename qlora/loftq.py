"""LoftQ initialisation on a 4-bit base: the adapter starts as the best rank-r fix of the base's quantization error.

For each adapted 4-bit layer, with W the checkpoint's float weight and Q the weight the 4-bit layer multiplies by
(dequantized as its forward does), the residual W - Q is decomposed by SVD and B @ A is set to its rank-r truncation
divided by the adapter's scaling, so that Q + scaling * B @ A is the closest a rank-r adapter can bring the layer to
W (Eckart-Young; Li et al. 2023, LoftQ, with the base kept as the checkpoint's 4-bit weights).

peft's own `replace_lora_weights_loftq` (0.21) does the same decomposition but computes on CUDA only and ignores
the adapter's scaling (lora.alpha / r): at the usual alpha = 2r it doubles the correction, and the error it leaves
is exactly the error it started from.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from qlora.config import ModelConfig
from qlora.errors import QloraError

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's name for the one adapter a run trains


@dataclass
class LoftqReport:
    """What LoftQ did: layers set, and the weight error ||W - (Q + scaling * B @ A)||_F summed in quadrature
    over them, before (B = 0) and after."""

    layers: int
    error_before: float
    error_after: float
    seconds: float

    @property
    def reduction(self) -> float:
        """Share of the Frobenius error removed."""
        return 1.0 - self.error_after / self.error_before if self.error_before else 0.0


@torch.no_grad()
def loftq_residual_factors(weight: torch.Tensor, quantized: torch.Tensor, r: int,
                           scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in] and B [out, r] with scaling * B @ A the rank-r SVD truncation of weight - quantized (float32)."""
    residual = weight.float() - quantized.float()
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = (s[:r] / scaling).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root


@torch.no_grad()
def apply_loftq(model, base: ModelConfig) -> LoftqReport:
    """Set every 4-bit LoRA layer's A and B of the peft `model` by LoftQ, reading the float weights of `base` from
    its safetensors one tensor at a time.

    Raises:
        QloraError: the checkpoint has no safetensors (or is itself quantized), or no adapted layer is 4-bit.
    """
    from peft.tuners.lora import LoraLayer

    from qlora.export.merge import OriginalWeights, dequantized_weight

    started = time.perf_counter()
    try:
        original = OriginalWeights(base)
    except QloraError as e:
        raise QloraError(f"lora.init=loftq reads the float weights: {str(e).split('; use ')[0]}; use lora.init=default"
                         ) from e
    layers, before, after = 0, 0.0, 0.0
    for name, module in model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
            continue
        layer = module.get_base_layer()
        if type(layer.weight).__name__ != "Params4bit":
            continue
        quantized = dequantized_weight(layer).float()
        weight = original.get(f"{name}.weight").to(quantized.device, torch.float32)
        a, b = loftq_residual_factors(weight, quantized, module.r[ADAPTER], module.scaling[ADAPTER])
        lora_a, lora_b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
        lora_a.copy_(a.to(lora_a.dtype))
        lora_b.copy_(b.to(lora_b.dtype))
        residual = weight - quantized
        before += float(residual.square().sum())
        after += float((residual - module.scaling[ADAPTER] * (lora_b.float() @ lora_a.float())).square().sum())
        layers += 1
        del weight, quantized, residual
    if not layers:
        raise QloraError("lora.init=loftq found no 4-bit layer among the adapted ones; use quant=nf4 (or fp4) or "
                         "lora.init=default")
    return LoftqReport(layers, before ** 0.5, after ** 0.5, time.perf_counter() - started)
