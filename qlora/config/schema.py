"""The training schema: one dataclass per Hydra config group, and the closed choices of their fields.

Hydra merges the YAML files in `configs/` and `recipes/` onto these dataclasses, so an unknown key or a wrong
type fails at composition. The docstring under each field is its reference documentation (docs/config.md and
`qlora COMMAND --help` are generated from it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

AUTO = "auto"
"""train.gradient_checkpointing's third value, beside true and false."""


class QuantMethod(str, Enum):
    """How the frozen base weights are stored (bitsandbytes)."""

    nf4 = "nf4"
    fp4 = "fp4"
    int8 = "int8"
    none = "none"


class DType(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class OptimizerName(str, Enum):
    paged_adamw_8bit = "paged_adamw_8bit"
    paged_adamw_32bit = "paged_adamw_32bit"
    paged_lion_8bit = "paged_lion_8bit"
    adamw_8bit = "adamw_8bit"
    adamw = "adamw"


class Schedule(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class LoraInit(str, Enum):
    """How the adapter matrices start (peft's init_lora_weights, and LoftQ)."""

    default = "default"
    gaussian = "gaussian"
    loftq = "loftq"
    pissa = "pissa"
    olora = "olora"
    eva = "eva"


class DataFormat(str, Enum):
    alpaca = "alpaca"
    chat = "chat"
    text = "text"
    preference = "preference"


class ObjectiveName(str, Enum):
    """What the adapter is trained to do: imitate answers (sft) or prefer one answer of a pair (the others)."""

    sft = "sft"
    dpo = "dpo"
    orpo = "orpo"
    simpo = "simpo"


class DPOLoss(str, Enum):
    """The DPO loss on the pair's reward margin h (Rafailov et al. 2023; IPO: Azar et al. 2023)."""

    sigmoid = "sigmoid"
    ipo = "ipo"
    hinge = "hinge"


class Overlong(str, Enum):
    """What happens to a sample longer than train.seq_len (alpaca and chat formats)."""

    truncate = "truncate"
    drop = "drop"
    error = "error"


class OnInvalid(str, Enum):
    """What happens to a record with a missing or empty field, or nothing to train."""

    error = "error"
    skip = "skip"


class OnNonFinite(str, Enum):
    """What happens when a training step's loss (or gradient norm) is NaN or infinite."""

    stop = "stop"
    skip = "skip"


class Logger(str, Enum):
    """Where training metrics and hyperparameters go besides output_dir/metrics.jsonl."""

    tensorboard = "tensorboard"
    wandb = "wandb"
    mlflow = "mlflow"


class ScratchArchitecture(str, Enum):
    llama = "llama"
    mistral = "mistral"
    qwen2 = "qwen2"


class ScratchTokenizer(str, Enum):
    demo = "demo"
    bpe = "bpe"


class MixedPrecision(str, Enum):
    auto = "auto"
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class DistStrategy(str, Enum):
    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"


@dataclass
class ScratchModelConfig:
    """A randomly initialised model (Llama architecture by default), saved as an ordinary HF model folder at `path` the
    first time `model.name_or_path` points there, with a tokenizer built alongside it. Used by the offline
    demo, by CPU-sized recipes, and for speed/memory benchmarks (which do not depend on weights)."""

    path: str = "???"
    """Folder the model is built in (and then loaded from, like any other model folder)."""
    architecture: ScratchArchitecture = ScratchArchitecture.llama
    """Transformers architecture to build: llama, mistral or qwen2 (which adds q/k/v biases)."""
    tokenizer: ScratchTokenizer = ScratchTokenizer.demo
    """demo: the offline demo's word-level tokenizer; bpe: a byte-level BPE trained on tokenizer_corpus."""
    tokenizer_corpus: str | None = None
    """Data file (json / jsonl / csv / parquet) whose text trains the bpe tokenizer."""
    tokenizer_vocab_size: int = 4096
    """Vocabulary size of the bpe tokenizer, special tokens included."""

    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 256
    """Width of the MLP."""
    num_hidden_layers: int = 2
    """Transformer blocks."""
    num_attention_heads: int = 4
    """Query heads; hidden_size must divide by it."""
    num_key_value_heads: int = 2
    """Fewer than num_attention_heads gives grouped-query attention, as in Llama 3."""
    max_position_embeddings: int = 256
    """Longest sequence the model supports."""
    vocab_size: int | None = None
    """Embedding rows; None uses the tokenizer's vocabulary size."""
    seed: int = 0
    """Seed of the random initialisation (independent of the training seed)."""


@dataclass
class ArchitectureConfig:
    """The fields of a model's config.json that fix its tensor shapes (None: not given, or the architecture's
    default). Recorded for the catalog's hub models; `qlora plan` builds the model's skeleton from them."""

    model_type: str | None = None
    """transformers model type: llama, mistral, qwen2, gemma2, phi3, ..."""
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool | None = None
    max_position_embeddings: int | None = None

    def given(self) -> dict:
        """The fields that are set, as config.json keys."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class ModelConfig:
    name_or_path: str = "???"
    """A local Hugging Face model folder or a hub model id."""
    revision: str = "main"
    """Hub revision (branch, tag or commit); ignored for local folders."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository to run; only for architectures transformers lacks."""
    attn_implementation: str = AUTO
    """Attention kernel passed to transformers: auto (sdpa where transformers supports it for the architecture,
    else eager; read from the model's config, logged), sdpa, eager, or flash_attention_2 where installed."""
    scratch: ScratchModelConfig | None = None
    """A random-init model to build when name_or_path is its path and the folder is missing."""
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    """The shapes from the model's config.json, so `qlora plan` can size a hub model without downloading
    anything (a local folder's config.json or the scratch settings take precedence)."""


@dataclass
class QuantConfig:
    method: QuantMethod = QuantMethod.nf4
    """Storage of the frozen base: nf4 / fp4 (4-bit), int8 (LLM.int8), none (unquantized LoRA baseline)."""
    double_quant: bool = True
    """Quantize the per-block absmax constants too (4-bit only): 0.5 -> 0.127 bits per parameter."""
    compute_dtype: DType = DType.auto
    """Dtype the 4-bit weights are dequantized to for matmuls, and of unquantized base weights.
    auto: bfloat16 on a GPU that supports it, else float32."""
    int8_threshold: float = 6.0
    """LLM.int8 outlier threshold (int8 only)."""


@dataclass
class LoraConfig:
    r: int = 16
    """Rank of the adapter matrices."""
    alpha: float = 32.0
    """Scaling numerator: the update is (alpha / r) * B @ A (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (e.g. [q_proj, v_proj]); all-linear: every linear layer but the output head."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)."""
    dora: bool = False
    """Weight-decomposed LoRA (Liu et al. 2024): trains magnitude and direction separately."""
    modules_to_save: list[str] = field(default_factory=list)
    """Extra modules trained in full and saved with the adapter (e.g. [lm_head, embed_tokens])."""
    init: LoraInit = LoraInit.default
    """How the adapter starts. default: A Kaiming-uniform, B = 0 (the adapter starts as a no-op); gaussian: A normal
    with std 1/r, B = 0; loftq: B @ A set to the best rank-r approximation of the 4-bit base's quantization error
    (float checkpoint weight minus the dequantized weight, by SVD), so base + adapter starts nearer the float model
    (4-bit bases; reads the checkpoint's safetensors; logged with its cost). pissa, olora and eva are refused: see
    docs/fidelity.md."""
    loftq_iters: int = 1
    """LoftQ alternations. Only 1: with the base fixed as the checkpoint's 4-bit weights, one SVD of the residual is
    already the best rank-r correction; more iterations re-quantize the base, which export and eval do not load."""


@dataclass
class ColumnsConfig:
    """Which record fields hold what, for datasets whose field names differ from the usual layouts."""

    instruction: str = "instruction"
    """alpaca: the task."""
    input: str = "input"
    """alpaca: optional context for the task (may be missing or empty)."""
    output: str = "output"
    """alpaca: the response that is trained."""
    text: str = "text"
    """text: the document."""
    messages: str | None = None
    """chat: the list of messages; None: `messages` (OpenAI layout) or `conversations` (ShareGPT), whichever
    the record has."""
    role: str | None = None
    """chat: the message field naming the speaker; None: `role` (OpenAI) or `from` (ShareGPT)."""
    content: str | None = None
    """chat: the message field holding the text; None: `content` (OpenAI) or `value` (ShareGPT)."""
    prompt: str = "prompt"
    """preference: the prompt, text or a list of messages (may be missing when chosen and rejected hold it)."""
    chosen: str = "chosen"
    """preference: the preferred answer: text, a list of messages, or a whole Human / Assistant transcript."""
    rejected: str = "rejected"
    """preference: the dispreferred answer, in the same layout as chosen."""


@dataclass
class RolesConfig:
    """Speaker names in the data, by the role they play in the chat template."""

    system: list[str] = field(default_factory=lambda: ["system"])
    """Names of the system role."""
    user: list[str] = field(default_factory=lambda: ["user", "human"])
    """Names of the user role (never trained)."""
    assistant: list[str] = field(default_factory=lambda: ["assistant", "gpt"])
    """Names of the assistant role (every assistant turn is trained)."""


@dataclass
class DataConfig:
    path: str = "???"
    """A local json / jsonl / csv / parquet file, or a hub dataset id."""
    format: DataFormat = DataFormat.alpaca
    """alpaca: instruction / input / output records; chat: conversations (OpenAI or ShareGPT layout) rendered
    with a chat template; text: raw text for continued pretraining; preference: prompt / chosen / rejected pairs
    for objective=dpo, orpo or simpo (docs/preference.md)."""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    """Field names of the records."""
    roles: RolesConfig = field(default_factory=RolesConfig)
    """chat: which speaker names mean system, user and assistant."""
    chat_template: str | None = None
    """chat: None uses the tokenizer's own template; chatml or llama3 name a built-in one; anything else is
    taken as a Jinja template. The template used is saved with the run's tokenizer."""
    split: str = "train"
    """Split to read from a hub dataset."""
    eval_path: str | None = None
    """A separate eval file (same format); when set, eval_fraction is not used."""
    eval_fraction: float = 0.05
    """Share of records held out for eval loss (0 disables eval); split by record, seeded by `seed`."""
    train_on_prompt: bool = False
    """Also train on the prompt / user tokens; by default only responses (and their EOS) count."""
    overlong: Overlong = Overlong.truncate
    """alpaca / chat samples longer than train.seq_len: truncate, drop, or error. Text documents are split
    into seq_len windows instead."""
    on_invalid: OnInvalid = OnInvalid.skip
    """A record with a missing or empty field or nothing to train: skip (leave it out, each one named in the log and
    in summary.json; at most data.max_invalid_fraction of a file) or error (stop, naming every such record)."""
    max_invalid_fraction: float = 0.01
    """With on_invalid=skip: the largest share of a file's records that may be invalid. More stops the run as
    on_invalid=error would: that many bad records means a wrong data.format or data.columns, not a few typos."""
    packing: bool = False
    """Pack several samples into each sequence (no padding waste); position ids restart per sample and
    attention never crosses samples."""
    group_by_length: bool = True
    """Without packing: batch samples of similar length together (less padding), in a seeded random order.
    Sorting makes each batch less varied; on a dataset of a few hundred samples, or samples of equal length,
    turn it off."""
    cache: bool = True
    """Keep tokenized data under cache_dir/tokenized, keyed on the data file, tokenizer, template and these
    settings, so a second run starts immediately."""
    generate_demo: bool = False
    """Write the project's generated demo dataset to `path` if the file is missing and `path` is inside
    cache_dir (the offline demo); elsewhere `path` is read like any data file."""


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.paged_adamw_8bit
    """paged_adamw_8bit, paged_adamw_32bit, paged_lion_8bit, adamw_8bit (bitsandbytes), adamw (torch)."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay on the adapter weights."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Moment decay rates (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW's denominator epsilon (Lion has none)."""
    max_grad_norm: float = 0.3
    """Clip the global gradient norm to this (the QLoRA paper's 0.3); 0 disables clipping."""
    schedule: Schedule = Schedule.cosine
    """Learning-rate shape after warmup: constant, linear or cosine decay to 0."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer steps."""
    min_8bit_size: int = 4096
    """bitsandbytes keeps 32-bit state for tensors with fewer elements than this."""
    lora_plus_ratio: float | None = None
    """LoRA+ (Hayou et al. 2024): the B matrices train at lr x this ratio (the paper suggests 16), A and everything
    else at lr; the schedule scales both groups. None: one learning rate."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to train for."""
    micro_batch_size: int = 4
    """Sequences per forward/backward pass."""
    grad_accum_steps: int = 4
    """Micro batches per optimizer step."""
    seq_len: int | str = 512
    """Longest sequence in tokens; longer samples are truncated (data.overlong). auto: the shortest multiple of 64
    that holds 99% of the training samples whole, at most the model's positions and 4096 (logged; config.yaml in
    the run folder records the number chosen)."""
    eval_every_steps: int = 50
    """Run the eval loss every N optimizer steps (and at step 0 and the end); 0 disables."""
    eval_max_sequences: int = 256
    """Score at most this many held-out sequences per evaluation (the same ones each time, so evaluations compare);
    the share of the run's time spent evaluating is logged and in summary.json."""
    log_every_steps: int = 10
    """Write a metrics row every N optimizer steps."""
    gradient_checkpointing: bool | str = AUTO
    """Recompute decoder layers' activations in the backward pass instead of keeping them: less memory for more
    compute (a layer's forward again). auto: as few layers as fit the GPU's memory (train.memory_limit_gb, else the
    GPU's; the free RAM on a CPU) by the memory plan, none when everything fits; true: every layer; false: none."""
    prepare_kbit: bool = True
    """peft's k-bit preparation: upcast norms and unquantized weights to float32 for stable training."""
    float32_embeddings: bool = False
    """With prepare_kbit, upcast the frozen input and output embeddings too (peft's default; 2 GiB more for Llama
    3.1 8B). Off, they stay in the compute dtype; embeddings in lora.modules_to_save are float32 either way."""
    loss_chunk_tokens: int = 512
    """Apply the output embeddings and the cross-entropy to this many trained positions at a time, recomputing each
    chunk's logits in backward: the whole [tokens, vocab] float32 logits (gigabytes for a 128k vocabulary) never
    exist, and prompt and padding positions get no logits at all. 0: the model's full logits."""
    per_sample_attention: bool = True
    """With data.packing and sdpa attention: compute each packed sample's attention on its own (causal within the
    sample; on a GPU in bf16 / fp16 torch's variable-length flash attention) instead of over the whole row under a
    block-diagonal mask, which scores every pair of the row's tokens and discards most. false: the mask."""
    mixed_precision: MixedPrecision = MixedPrecision.auto
    """accelerate autocast: auto is bf16 on a GPU that supports it, else no."""
    num_workers: int = 0
    """DataLoader worker processes."""
    sample_prompts: list[str] = field(default_factory=list)
    """Instructions to answer with greedy decoding before and after training (printed and saved to samples.json)."""
    samples_from_eval: int = 0
    """Also answer the prompts of this many held-out records (the first of the eval split; alpaca and chat data),
    shown beside the record's own answer."""
    max_new_tokens: int = 64
    """Tokens to generate per sample prompt."""
    progress: bool = True
    """Show a progress bar (step, loss, lr, tokens/s, memory, ETA) when attached to a terminal; otherwise, or with
    false, one log line per metrics row."""
    loggers: list[Logger] = field(default_factory=lambda: [Logger.tensorboard])
    """Metrics and hyperparameters also go to: tensorboard (output_dir/tb), wandb, mlflow (optional extras:
    pip install 'qlora[wandb]' / 'qlora[mlflow]'); [] for metrics.jsonl only."""
    project: str = "qlora"
    """The W&B project and MLflow experiment runs are logged under."""
    report: bool = True
    """Write output_dir/report.html and report.png (curves, summary, samples) at the end of the run."""
    check_memory: bool = True
    """Before loading anything, estimate the peak GPU memory (as `qlora plan` does) and refuse a run that cannot
    fit the GPU, naming the setting to change; false skips the check."""
    memory_limit_gb: float | None = None
    """GPU memory (GiB) the run may use, for the memory check and `qlora plan`; None: the GPU's total."""
    save_every_steps: int = 200
    """Write a checkpoint (adapter, optimizer, scheduler, RNG states, data position) every N optimizer steps;
    one is also written at the end and on SIGINT / SIGTERM. 0: only those."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (older ones go once a newer one is complete); 0 keeps all."""
    neftune_alpha: float | None = None
    """NEFTune (Jain et al. 2023): add uniform noise in [-1, 1] x alpha / sqrt(L x hidden) to the input embeddings of
    training forwards, L being each sample's own length (packed samples apart, padding untouched); never in
    evaluation, generation or export. 5 is common; None: off."""
    on_nonfinite_loss: OnNonFinite = OnNonFinite.stop
    """A NaN or inf loss or gradient norm: stop (naming the step and the last good checkpoint), or skip that
    update (the run still stops after 10 such steps in a row)."""


@dataclass
class DistConfig:
    """How the processes of a multi-process launch (torchrun, accelerate launch) share the work."""

    strategy: DistStrategy = DistStrategy.none
    """none: one process. ddp: every process holds the whole quantized model and trains on its own shard of the
    data; LoRA gradients are all-reduced. fsdp: the quantized base and the adapter are sharded across the
    processes (FSDP2), so a model too big for one GPU trains on several."""
    cpu_offload: bool = False
    """fsdp: keep the sharded parameters, gradients and optimizer state in CPU memory between uses."""
    timeout_minutes: int = 30
    """How long a process waits for the others at a collective before the run fails."""


@dataclass
class ObjectiveConfig:
    """What the adapter is trained to do. sft: the next-token loss on the answers. dpo, orpo, simpo: prefer each
    pair's chosen answer to its rejected one (data.format=preference; docs/preference.md)."""

    name: ObjectiveName = ObjectiveName.sft
    """sft, dpo (against the base with the adapter switched off as the reference), orpo or simpo (no reference)."""
    beta: float = 0.1
    """dpo: the KL strength beta (0.1; smaller lets the policy move further from the base); orpo: lambda, the
    weight of the odds-ratio term beside the chosen answer's NLL (0.1); simpo: the reward scale beta (2.0)."""
    loss_type: DPOLoss = DPOLoss.sigmoid
    """dpo: sigmoid (the DPO paper's), ipo (squared distance of the margin from 1 / (2 beta)), hinge (SLiC's)."""
    label_smoothing: float = 0.0
    """dpo sigmoid: the assumed share of pairs whose labels are flipped (conservative DPO), in [0, 0.5)."""
    precompute_reference: bool = False
    """dpo: false computes the reference log-probs in each step, from the base with the adapter disabled (no second
    copy of the weights); true computes them once before training and keeps them in cache_dir beside the tokens."""
    gamma: float = 1.0
    """simpo: the target reward margin gamma."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    output_dir: str = "???"
    """Run folder: config.yaml, adapter/, tokenizer/, metrics.jsonl, train.log. Default runs/RECIPE/TIMESTAMP."""
    seed: int = 42
    """Seeds python, numpy and torch; also the data shuffle and eval split."""
    overwrite: bool = False
    """Replace a run already in output_dir (otherwise such a run is never touched)."""
    cache_dir: str = "???"
    """Where generated demo assets (tiny model, dataset) are kept. Default $QLORA_CACHE, else ~/.cache/qlora."""
    resume: str | None = None
    """auto: continue from the newest complete checkpoint in output_dir (start fresh if there is none); or the
    path of a checkpoint (or of a run folder, meaning its newest checkpoint) to continue from."""
    force_resume: bool = False
    """Resume even though the config differs from the checkpoint's in keys that change the result."""
    debug: bool = False
    """Show the traceback of an error instead of its one-line message."""


CHAT_TEMPLATE_NAMES = ("chatml", "llama3")
"""The built-in chat templates data.chat_template can name (their text: qlora.data.formats.CHAT_TEMPLATES)."""


RENAMED_KEYS = {
    "train.eval_max_batches": ("train.eval_max_sequences", "0.2.0", "it counts sequences, not batches"),
}
"""Keys a release renamed: old dotted key -> (its new name, the release that renamed it, what else changed).
CHANGELOG.md lists each; an override that uses an old name is refused with the new one."""

REMOVED_KEYS = {"train": ("eval_max_batches",)}
"""Keys earlier versions wrote into a run's config.yaml that the schema no longer has (train.eval_max_batches became
train.eval_max_sequences): dropped when an old run folder is read, so its runs still export, evaluate and resume."""


def renamed_key_message(key: str) -> str | None:
    """One line for a key an earlier release named differently (None when `key` was never renamed)."""
    if key not in RENAMED_KEYS:
        return None
    new, version, note = RENAMED_KEYS[key]
    return (f"'{key}' was renamed '{new}' in qlora {version} ({note}; CHANGELOG.md lists every renamed key); "
            f"write {new}=...")


def without_removed_keys(saved: dict) -> dict:
    """A saved config (as a plain dict) without REMOVED_KEYS."""
    return {group: ({k: v for k, v in node.items() if k not in REMOVED_KEYS.get(group, ())}
                    if isinstance(node, dict) else node) for group, node in saved.items()}

