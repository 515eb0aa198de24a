"""Several processes, one run: accelerate set up for dist=none|ddp|fsdp, FSDP2 sharding of the 4-bit model, and
the few collectives the training loop needs.

Launchers (torchrun, accelerate launch) start one process per device and set RANK / WORLD_SIZE; accelerate reads
them, starts the process group (NCCL on GPUs, gloo on CPUs) and places each process on its device.

- ddp: accelerate wraps the model in DistributedDataParallel; LoRA gradients are all-reduced in backward.
- fsdp: the decoder layers, the other modules with weights, then the whole go through torch's `fully_shard`
  (FSDP2), here rather than in accelerate, whose FSDP runs on GPUs only: one code path that the CPU tests run
  too. bitsandbytes stores the
  packed 4-bit weights in the compute dtype (`bnb_4bit_quant_storage`), so they are sharded like any other
  tensor; the quantization constants stay with each layer and apply once the weight is gathered for its forward.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from qlora.config import Config, DistConfig, DistStrategy
from qlora.errors import QloraError

log = logging.getLogger(__name__)


def launched_processes() -> int:
    """How many processes the launcher started for this run (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(dist: DistConfig, mixed_precision: str) -> Accelerator:
    """The run's Accelerator: the process group for a multi-process launch, this process's device."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    world = launched_processes()
    if world > 1 and dist.strategy == DistStrategy.none:
        raise QloraError(f"launched as {world} processes with dist=none, so each would train the whole run alone; "
                         "add dist=ddp (or dist=fsdp)")
    handlers = [InitProcessGroupKwargs(timeout=timedelta(minutes=dist.timeout_minutes))]
    if dist.strategy == DistStrategy.ddp:
        # Every trainable parameter gets a gradient, so none needs searching for after each backward.
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=False))
    # One process may run several runs (a sweep, the tests), each with its own mixed precision; the process
    # group (accelerate's PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=handlers)
    if world > 1 and accelerator.num_processes != world:
        raise QloraError(f"the launcher started {world} processes but accelerate joined {accelerator.num_processes}; "
                         "launch with torchrun or accelerate launch (docs/distributed.md)")
    if world > 1:
        _end_process_group_at_exit()
    return accelerator


@functools.cache
def _end_process_group_at_exit() -> None:
    """Destroy the process group when the interpreter exits, while it is still whole. Left to finalization, gloo's
    worker threads can outlive the interpreter and the process dies of SIGABRT after its run ended ("terminate called
    without an active exception"; seen once under parallel test load, and the cause pytorch/pytorch#179291 names)."""

    def end() -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(end)


def same_output_dir(config: Config, accelerator: Accelerator) -> Config:
    """The config with the main process's output_dir: each process composed its own, and the default one holds a
    timestamp that can tick between them."""
    if accelerator.num_processes == 1:
        return config
    from accelerate.utils import broadcast_object_list

    main = broadcast_object_list([config.output_dir], from_process=0)[0]
    return config if main == config.output_dir else dataclasses.replace(config, output_dir=main)


def storage_dtype(dist: DistConfig, compute: torch.dtype) -> torch.dtype | None:
    """The dtype bitsandbytes packs 4-bit weights into: the compute dtype for FSDP (which shards floating-point
    tensors only), bitsandbytes' default (uint8) otherwise."""
    return compute if dist.strategy == DistStrategy.fsdp else None


def shard(root: torch.nn.Module, dist: DistConfig, example: dict[str, torch.Tensor]) -> None:
    """Shard a model (or a module around one, such as the loss) across the processes with FSDP2, in place.

    Each decoder layer is one unit, gathered for its forward and backward and freed after. Every other module
    that holds parameters of its own (embeddings, final norm, output head, their adapters) is a small unit too,
    so whichever way a forward enters the model (the chunked loss calls the decoder and the head apart;
    generation and evaluation call the model) each unit gathers what it uses. `root(**example)` runs once
    without gradients, as FSDP needs its first forward to enter through the root. Build the optimizer
    afterwards: sharding replaces the parameters.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    offload = CPUOffloadPolicy() if dist.cpu_offload else OffloadPolicy()
    model = _transformers_model(root)
    if model.get_input_embeddings().weight is getattr(model.get_output_embeddings(), "weight", None):
        raise QloraError(f"dist=fsdp: {type(model).__name__} ties its input and output embeddings, which cannot be "
                         "sharded as separate units; use dist=ddp")
    layers = decoder_layers(root)
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    rest = [m for m in root.modules() if id(m) not in in_layers and any(True for _ in m.parameters(recurse=False))]
    for unit in [*layers, *rest]:
        fully_shard(unit, offload_policy=offload)
    fully_shard(root, offload_policy=offload)
    # FSDP sets itself up (which unit is the root and keeps its weights between forward and backward, which
    # free theirs) in the first forward through the root; later forwards may enter below it.
    was_training = root.training
    root.eval()
    with torch.no_grad():
        root(**example)
    root.train(was_training)
    log.info("fsdp: %d decoder layers and %d other modules sharded across %d processes%s", len(layers), len(rest),
             torch.distributed.get_world_size(), ", parameters offloaded to CPU" if dist.cpu_offload else "")


def decoder_layers(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes transformers itself never splits across devices."""
    model = _transformers_model(root)
    names = set(model._no_split_modules or [])
    layers = [m for m in root.modules() if type(m).__name__ in names]
    if not layers:
        raise QloraError(f"dist=fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules), "
                         "so it cannot be sharded layer by layer; use dist=ddp")
    return layers


def _transformers_model(root: torch.nn.Module) -> torch.nn.Module:
    """The outermost transformers model inside `root` (under peft's and the loss's wrappers)."""
    from transformers import PreTrainedModel

    return next(m for m in root.modules() if isinstance(m, PreTrainedModel))


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP has sharded (some of) the model's parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective: every process must call it); others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The trainable tensors by name, gathered whole on the CPU (every process must call this under FSDP);
    None when the model is not sharded (save_pretrained reads the parameters itself)."""
    if not is_sharded(model):
        return None
    return {name: full(p.detach()).cpu() for name, p in model.named_parameters() if p.requires_grad}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict, gathered whole under FSDP (every process must call this)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole optimizer state dict (as `optimizer_state` returned it), into shards under FSDP."""
    if not is_sharded(model):
        from qlora.optim import load_optimizer_state as load_whole

        load_whole(optimizer, state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def agree(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process if it is true on any (one tiny all-reduce; no communication for one process)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "max").item())


def sum_over_processes(accelerator: Accelerator, counts: list[int]) -> list[int]:
    """`counts` summed over the processes (no communication for one process)."""
    if accelerator.num_processes == 1:
        return counts
    return accelerator.reduce(torch.tensor(counts, device=accelerator.device), "sum").tolist()


def maybe_no_sync(accelerator: Accelerator, model: torch.nn.Module, sync: bool):
    """A context that skips the gradient all-reduce of `model`'s backward unless `sync`."""
    from contextlib import nullcontext

    return nullcontext() if sync else accelerator.no_sync(model)


def describe(accelerator: Accelerator, dist: DistConfig) -> str:
    """One line on how the run is spread: strategy, processes, backend."""
    if accelerator.num_processes == 1:
        return "one process" + (f" (dist={dist.strategy.value} has nothing to spread)"
                                if dist.strategy != DistStrategy.none else "")
    return (f"dist={dist.strategy.value}: {accelerator.num_processes} processes "
            f"({torch.distributed.get_backend()} backend)")
