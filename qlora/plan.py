"""`qlora plan`: the memory a run needs, from the model's config alone (no weights downloaded or loaded).

The model is built as a skeleton on the meta device, which gives every tensor's shape for free. From the shapes:

- the frozen base: packed 4-bit weights (half a byte each) and their per-block constants (64-weight blocks;
  double quantization stores those as bytes with a float32 scale per 256 blocks), LLM.int8 weights with a
  float32 scale per row, and everything left unquantized in the compute dtype (float32 after peft's k-bit
  preparation);
- LoRA: r x (in + out) float32 weights per adapted linear layer, and their gradients;
- the optimizer state bitsandbytes or torch allocates for each of those tensors;

all exact, and equal to the bytes of the tensors a run allocates (the tests check this). Activations are an
estimate: bytes saved for the backward pass per token of each decoder layer, from coefficients measured on
this framework's code path (see `LAYER_BYTES`), plus the logits and the loss's float32 copies of them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qlora import memory
from qlora.config import (
    AUTO,
    Config,
    DType,
    LoraInit,
    ObjectiveName,
    OptimizerName,
    QuantMethod,
    ScratchTokenizer,
    TrainConfig,
    builds_scratch_model,
)
from qlora.errors import QloraError, first_line
from qlora.model import nbytes

log = logging.getLogger(__name__)

GIB = 2**30
BLOCKSIZE_4BIT = 64
"""Weights per absmax constant in bitsandbytes' 4-bit formats."""
BLOCKSIZE_NESTED = 256
"""absmax constants per float32 scale under double quantization."""
BLOCKSIZE_OPTIM = 256
"""State elements per float32 absmax in bitsandbytes' 8-bit optimizers."""
QMAP_BYTES = 256 * 4
"""One 8-bit optimizer code book (256 float32 values), shared by all parameters."""
LOFTQ_COPIES = 6
"""Float32 copies of one weight LoftQ holds at once (qlora.loftq: checkpoint weight, dequantized weight, two residuals,
U and V^T), measured by tests/test_plan.py."""
CUDA_RESERVE = GIB
"""Left free on the GPU for the CUDA context, cuBLAS workspaces and allocator fragmentation."""
AUTO_SHARE = 0.9
"""train.gradient_checkpointing=auto plans to fill at most this share of the usable memory: the activations are
an estimate (within 5% where measured, docs/plan.md)."""
HOST_RESERVE = GIB
"""Left free of the available RAM when planning a CPU run."""
CPU_ALLOCATOR_SHARE = 0.6
"""On a CPU with glibc's default malloc, the process grows by about 1.6 times the bytes a training step's tensors
hold at once: freed temporaries stay in the heap for reuse, fragmented (SmolLM2-135M, 8 x 384 tokens: tensors 6.25
GiB, growth 10.1 GiB; docs/plan.md). 0 with QLORA_MALLOC=compact (qlora.memory), which returns them at once."""


@dataclass(frozen=True)
class LayerBytes:
    """Bytes saved for backward per token of one decoder layer, per unit of each width.

    `residual` and `compute` are the dtype sizes these were measured at (float32 residual stream, as peft's k-bit
    preparation leaves it, and float32 or bfloat16-autocast compute).
    """

    hidden: float
    intermediate: float
    kv: float
    rank: float
    """Per adapted linear layer (lora_A's output, kept for lora_B's gradient)."""
    heads: float
    """The attention kernel's log-sum-exp, per head."""
    scalar: float
    """The norms' reciprocal RMS."""
    dropout_hidden: float
    """Extra with lora.dropout > 0 (masks and dropped copies of the adapters' inputs), per unit of hidden..."""
    dropout_intermediate: float
    """...and of the intermediate width (down_proj's input)."""


# Measured with torch.autograd.graph.saved_tensors_hooks on a Llama-architecture model, LoRA on all seven linear
# layers, bitsandbytes NF4 (transformers 5.23, peft 0.21, bitsandbytes 0.50, torch 2.13): storage bytes saved for
# backward, split by the width of each tensor. Keyed on (compute bytes, autocast).
LAYER_BYTES = {
    (4, False): LayerBytes(hidden=24, intermediate=16, kv=8, rank=4, heads=4, scalar=8,
                           dropout_hidden=37, dropout_intermediate=4),
    (2, True): LayerBytes(hidden=24, intermediate=14, kv=4, rank=2, heads=4, scalar=8,
                          dropout_hidden=21, dropout_intermediate=4),
}
LOGITS_BYTES = 12
"""Per logit beyond the model's output: the float32 log-softmax the loss keeps, and its gradient in float32
twice (the loss's and the upcast's) at the start of the backward pass."""


@dataclass
class Plan:
    """A run's memory, component by component (bytes), and what fits."""

    model: str
    device: str
    dtype: str
    """Compute dtype."""
    parameters: int
    """Parameters of the base model."""
    quantized_parameters: int
    base_bytes: int
    """The frozen base as stored: quantized weights with their constants, plus everything unquantized."""
    trainable_parameters: int
    trainable_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    optimizer_paged: bool
    """The optimizer state lives in CUDA unified memory (bitsandbytes' paged optimizers), which the driver
    moves to CPU memory under pressure."""
    activation_bytes: int
    """Saved for backward at the micro batch and seq_len (a recomputed layer keeps only its input, and one layer's
    activations exist again while it is recomputed)."""
    logits_bytes: int
    """The loss's logits: with train.loss_chunk_tokens, one chunk of them at a time plus the trained positions'
    hidden states they are recomputed from; without, all of them in float32 with their gradients."""
    workspace_bytes: int
    """Transient: the largest weight dequantized for its matmul, and the activation gradients in flight."""
    tokens: int
    """micro_batch_size x seq_len, x 2 for preference objectives (a pair is two sequences)."""
    per_token_bytes: float
    """Activation, logits and workspace bytes that grow with each token of the micro batch."""
    flops_per_token: float
    """Training FLOPs per token of the micro batch on the frozen-base basis: the forward pass (2 per weight and
    the attention scores), the backward pass for activation gradients only (the base is frozen), and the recomputed
    layers' share of the forward again."""
    reference_bytes: int = 0
    """DPO's reference pass in the step (objective.precompute_reference=false): the base with the adapter disabled,
    run without gradients while the policy's activations wait for backward: its logits (unless chunked) and one
    layer's activations in flight. Included in per_token_bytes."""
    sequences_per_item: int = 1
    """Sequences per micro-batch item: 2 for a preference pair."""
    loss_chunk_bytes: int = 0
    """The part of logits_bytes that does not grow with the micro batch: one chunk of the chunked loss."""
    least_per_token_bytes: float | None = None
    """per_token_bytes with the most recomputation train.gradient_checkpointing=auto would choose, which bounds
    the largest micro batch and seq_len; None: per_token_bytes (true and false choose nothing)."""
    layers: int = 0
    """Decoder layers."""
    checkpointed_layers: int = 0
    """Decoder layers whose activations are recomputed in backward (the first ones): all of them for
    train.gradient_checkpointing=true, none for false; for auto the fewest whose plan fits the memory."""
    capacity_bytes: int | None = None
    """GPU memory the run may use (train.memory_limit_gb, else the visible GPU's total); None: none known."""
    max_positions: int | None = None
    host_bytes: int = 0
    """On a CPU, where the run's tensors share the process's memory: what the process holds besides them (Python,
    torch and the other libraries, the tokenizer, the tokenized data), measured as its resident memory when the
    plan is made. 0 on a GPU, whose memory holds the run's tensors alone."""
    allocator_share: float = 0.0
    """On a CPU: what malloc keeps beyond the step's tensors, as a share of them (CPU_ALLOCATOR_SHARE)."""
    init_bytes: int = 0
    """lora.init=loftq, before training (no gradients, optimizer state or activations yet): the largest adapted
    weight's float32 copies LoftQ holds at once (LOFTQ_COPIES: the checkpoint's, the dequantized, the residual and
    its SVD factors). 0 for the other inits. LoRA+ (two optimizer groups over the same tensors) and NEFTune (noise
    the size of the input embeddings, freed before the layers run) add nothing at the peak."""

    @property
    def step_bytes(self) -> int:
        """What a training step allocates and frees: activations, logits and workspace."""
        return self.activation_bytes + self.logits_bytes + self.workspace_bytes + self.reference_bytes

    @property
    def allocator_bytes(self) -> int:
        return int(self.allocator_share * self.step_bytes)

    @property
    def weights_bytes(self) -> int:
        return self.base_bytes + self.trainable_bytes

    @property
    def fixed_bytes(self) -> int:
        """What does not depend on the tokens in a micro batch."""
        return self.host_bytes + self.weights_bytes + self.gradient_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        training = self.fixed_bytes + self.step_bytes + self.allocator_bytes
        return max(training, self.host_bytes + self.weights_bytes + self.init_bytes)

    @property
    def usable_bytes(self) -> int | None:
        return None if self.capacity_bytes is None else self.capacity_bytes - CUDA_RESERVE

    @property
    def fits(self) -> bool | None:
        return None if self.usable_bytes is None else self.total_bytes <= self.usable_bytes

    def max_tokens(self) -> int | None:
        """The most tokens per micro batch that fit."""
        if self.usable_bytes is None:
            return None
        per_token = (self.least_per_token_bytes or self.per_token_bytes) * (1 + self.allocator_share)
        chunk = self.loss_chunk_bytes * (1 + self.allocator_share)
        return max(0, int((self.usable_bytes - self.fixed_bytes - chunk) / per_token))

    def largest_micro_batch(self, seq_len: int) -> int | None:
        tokens = self.max_tokens()
        return None if tokens is None else tokens // (seq_len * self.sequences_per_item)

    def largest_seq_len(self, micro_batch_size: int) -> int | None:
        tokens = self.max_tokens()
        if tokens is None:
            return None
        longest = tokens // (micro_batch_size * self.sequences_per_item) // 64 * 64
        return min(longest, self.max_positions) if self.max_positions else longest


def plan(config: Config, device: str = "cuda", checkpointed: int | None = None) -> Plan:
    """The memory `config` needs on `device` ("cuda" or "cpu"), from the model's config alone; with `checkpointed`,
    recomputing that many decoder layers whatever train.gradient_checkpointing says."""
    from transformers import AutoModelForCausalLM

    from qlora.model import attention_implementation

    arch = model_config(config)
    eager = attention_implementation(config.model, arch) == "eager"
    dtype = _compute_dtype(config, device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch, dtype=dtype)
    quantized = quantized_linears(model) if config.quant.method != QuantMethod.none else {}
    upcast = config.quant.method != QuantMethod.none and config.train.prepare_kbit
    base = _base_bytes(model, quantized, config, upcast)
    adapted = adapted_linears(model, config)
    trainable = _trainable(model, adapted, config, upcast)
    optimizer = sum(optimizer_state_bytes(p.numel(), p.element_size(), config) for p in trainable)
    optimizer += _shared_state_bytes(config) if trainable else 0
    autocast = config.train.mixed_precision.value in ("bf16", "fp16") or (
        config.train.mixed_precision.value == "auto" and device == "cuda")
    objective = config.objective
    sequences = 1 if objective.name == ObjectiveName.sft else 2
    tokens = sequences * config.train.micro_batch_size * config.train.seq_len
    chunk = config.train.loss_chunk_tokens
    compute = torch.finfo(dtype).bits // 8
    loss_chunk = min(tokens, chunk) * arch.vocab_size * (compute + LOGITS_BYTES) if chunk else 0
    largest = max((m.in_features * m.out_features for m in quantized.values()), default=0)
    dequantized = largest * torch.finfo(dtype).bits // 8
    layers = arch.num_hidden_layers
    parameters = sum(p.numel() for p in model.parameters())
    quantized_parameters = sum(m.weight.numel() for m in quantized.values())
    trainable_bytes = sum(nbytes(p) for p in trainable)
    host = (memory.resident_bytes() or 0) if device == "cpu" else 0
    init = 0
    if config.lora.init == LoraInit.loftq:
        init = LOFTQ_COPIES * 4 * max((m.in_features * m.out_features for m in adapted), default=0)

    def with_checkpointing(checkpointed: int) -> Plan:
        per_token = _activation_per_token(arch, len(adapted), config, dtype, autocast, upcast, checkpointed, eager)
        reference = 0.0
        if objective.name == ObjectiveName.dpo and not objective.precompute_reference:
            reference = (0 if chunk else arch.vocab_size * (compute + LOGITS_BYTES)) + per_token.activations / layers
        return Plan(
            model=config.model.name_or_path,
            device=device,
            dtype=str(dtype).removeprefix("torch."),
            parameters=parameters,
            quantized_parameters=quantized_parameters,
            base_bytes=base,
            trainable_parameters=sum(p.numel() for p in trainable),
            trainable_bytes=trainable_bytes,
            gradient_bytes=trainable_bytes,
            optimizer_bytes=optimizer,
            optimizer_paged=config.optim.name.value.startswith("paged_") and device == "cuda",
            activation_bytes=int(per_token.activations * tokens),
            logits_bytes=int(per_token.logits * tokens) + loss_chunk,
            workspace_bytes=dequantized + int(per_token.workspace * tokens),
            tokens=tokens,
            per_token_bytes=per_token.total + reference,
            reference_bytes=int(reference * tokens),
            sequences_per_item=sequences,
            flops_per_token=flops_per_token(arch, model, config, checkpointed),
            layers=layers,
            checkpointed_layers=checkpointed,
            loss_chunk_bytes=loss_chunk,
            capacity_bytes=_capacity(config, device),
            max_positions=getattr(arch, "max_position_embeddings", None),
            host_bytes=host,
            allocator_share=CPU_ALLOCATOR_SHARE if device == "cpu" and not memory.compact_malloc() else 0.0,
            init_bytes=init,
        )

    if checkpointed is not None:
        return with_checkpointing(checkpointed)
    setting = config.train.gradient_checkpointing
    if setting != AUTO:
        return with_checkpointing(layers if setting else 0)
    # Recomputing the last layer too never lowers the peak (its backward needs its activations at once).
    candidates = [with_checkpointing(k) for k in range(max(layers - 1, 0) + 1)]
    leanest = candidates[-1]
    if leanest.usable_bytes is not None:
        budget, need = leanest.usable_bytes, (lambda c: c.total_bytes)
    else:  # the RAM free now: what the process already holds is not in it
        budget, need = _host_budget(device), (lambda c: c.total_bytes - c.host_bytes)
    chosen = leanest if budget is None else next((c for c in candidates if need(c) <= AUTO_SHARE * budget), leanest)
    return replace(chosen, least_per_token_bytes=leanest.per_token_bytes)


def model_config(config: Config):  # -> transformers.PretrainedConfig
    """The model's transformers config, from the first of: a local folder's config.json, the scratch shape, the
    hub's config.json already in the local cache, model.architecture, the hub's config.json (downloaded)."""
    from transformers import AutoConfig

    cfg = config.model
    folder = Path(cfg.name_or_path).expanduser()
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code)
    if builds_scratch_model(cfg):
        return _scratch_config(cfg.scratch)
    hub = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    try:
        return AutoConfig.from_pretrained(cfg.name_or_path, local_files_only=True, **hub)
    except (OSError, ValueError):
        pass
    given = cfg.architecture.given()
    if given:
        if "model_type" not in given:
            raise QloraError("model.architecture needs model_type (llama, mistral, qwen2, gemma2, phi3, ...)")
        try:
            return AutoConfig.for_model(**given)
        except ValueError as e:
            raise QloraError(f"model.architecture: {first_line(e)}") from e
    try:
        return AutoConfig.from_pretrained(cfg.name_or_path, **hub)
    except (OSError, ValueError) as e:
        raise QloraError(f"could not read the config of {cfg.name_or_path} ({first_line(e)[:200]}); "
                         "point model.name_or_path at a local model folder or give model.architecture.* "
                         "(the shapes from its config.json)") from e


def _scratch_config(shape):  # -> transformers.PretrainedConfig
    """The scratch model's config before it is built (the bpe vocabulary at its configured size)."""
    from qlora.demo import build_demo_tokenizer, scratch_config

    vocab = shape.vocab_size or (len(build_demo_tokenizer()) if shape.tokenizer == ScratchTokenizer.demo
                                 else shape.tokenizer_vocab_size)
    return scratch_config(shape, vocab)


def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers bitsandbytes quantizes when transformers loads the model: all but the output head."""
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def quantized_weight_bytes(numel: int, rows: int, config: Config) -> int:
    """Bytes of one quantized weight matrix with every per-block or per-row constant."""
    quant = config.quant
    if quant.method == QuantMethod.int8:
        return numel + 4 * rows  # int8 weights, float32 scale per output row
    blocks = math.ceil(numel / BLOCKSIZE_4BIT)
    packed = math.ceil(numel / 2)
    if not quant.double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / BLOCKSIZE_NESTED) + 4  # uint8 absmax, float32 scales, offset


def optimizer_state_bytes(numel: int, element_size: int, config: Config) -> int:
    """Bytes of the optimizer state for one trainable tensor (the shared 8-bit code books not included)."""
    name = config.optim.name
    moments = 1 if name == OptimizerName.paged_lion_8bit else 2
    if name == OptimizerName.adamw:
        return moments * numel * element_size
    if name == OptimizerName.paged_adamw_32bit or numel < config.optim.min_8bit_size:
        return moments * numel * 4
    return moments * (numel + 4 * math.ceil(numel / BLOCKSIZE_OPTIM))


def _shared_state_bytes(config: Config) -> int:
    name = config.optim.name
    if name in (OptimizerName.adamw, OptimizerName.paged_adamw_32bit):
        return 0
    return QMAP_BYTES * (1 if name == OptimizerName.paged_lion_8bit else 2)


def _compute_dtype(config: Config, device: str) -> torch.dtype:
    from qlora.model import TORCH_DTYPES

    if config.quant.compute_dtype != DType.auto:
        return TORCH_DTYPES[config.quant.compute_dtype]
    if device == "cuda" and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def _base_bytes(model: nn.Module, quantized: dict[str, nn.Linear], config: Config, upcast: bool) -> int:
    from qlora.model import embeddings_in_compute_dtype

    weights = {id(m.weight) for m in quantized.values()}
    kept = set() if config.train.float32_embeddings else \
        {id(p) for m in embeddings_in_compute_dtype(model, config.lora.modules_to_save) for p in m.parameters()}
    total = sum(quantized_weight_bytes(m.weight.numel(), m.out_features, config) for m in quantized.values())
    for p in model.parameters():
        if id(p) not in weights:
            float32 = upcast and p.is_floating_point() and id(p) not in kept
            total += p.numel() * (4 if float32 else p.element_size())
    return total + sum(nbytes(b) for b in model.buffers())


def _trainable(model: nn.Module, adapted: list[nn.Linear], config: Config, upcast: bool) -> list[torch.Tensor]:
    """Meta tensors shaped and typed as the run's trainable parameters: LoRA A and B (float32, as peft keeps
    adapters over a quantized or half-precision base), DoRA magnitudes, and full copies of modules_to_save."""
    cfg = config.lora
    tensors = []
    for module in adapted:
        tensors.append(torch.empty(cfg.r, module.in_features, device="meta"))
        tensors.append(torch.empty(module.out_features, cfg.r, device="meta"))
        if cfg.dora:
            tensors.append(torch.empty(module.out_features, device="meta"))
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in cfg.modules_to_save:
            for p in module.parameters():
                dtype = torch.float32 if upcast and p.is_floating_point() else p.dtype
                tensors.append(torch.empty(p.shape, dtype=dtype, device="meta"))
    return tensors


def adapted_linears(model: nn.Module, config: Config) -> list[nn.Linear]:
    """The linear layers lora.target_modules names (all but the output head for all-linear), as peft matches them."""
    from qlora.lora import ALL_LINEAR, linear_module_names

    targets = config.lora.target_modules
    names = linear_module_names(model) if list(targets) == [ALL_LINEAR] else list(targets)
    head = model.get_output_embeddings()
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and name.rsplit(".", 1)[-1] in names]


@dataclass
class _PerToken:
    activations: float
    logits: float
    workspace: float

    @property
    def total(self) -> float:
        return self.activations + self.logits + self.workspace


def _activation_per_token(arch, adapted: int, config: Config, dtype: torch.dtype, autocast: bool,
                          upcast: bool, checkpointed: int, eager: bool) -> _PerToken:
    """Bytes per token of the micro batch: saved activations, logits, and transient gradients, with the first
    `checkpointed` decoder layers recomputed in backward (`eager`: the attention implementation keeps its score
    matrices)."""
    compute = torch.finfo(dtype).bits // 8
    coeff = LAYER_BYTES[(2, True)] if compute == 2 or autocast else LAYER_BYTES[(4, False)]
    hidden, layers = arch.hidden_size, arch.num_hidden_layers
    heads = arch.num_attention_heads
    head_dim = getattr(arch, "head_dim", None) or hidden // heads
    kv = (getattr(arch, "num_key_value_heads", None) or heads) * head_dim
    intermediate = getattr(arch, "intermediate_size", None) or 4 * hidden
    adapted_per_layer = adapted / layers
    share = adapted_per_layer / 7  # the coefficients were measured with all seven linear layers adapted
    layer = (coeff.hidden * hidden + coeff.intermediate * intermediate + coeff.kv * kv
             + coeff.rank * config.lora.r * adapted_per_layer + coeff.heads * heads + coeff.scalar)
    if eager:  # the attention matrix itself: float32 softmax, and its cast
        layer += heads * config.train.seq_len * (4 + compute)
    if config.lora.dropout > 0:
        layer += share * (coeff.dropout_hidden * hidden + coeff.dropout_intermediate * intermediate)
    residual = 4 if upcast else compute
    # A recomputed layer keeps only its input, and is recomputed when the backward pass reaches it; the first
    # layers are the ones recomputed, so by then the kept layers' activations are gone: one layer's at a time.
    kept = layers - checkpointed
    activations = checkpointed * residual * hidden + max(kept, 1 if checkpointed else 0) * layer
    activations += 3 * residual * hidden  # embeddings, final norm, head input
    # Chunked, a token keeps only its hidden state for its chunk's recompute (one chunk's logits: Plan.loss_chunk_bytes)
    logits = hidden * compute if config.train.loss_chunk_tokens else arch.vocab_size * (compute + LOGITS_BYTES)
    workspace = 2 * residual * hidden  # the residual stream's gradient, in and out of a layer
    return _PerToken(activations, logits, workspace)


def flops_per_token(arch, model: nn.Module, config: Config, checkpointed: int = 0) -> float:
    """See `Plan.flops_per_token`. Attention over a causal window of seq_len tokens averages seq_len / 2 keys."""
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    heads = arch.num_attention_heads
    head_dim = getattr(arch, "head_dim", None) or arch.hidden_size // heads
    attention = 2 * 2 * arch.num_hidden_layers * heads * head_dim * config.train.seq_len / 2  # QK^T and AV
    forward = 2 * matmul + attention
    backward = 2 * matmul + 2 * attention
    return forward + backward + forward * checkpointed / arch.num_hidden_layers


# Measurements the plan is checked against (tests, scripts/plan_vs_measured.py).


def measured_state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer state, each storage once (the 8-bit code books are shared)."""
    storages = {}
    for values in optimizer.state.values():
        for value in values.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # 0-dim: torch AdamW's step counter
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def measured_saved_bytes(model, batch: torch.Tensor, autocast: bool) -> int:
    """Bytes autograd keeps for the backward pass of one forward and loss (each storage once, weights excluded)."""
    from qlora.evaluation import token_loss_sum

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            nested = [state.state2.absmax, state.state2.code] if state.state2 is not None else []
            for t in [state.absmax, state.code, getattr(state, "offset", None), *nested]:
                if isinstance(t, torch.Tensor):
                    weights.add(t.untyped_storage().data_ptr())
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    cast = torch.autocast(batch.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        logits = model(input_ids=batch).logits
        token_loss_sum(logits, batch)
    return sum(saved.values())


class PeakBytes(TorchDispatchMode):
    """The most bytes that tensors created inside this context held at once: every new storage an operator returns
    counts until it is freed (forward, backward and recomputation alike, on any device). Not counted: what existed
    before, such as the weights.

        with PeakBytes() as peak:
            loss(...).backward()
        peak.bytes
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = self._live = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, n = storage.data_ptr(), storage.nbytes()
            if n and key not in given and key not in self._seen:  # new, not a view or an in-place result
                self._seen.add(key)
                self._live += n
                self.bytes = max(self.bytes, self._live)
                weakref.finalize(storage, self._freed, key, n)
        return out

    def _freed(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self._live -= n


def _capacity(config: Config, device: str) -> int | None:
    if config.train.memory_limit_gb is not None:
        return int(config.train.memory_limit_gb * GIB)
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None


def _host_budget(device: str) -> int | None:
    """The memory a CPU run without train.memory_limit_gb may use: the RAM available now less HOST_RESERVE, shared
    by the processes of this machine."""
    if device != "cpu":
        return None
    available = memory.available_ram()
    if available is None:
        return None
    return max(0, available - HOST_RESERVE) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def gib(n: float) -> str:
    """Bytes for people: GiB, or MiB below one GiB."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.1f} MiB"


def describe(p: Plan, config: Config) -> str:
    """The plan as a table a person reads, with the verdict and what to change."""
    t = config.train
    pairs = " pairs (2 sequences each)" if p.sequences_per_item == 2 else ""
    rows = [
        ("process", "Python, libraries, tokenizer, data (resident now)", p.host_bytes),
        ("base model", f"{p.parameters:,} parameters, {p.quantized_parameters:,} quantized "
                       f"({config.quant.method.value}{'+dq' if config.quant.double_quant else ''})", p.base_bytes),
        ("LoRA weights", f"{p.trainable_parameters:,} trainable (r={config.lora.r})", p.trainable_bytes),
        ("LoRA gradients", "", p.gradient_bytes),
        ("optimizer state", config.optim.name.value + (" (paged: CUDA unified memory)" if p.optimizer_paged else ""),
         p.optimizer_bytes),
        ("activations", f"micro batch {t.micro_batch_size}{pairs} x seq_len {t.seq_len}, {recomputed(p, config)} "
                        "(estimate)", p.activation_bytes),
        ("logits and loss", (f"chunks of {t.loss_chunk_tokens} tokens, float32 (estimate)" if t.loss_chunk_tokens
                             else "all positions' float32 log-softmax and its gradients (estimate)"), p.logits_bytes),
        ("workspace", "dequantized weight, gradients in flight (estimate)", p.workspace_bytes),
        ("reference pass", "DPO's base without the adapter, no gradients: logits, one layer (estimate)",
         p.reference_bytes),
        ("LoftQ init", "before training: the largest adapted weight's float32 copies (estimate)", p.init_bytes),
        ("allocator", f"freed temporaries malloc keeps: {p.allocator_share:.0%} of a step's (measured; "
                      "QLORA_MALLOC=compact: 0)",
         p.allocator_bytes),
    ]
    rows = [r for r in rows if r[2] or r[0] not in ("process", "allocator", "LoftQ init", "reference pass")]
    width = max(len(r[0]) for r in rows)
    lines = [f"qlora plan: {p.model} on {p.device} ({p.dtype} compute)"]
    lines += [f"  {name:<{width}}  {gib(n):>11}  {what}" for name, what, n in rows]
    lines.append(f"  {'total':<{width}}  {gib(p.total_bytes):>11}  peak, estimated")
    if p.capacity_bytes is None:
        lines.append("  no GPU visible: give train.memory_limit_gb=N to check a card of N GiB")
        return "\n".join(lines)
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"  {verdict} in {gib(p.capacity_bytes)} ({gib(CUDA_RESERVE)} kept free for CUDA); "
                 f"largest micro batch at seq_len {t.seq_len}: {p.largest_micro_batch(t.seq_len)}; "
                 f"longest seq_len at micro batch {t.micro_batch_size}: {p.largest_seq_len(t.micro_batch_size)}")
    return "\n".join(lines)


def checkpointed_layers(config: Config, device: str, known: Plan | None = None) -> int | None:
    """How many decoder layers (the first ones) a run recomputes in backward: None for every one
    (train.gradient_checkpointing=true), 0 for false, and for auto the plan's choice (`known` when given)."""
    setting = config.train.gradient_checkpointing
    if setting != AUTO:
        return None if setting else 0
    try:
        p = known or plan(config, device)
    except Exception as e:  # auto must not fail a run that gradient_checkpointing=true would train
        log.warning("gradient checkpointing on every layer: the memory plan failed (%s)", first_line(e))
        return None
    log.info("gradient checkpointing: %s; planned peak %s", recomputed(p, config), gib(p.total_bytes))
    return p.checkpointed_layers


def recomputed(p: Plan, config: Config) -> str:
    """Which layers gradient checkpointing recomputes, for people."""
    setting = config.train.gradient_checkpointing
    how = AUTO if setting == AUTO else f"gradient_checkpointing={str(setting).lower()}"
    return f"{p.checkpointed_layers} of {p.layers} layers recomputed ({how})"


def check_fits(config: Config, device: str) -> Plan | None:
    """The run's plan; on a GPU, refuse a run whose estimated peak exceeds it (train.check_memory), naming what to
    change. None when train.check_memory=false."""
    if not config.train.check_memory:
        return None
    p = plan(config, device)
    if device != "cuda":
        return p
    log.info("memory plan: %s peak of %s usable (qlora plan for the breakdown)", gib(p.total_bytes),
             gib(p.usable_bytes) if p.usable_bytes is not None else "?")
    if p.fits is not False:
        return p
    t = config.train
    if p.fixed_bytes > p.usable_bytes:
        options = ["a smaller model", "a lower lora.r"]
        if not (config.quant.method in (QuantMethod.nf4, QuantMethod.fp4) and config.quant.double_quant):
            options.append("quant=nf4-dq")
        if config.train.prepare_kbit and config.train.float32_embeddings and config.quant.method != QuantMethod.none:
            options.append("train.float32_embeddings=false (embeddings and head in the compute dtype)")
        advice = f"the weights, LoRA and optimizer state alone need {gib(p.fixed_bytes)}: use {', '.join(options)}"
    else:
        batch, seq = p.largest_micro_batch(t.seq_len), p.largest_seq_len(t.micro_batch_size)
        options = []
        if batch:
            options.append(f"train.micro_batch_size={batch} (raise train.grad_accum_steps to keep the batch)")
        if seq:
            options.append(f"train.seq_len={seq}")
        if p.checkpointed_layers < p.layers - 1:
            options.append("train.gradient_checkpointing=auto")
        advice = "set " + " or ".join(options) if options else "use a smaller model"
    raise QloraError(f"the run needs about {gib(p.total_bytes)} of GPU memory and {gib(p.usable_bytes)} is usable "
                     f"(qlora plan shows the breakdown); {advice}, or train.check_memory=false to try anyway")


def oom_message(cfg: TrainConfig, step: int) -> str:
    """What to lower when training step `step` ran out of GPU memory after all."""
    advice = [f"train.micro_batch_size={cfg.micro_batch_size} (raise train.grad_accum_steps to keep the batch)",
              f"train.seq_len={cfg.seq_len}"]
    if cfg.gradient_checkpointing is not True:
        advice.append("or set train.gradient_checkpointing=true")
    return f"out of GPU memory in training step {step}; lower {', '.join(advice)}"
