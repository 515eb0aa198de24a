"""The frozen base: load any causal LM through transformers, quantized by bitsandbytes, and measure it.

bitsandbytes is imported only here and in `qlora.optim`, and only when a model is loaded, so the CLI and
config composition work on machines without it or without CUDA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from qlora import hub
from qlora.config import AUTO, Config, DType, MixedPrecision, ModelConfig, QuantConfig, QuantMethod
from qlora.errors import QloraError, first_line

log = logging.getLogger(__name__)

TORCH_DTYPES = {DType.bfloat16: torch.bfloat16, DType.float16: torch.float16, DType.float32: torch.float32}


def compute_dtype(quant: QuantConfig, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in: the configured one, or for `auto` bfloat16 on a GPU that has it, else float32."""
    if quant.compute_dtype != DType.auto:
        return TORCH_DTYPES[quant.compute_dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def mixed_precision(choice: MixedPrecision) -> str:
    """accelerate's mixed-precision mode for train.mixed_precision: auto is bf16 on a GPU that has it, else no."""
    if choice != MixedPrecision.auto:
        return choice.value
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def autocast_dtype(choice: MixedPrecision) -> torch.dtype | None:
    """The dtype training autocast to (None: no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision(choice))


def bnb_config(quant: QuantConfig, dtype: torch.dtype,
               storage: torch.dtype | None = None):  # -> transformers.BitsAndBytesConfig | None
    """transformers' BitsAndBytesConfig for the quant mode, or None for an unquantized base. `storage` is the
    dtype 4-bit weights are packed into (bitsandbytes' default, uint8, when None)."""
    from transformers import BitsAndBytesConfig

    if quant.method == QuantMethod.none:
        return None
    if quant.method == QuantMethod.int8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=quant.int8_threshold)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.method.value,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=storage or torch.uint8,
    )


def check_model_config(cfg: ModelConfig, seq_len: int | str):  # -> transformers.PretrainedConfig
    """Read the model's config (not its weights): the model exists, and train.seq_len (unless auto) fits its
    positions. Returns the config."""
    from transformers import AutoConfig

    if cfg.trust_remote_code:
        log.warning("model.trust_remote_code=true: code from %s runs in this process", cfg.name_or_path)
    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise QloraError(_not_loadable("model config", cfg.name_or_path, e)) from e
    positions = max_positions(config)
    if isinstance(seq_len, int) and positions is not None and seq_len > positions:
        raise QloraError(f"train.seq_len={seq_len} is longer than {cfg.name_or_path} supports "
                         f"({positions} positions); lower train.seq_len")
    return config


def max_positions(model_config) -> int | None:
    """The longest sequence a transformers config says the model supports (None: it does not say)."""
    positions = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    return positions if isinstance(positions, int) else None


def attention_implementation(cfg: ModelConfig, model_config) -> str | None:
    """model.attn_implementation with `auto` resolved for the architecture, read from the model class its config
    names: sdpa where transformers has it for that class, eager where it does not (Gemma 2, whose soft-capped
    attention scores sdpa cannot compute). None for a class only the model's own (remote) code defines: transformers
    then chooses, sdpa with eager as its fallback."""
    if cfg.attn_implementation != AUTO:
        return cfg.attn_implementation
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
    except KeyError:
        return None
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def with_attention(cfg: ModelConfig, model_config) -> ModelConfig:
    """`cfg` with attn_implementation=auto replaced by the implementation chosen for the architecture (logged)."""
    if cfg.attn_implementation != AUTO:
        return cfg
    chosen = attention_implementation(cfg, model_config)
    if chosen is None:
        log.info("attention: transformers' default for %s (model.attn_implementation=auto, remote code)",
                 cfg.name_or_path)
        return cfg
    log.info("attention: %s (model.attn_implementation=auto: %s for %s)", chosen,
             "supported" if chosen == "sdpa" else "transformers has no sdpa", type(model_config).__name__)
    return replace(cfg, attn_implementation=chosen)


def load_tokenizer(cfg: ModelConfig):  # -> transformers.PreTrainedTokenizerBase
    """The model's tokenizer, with a pad token (EOS when it has none: padding is masked by position)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, revision=cfg.revision,
                                                  trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise QloraError(_not_loadable("tokenizer", cfg.name_or_path, e)) from e
    if tokenizer.eos_token_id is None:
        raise QloraError(f"the tokenizer of {cfg.name_or_path} has no EOS token; the model could not learn to stop "
                         "(pick a model whose tokenizer defines eos_token)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: ModelConfig, quant: QuantConfig, device: torch.device,
                    storage: torch.dtype | None = None) -> nn.Module:
    """Load the base model on `device`, quantized per `quant` (4-bit weights packed into `storage`, see
    bnb_config), with every parameter frozen. `model.attn_implementation=auto` is resolved for the architecture
    (`attention_implementation`); the model's config says what was chosen (`config._attn_implementation`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attention = cfg.attn_implementation
    if attention == AUTO:
        try:
            attention = attention_implementation(cfg, AutoConfig.from_pretrained(
                cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code))
        except (OSError, ValueError) as e:
            raise QloraError(_not_loadable("model config", cfg.name_or_path, e)) from e
    dtype = compute_dtype(quant, device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # bitsandbytes places weights per index
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            quantization_config=bnb_config(quant, dtype, storage),
            dtype=dtype,
            device_map={"": device},
            attn_implementation=attention,
            weights_only=True,  # pickled (.bin) weights load as tensors only; safetensors are preferred anyway
        )
    except torch.OutOfMemoryError as e:
        raise QloraError(f"out of {device.type.upper()} memory loading {cfg.name_or_path}; use a smaller model or "
                         "a GPU with more memory (4-bit needs about 0.55 bytes per parameter plus activations)") from e
    except (OSError, ValueError) as e:  # transformers: OSError for missing files, ValueError for a bad config
        raise QloraError(_not_loadable("model", cfg.name_or_path, e)) from e
    model.requires_grad_(False)
    _keep_training_layout(model)
    if device.type == "cpu":
        _release_checkpoint_file(model)
    return model


def _release_checkpoint_file(model: nn.Module) -> None:
    """Copy the unquantized tensors that are still views of the memory-mapped checkpoint file into memory of their own.

    Weights loaded in the dtype they are stored in are not copied on a CPU, so the whole file stays mapped, and
    resident, for as long as the model lives (538 MB for SmolLM2-135M in float32, four times the 113 MB its
    unquantized tensors take). Copied, the mapping goes. Parameters are copied in place, so tied ones stay tied.
    """
    for parameter in {id(p): p for p in model.parameters()}.values():
        if type(parameter).__name__ not in ("Params4bit", "Int8Params"):
            parameter.data = parameter.data.clone()
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.clone()


def prepare_kbit(model: nn.Module, float32_embeddings: bool, modules_to_save: list[str]) -> nn.Module:
    """peft's k-bit preparation: the norms and other unquantized weights upcast to float32 for stable training.

    The input and output embeddings are then put back in the compute dtype (unless `float32_embeddings`, or
    `modules_to_save` trains them: their trainable copies stay float32). They are the largest unquantized
    tensors (Llama 3.1 8B's two are 2 GiB in float32, half in bfloat16), frozen, and the loss upcasts the
    logits to float32 anyway.
    """
    from peft import prepare_model_for_kbit_training

    keep = [] if float32_embeddings else embeddings_in_compute_dtype(model, modules_to_save)
    dtypes = [m.weight.dtype for m in keep]
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module, dtype in zip(keep, dtypes, strict=True):
        module.to(dtype)
    head = model.get_output_embeddings()
    if any(m is head for m in keep):
        # The final norm is float32 now: its output meets the head in the head's dtype, as autocast would do.
        head.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype), *args[1:]))
    return model


def enable_checkpointing(model: nn.Module, layers: int | None) -> int | None:
    """Recompute in backward the activations of the first `layers` decoder layers (None: every one); returns how
    many are, or None for a model without transformers' per-layer switch (remote code), checkpointed its own way.
    The first layers: the backward pass reaches them last, when the kept layers' activations are gone."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    count = len(blocks) if layers is None else min(layers, len(blocks))
    if layers == 0:
        return 0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    for block in blocks[count:]:
        block.gradient_checkpointing = False
    return count if blocks else None


def embeddings_in_compute_dtype(model: nn.Module, modules_to_save: list[str]) -> list[nn.Module]:
    """The input and output embedding modules that k-bit preparation leaves in the compute dtype."""
    names = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
    found = {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return [m for key, m in found.items() if names.get(key) not in modules_to_save]


def load_trained_model(config: Config, adapter: Path, device: torch.device):  # -> peft.PeftModel
    """The base loaded and prepared as the run trained it, with its adapter from `adapter`, in eval mode."""
    from peft import PeftModel

    model = load_base_model(config.model, config.quant, device)
    if config.quant.method != QuantMethod.none and config.train.prepare_kbit:
        model = prepare_kbit(model, config.train.float32_embeddings, config.lora.modules_to_save)
    try:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except Exception as e:  # noqa: BLE001 (peft raises ValueError, RuntimeError, KeyError, safetensors errors)
        raise QloraError(f"the adapter in {adapter} is damaged or does not fit {config.model.name_or_path} "
                         f"({first_line(e)[:300]}); export the run folder that trained it, with its own "
                         "config.yaml and adapter/") from e
    return model.eval()


def _keep_training_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference behind our back.

    On CPUs with AVX512-BF16, a Linear4bit called in eval mode without grad permanently converts its weight
    to an inference-only layout (un-nesting double quantization and rounding absmax to bfloat16). After that
    its matmul has no autograd, so gradients stop flowing through the base and the adapter sees different
    weights. Evaluation between training steps would trigger it, so keep the layout that trains.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _not_loadable(what: str, name: str, e: Exception) -> str:
    """Why the model (config, tokenizer) at `name` did not load: files missing from a folder, transformers refusing
    what the files ask for (an attention implementation, an unknown architecture), or the hub out of reach."""
    folder = Path(name).expanduser()
    if not folder.exists():
        return f"could not load the {what}: {hub.unavailable(name)}"
    if isinstance(e, OSError) or (folder.is_dir() and not (folder / "config.json").is_file()):
        return f"could not load the {what} from {name} ({first_line(e)}); is it a complete HF model folder?"
    fix = ("; set model.attn_implementation=auto, eager or sdpa" if "attention" in str(e).lower()
           else "; check the model's config.json and the installed transformers version")
    return f"transformers cannot load the {what} from {name}: {first_line(e)[:300]}{fix}"


@dataclass
class QuantReport:
    """What the frozen base costs: parameters stored quantized, their bits each, and the whole footprint."""

    quantized_params: int
    quantized_bytes: int
    other_params: int
    other_bytes: int

    @property
    def bits_per_quantized_param(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else 0.0

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes


def log_base(model: nn.Module, cfg: ModelConfig, quant: QuantConfig, seconds: float) -> QuantReport | None:
    """Log what the loaded base costs; its quantization report (None when unquantized)."""
    if quant.method == QuantMethod.none:
        n = sum(p.numel() for p in model.parameters())
        log.info("base %s loaded unquantized in %.1fs: %s parameters, %.1f MiB", cfg.name_or_path, seconds,
                 f"{n:,}", model.get_memory_footprint() / 2**20)
        return None
    report = quant_report(model)
    log.info("base %s loaded as %s%s in %.1fs: %s parameters quantized at %.3f bits each, %s kept in %s; "
             "%.1f MiB in all", cfg.name_or_path, quant.method.value, "+double-quant" if quant.double_quant else "",
             seconds, f"{report.quantized_params:,}", report.bits_per_quantized_param, f"{report.other_params:,}",
             dtype_name(compute_dtype(quant, model.device)), report.total_bytes / 2**20)
    return report


def dtype_name(dtype: torch.dtype) -> str:
    """`bfloat16` for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def quant_report(model: nn.Module) -> QuantReport:
    """Measure storage from the tensors themselves: packed weights plus every quantization constant."""
    import bitsandbytes as bnb

    q_params = q_bytes = 0
    quantized: set[int] = set()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            q_params += state.shape.numel()
            q_bytes += nbytes(module.weight) + _quant_state_bytes(state)
            quantized.add(id(module.weight))
        elif isinstance(module, bnb.nn.Linear8bitLt):
            q_params += module.weight.numel()
            scale = getattr(module.weight, "SCB", None)
            if scale is None:  # the layer's first forward moves the row scales into its state
                scale = module.state.SCB
            q_bytes += nbytes(module.weight) + nbytes(scale)
            quantized.add(id(module.weight))
    others = [p for p in model.parameters() if id(p) not in quantized]
    others += [b for b in model.buffers()]
    return QuantReport(q_params, q_bytes, sum(t.numel() for t in others), sum(nbytes(t) for t in others))


def _quant_state_bytes(state) -> int:
    # Per-block constants only: the 16-entry NF4/FP4 and 256-entry dynamic code books are fixed tables of
    # the format, not storage that grows with the model (the paper's 4.127 bits leave them out too).
    total = nbytes(state.absmax) + nbytes(getattr(state, "offset", None))
    if getattr(state, "nested", False) and state.state2 is not None:
        total += nbytes(state.state2.absmax)
    return total


def nbytes(t: torch.Tensor | None) -> int:
    """The bytes a tensor's elements take (0 for None)."""
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
