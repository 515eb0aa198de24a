"""Merged weights, one tensor at a time, written as sharded safetensors.

`merged_tensors` lists every tensor of the merged model with a function that computes it on demand: for an
adapted layer, the base weight the adapter saw (the 4-bit or 8-bit weight, dequantized exactly as the forward
pass did) or the original checkpoint's weight, plus the LoRA update (or DoRA's rescaled sum); for everything
else, the tensor as trained (modules_to_save) or as loaded. `write_safetensors` then computes and writes them
shard by shard, so the merge holds the quantized model plus one shard in memory, never the whole 16-bit model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qlora.config import MergeMode, ModelConfig
from qlora.errors import QloraError

ADAPTER = "default"  # peft's name for the one adapter a run trains


@dataclass
class Entry:
    """One tensor of the merged model: its name in the checkpoint, its shape, and how to compute it."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


def merged_tensors(model, mode: MergeMode, dtype: torch.dtype, original: OriginalWeights | None) -> list[Entry]:
    """Every tensor of the merged model, in module order, named as transformers saves the base model.

    `model` is the peft model (quantized base + adapter); `original` is needed for MergeMode.original.
    Each `make()` returns a CPU tensor of `dtype`.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    entries: list[Entry] = []
    seen: dict[int, str] = {}  # parameter identity -> name: tied weights are saved once, as transformers does
    done: list[str] = []

    def add(name: str, tensor: torch.Tensor, make: Callable[[], torch.Tensor] | None = None) -> None:
        if id(tensor) in seen:
            return
        seen[id(tensor)] = name
        entries.append(Entry(name, tuple(_shape(tensor)), make or (lambda: tensor.detach().to("cpu", dtype))))

    for name, module in model.get_base_model().named_modules():
        if any(name.startswith(prefix + ".") for prefix in done):
            continue
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            _refuse_tied(layer.weight, name, seen)
            add(f"{name}.weight", layer.weight, _merged(module, name, mode, dtype, original))
            if layer.bias is not None:
                add(f"{name}.bias", layer.bias, _merged_bias(module, dtype))
            done.append(name)
        elif isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[ADAPTER]
            for key, tensor in _own_tensors(trained, recurse=True):
                add(f"{name}.{key}", tensor)
            done.append(name)
        elif isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):  # quantized, not adapted
            add(f"{name}.weight", module.weight, _base_weight_fn(module, name, mode, dtype, original))
            if module.bias is not None:
                add(f"{name}.bias", module.bias)
            done.append(name)
        else:
            for key, tensor in _own_tensors(module, recurse=False):
                add(f"{name}.{key}" if name else key, tensor)
    return entries


def _merged(lora_module, name: str, mode: MergeMode, dtype: torch.dtype,
            original: OriginalWeights | None) -> Callable[[], torch.Tensor]:
    base_weight = _base_weight_fn(lora_module.get_base_layer(), name, mode, torch.float32, original)

    @torch.no_grad()
    def make() -> torch.Tensor:
        weight = base_weight().to(lora_module.lora_A[ADAPTER].weight.device)
        merged = weight + lora_module.get_delta_weight(ADAPTER).float()
        if lora_module.use_dora.get(ADAPTER):  # DoRA: each row rescaled to the trained magnitude
            magnitude = lora_module.lora_magnitude_vector[ADAPTER].weight.float()
            merged *= (magnitude / merged.norm(p=2, dim=1)).unsqueeze(1)
        return merged.to("cpu", dtype)

    return make


def _merged_bias(lora_module, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    @torch.no_grad()
    def make() -> torch.Tensor:
        bias = lora_module.get_base_layer().bias.float()
        if getattr(lora_module, "lora_bias", {}).get(ADAPTER):
            bias = bias + lora_module.lora_B[ADAPTER].bias.float()
        return bias.to("cpu", dtype)

    return make


def _base_weight_fn(layer: nn.Module, name: str, mode: MergeMode, dtype: torch.dtype,
                    original: OriginalWeights | None) -> Callable[[], torch.Tensor]:
    """The base weight of a (possibly quantized) linear layer: dequantized as the forward pass sees it, or the
    original checkpoint's."""
    if mode == MergeMode.original and _is_quantized(layer):
        assert original is not None
        return lambda: original.get(f"{name}.weight").to(dtype)

    @torch.no_grad()
    def make() -> torch.Tensor:
        return dequantized_weight(layer).to(dtype)

    return make


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a (bitsandbytes or plain) linear layer multiplies by, in the dtype its forward uses."""
    from peft.utils.integrations import dequantize_bnb_weight

    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        return dequantize_bnb_weight(weight, state=weight.quant_state)
    if type(weight).__name__ == "Int8Params":
        return dequantize_bnb_weight(weight, state=layer.state)
    return weight.detach()


def _is_quantized(layer: nn.Module) -> bool:
    return type(layer.weight).__name__ in ("Params4bit", "Int8Params")


def _shape(tensor: torch.Tensor) -> torch.Size:
    state = getattr(tensor, "quant_state", None)  # a packed 4-bit weight knows its real shape
    return state.shape if state is not None else tensor.shape


def _own_tensors(module: nn.Module, recurse: bool) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers, as `state_dict` would name them."""
    tensors = list(module.named_parameters(recurse=recurse))
    for key, buffer in module.named_buffers(recurse=recurse):
        owner_name, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf not in owner._non_persistent_buffers_set:
            tensors.append((key, buffer))
    return tensors


def _refuse_tied(weight: torch.Tensor, name: str, seen: dict[int, str]) -> None:
    if id(weight) in seen:
        raise QloraError(f"LoRA adapts {name}, whose weight is tied to {seen[id(weight)]}; a merged model cannot "
                         "keep them tied and apply the update to one only. Export with export.format=adapter")


class OriginalWeights:
    """The unquantized base checkpoint's tensors, read one at a time from its safetensors files."""

    def __init__(self, cfg: ModelConfig) -> None:
        from safetensors import safe_open

        folder = _checkpoint_folder(cfg)
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        if "quantization_config" in config:
            raise QloraError(f"{cfg.name_or_path} is itself a quantized checkpoint, so it has no original weights "
                             "to merge into; use export.merge=dequantized")
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise QloraError(f"{cfg.name_or_path} has no safetensors weights for export.merge=original; "
                             "use export.merge=dequantized")
        self.files: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                self.files.update(dict.fromkeys(f.keys(), file))
        self.name = cfg.name_or_path

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.files:
            raise QloraError(f"{self.name} has no tensor '{key}' (its checkpoint names weights differently from "
                             "the loaded model); use export.merge=dequantized")
        with safe_open(self.files[key], framework="pt") as f:
            return f.get_tensor(key)


def _checkpoint_folder(cfg: ModelConfig) -> Path:
    local = Path(cfg.name_or_path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:  # already in the cache: the run (or this export) loaded it
        return Path(snapshot_download(cfg.name_or_path, revision=cfg.revision,
                                      allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # noqa: BLE001 (hub errors come in many types; all mean the same here)
        from qlora import hub

        raise QloraError(f"export.merge=original reads the base checkpoint: {hub.unavailable(cfg.name_or_path)}") \
            from e


def write_safetensors(entries: list[Entry], folder: Path, max_shard_bytes: int, dtype: torch.dtype) -> int:
    """Compute and write the entries as transformers lays out a checkpoint: model.safetensors, or
    model-0000K-of-0000N.safetensors plus model.safetensors.index.json. Returns the total bytes of tensors."""
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[Entry]] = [[]]
    size = total = 0
    for entry in entries:
        nbytes = itemsize * _numel(entry.shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
        total += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    weight_map = {}
    for shard, file in zip(shards, names, strict=True):
        tensors = {}
        for entry in shard:
            tensor = entry.make().contiguous()
            if tuple(tensor.shape) != entry.shape:
                raise AssertionError(f"{entry.name}: computed shape {tuple(tensor.shape)}, expected {entry.shape}")
            tensors[entry.name] = tensor
            weight_map[entry.name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

