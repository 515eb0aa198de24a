"""LoRA adapters through peft, on the modules the config names (all linear layers but the head by default)."""

from __future__ import annotations

import logging

from torch import nn

from qlora.config import LoraConfig
from qlora.errors import QloraError

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"


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
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, peft_config)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%g on %s: %s trainable of %s parameters (%.3f%%)",
             cfg.r, cfg.alpha, ", ".join(targets), f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model
