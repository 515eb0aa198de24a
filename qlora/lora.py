"""LoRA adapters through peft, on the modules the config names (all linear layers but the head by default)."""

from __future__ import annotations

import logging
import time

from torch import nn

from qlora.config import LoraConfig, LoraInit, ModelConfig
from qlora.errors import QloraError

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"


PEFT_INIT = {LoraInit.default: True, LoraInit.gaussian: "gaussian", LoraInit.loftq: True}
"""peft's init_lora_weights for each lora.init this project runs (LoftQ then sets A and B: `init_adapter`)."""

INIT_DESCRIPTIONS = {
    LoraInit.default: "A Kaiming-uniform, B = 0",
    LoraInit.gaussian: "A normal with std 1/r, B = 0",
    LoraInit.loftq: "as default, then LoftQ sets A and B",
}


def init_adapter(model, cfg: LoraConfig, base: ModelConfig) -> None:
    """Whatever `lora.init` does after peft made the adapter: LoftQ's SVD of each layer's quantization error."""
    if cfg.init != LoraInit.loftq:
        return
    from qlora.loftq import apply_loftq

    report = apply_loftq(model, base)
    log.info("LoRA init loftq: %d layers; weight error ||W - (Q + BA)|| %.4g -> %.4g (%.1f%% less) in %.1fs",
             report.layers, report.error_before, report.error_after, 100 * report.reduction, report.seconds)


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the linear layers (bitsandbytes' 4/8-bit layers included), minus the output head."""
    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    return sorted(names)


def attach_lora(model: nn.Module, cfg: LoraConfig):  # -> peft.PeftModel
    """Wrap the frozen base in a peft PeftModel with trainable LoRA adapters on the configured modules."""
    import peft

    available = linear_module_names(model)
    targets = available if list(cfg.target_modules) == [ALL_LINEAR] else list(cfg.target_modules)
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise QloraError(f"lora.target_modules: {', '.join(unknown)} not linear layers of this model; "
                         f"choose from: {', '.join(available)} (or [all-linear])")
    peft_config = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_rslora=cfg.rslora,
        use_dora=cfg.dora,
        modules_to_save=list(cfg.modules_to_save) or None,
        init_lora_weights=PEFT_INIT[cfg.init],
        bias="none",
        task_type="CAUSAL_LM",
    )
    started = time.perf_counter()
    model = peft.get_peft_model(model, peft_config)
    log.info("LoRA init %s: %s (%.2fs)", cfg.init.value, INIT_DESCRIPTIONS[cfg.init],
             time.perf_counter() - started)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%g on %s: %s trainable of %s parameters (%.3f%%)",
             cfg.r, cfg.alpha, ", ".join(targets), f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model
