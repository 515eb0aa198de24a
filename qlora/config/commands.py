"""The schemas of the commands other than `qlora train`: each a dataclass whose fields are the command's
`key=value` arguments (nested dataclasses give dotted keys, `export.dtype=...`).

`qlora plan` and `qlora data preview` take training overrides besides their own keys; `qlora COMMAND --help`
lists the keys of each, with the docstrings written under the fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from qlora.config.schema import DataConfig, DType


class ExportFormat(str, Enum):
    hf = "hf"
    gguf = "gguf"
    adapter = "adapter"


class MergeMode(str, Enum):
    """Which base weights the LoRA update is added to."""

    dequantized = "dequantized"
    original = "original"


class GGUFType(str, Enum):
    """A GGUF file type, named as llama.cpp's llama-quantize names them (docs/export.md has each one's mix)."""

    auto = "auto"
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"
    q5_1 = "q5_1"
    q5_0 = "q5_0"
    q4_1 = "q4_1"
    q4_0 = "q4_0"
    q6_k = "q6_k"
    q5_k_m = "q5_k_m"
    q5_k_s = "q5_k_s"
    q4_k_m = "q4_k_m"
    q4_k_s = "q4_k_s"

    @property
    def k_quant(self) -> bool:
        """Packed by auto-round (the `quantize` extra), and calibrated."""
        return self.value.startswith(("q4_k", "q5_k", "q6_k"))


@dataclass
class ExportConfig:
    format: ExportFormat = ExportFormat.hf
    """hf: a merged Hugging Face model folder (safetensors); gguf: one GGUF file for llama.cpp-family runtimes;
    adapter: the trained adapter alone (peft format), for loading or merging onto the base elsewhere."""
    merge: MergeMode = MergeMode.dequantized
    """dequantized: the base weights the adapter was trained against (the quantized weights, dequantized) plus
    the LoRA update, so the export computes what was trained; original: the unquantized base checkpoint plus the
    update (a different function: the adapter never saw those weights; the export reports by how much)."""
    dtype: DType = DType.bfloat16
    """Dtype of the merged weights: bfloat16, float16 or float32."""
    gguf_type: GGUFType = GGUFType.auto
    """GGUF file type: f32, f16, bf16, q8_0 (8-bit blocks); q5_1, q5_0, q4_1, q4_0 (the gguf package's 5- and
    4-bit blocks); the K-quant mixes q6_k, q5_k_m, q5_k_s, q4_k_m (the usual 4-bit download), q4_k_s, which need
    pip install 'qlora[quantize]'. Each tensor gets llama.cpp's type for it in that mix; auto follows export.dtype."""
    calibration: str = "run_data"
    """What the K-quants are calibrated on: run_data (sequences of the run's training data, not the held-out ones
    the export is measured on), none (plain round-to-nearest), or a data file in the run's data.format."""
    calibration_samples: int = 128
    """Sequences the importance matrix is computed from (each up to the run's train.seq_len tokens)."""
    max_shard_size: str = "5GB"
    """Largest safetensors file of an hf export (KB / MB / GB, or KiB / MiB / GiB); also bounds the memory the
    merge holds at once."""
    probe_samples: int = 4
    """Held-out sequences (the run's eval split, else a fixed text) the export is verified on."""
    probe_seq_len: int = 256
    """Longest probe sequence in tokens."""
    max_kl: float = 1e-8
    """Verification fails when the mean KL divergence (nats per token) between the export's next-token
    distribution and that of the model it claims to be, rounded as the export stores it (its weights through
    export.dtype, or the GGUF file's tensor types), exceeds this; both are computed in float32. A right export
    differs by floating-point operation order alone (0 on the CPU); 1e-8 leaves room for other kernels on a GPU,
    while the wrong merges measured on SmolLM2 gave 6.0e-7 (one layer's update left out, 8-step run) to 0.26
    (docs/export.md). What the rounding itself costs against the trained model is reported, not limited."""
    compare_original: bool = True
    """Also measure how far merging into the original (unquantized) base would drift from the trained model;
    costs one more load of the base."""


@dataclass
class ExportCommand:
    """`qlora export`: a finished run (or one of its checkpoints) turned into a model that runs anywhere."""

    run_dir: str = "???"
    """The run folder (or a checkpoint folder inside it, RUN/checkpoints/step-N) to export."""
    output_dir: str = "???"
    """Folder the export is written to (must not hold files, unless overwrite=true)."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """What to write and how it is verified (docs/export.md)."""
    overwrite: bool = False
    """Replace an export already in output_dir (only once the new one is complete and verified)."""
    debug: bool = False
    """Show the traceback of an error instead of its one-line message."""


@dataclass
class GenerateCommand:
    """`qlora generate`: sample from a run (quantized base + adapter) or from a merged export."""

    prompt: str = "???"
    """The user's message; formatted as the model was trained (the run's prompt format or chat template)."""
    run_dir: str | None = None
    """A run folder (or one of its checkpoints): the base model loaded as trained, plus the adapter."""
    model: str | None = None
    """A merged export folder (or any Hugging Face model folder or hub id)."""
    max_new_tokens: int = 256
    """Most tokens to generate."""
    temperature: float = 0.7
    """Sampling temperature; 0 decodes greedily."""
    top_p: float = 0.9
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Seed for sampling (None: a different sample each time)."""
    template: bool = True
    """Format the prompt as in training (chat template, Alpaca prompt); false sends the text as it is."""
    stream: bool = True
    """Print tokens as they are generated."""
    debug: bool = False
    """Show the traceback of an error instead of its one-line message."""


class EvalSubset(str, Enum):
    """Which of the dataset's sequences `qlora eval` scores."""

    auto = "auto"
    eval = "eval"
    train = "train"
    all = "all"


@dataclass
class EvalCommand:
    """`qlora eval`: perplexity and mean token loss of a run, a merged export or a base model on a dataset."""

    run_dir: str | None = None
    """A run folder (or one of its checkpoints): the base loaded as trained, plus the adapter."""
    model: str | None = None
    """A Hugging Face model folder or hub id: a base model or a merged export."""
    quant: str | None = None
    """Load the base quantized as the quant config group's option of that name: none, nf4, nf4-dq, fp4, fp4-dq,
    int8. Default: as the run trained; a model= loads unquantized."""
    base: bool = False
    """With run_dir: also score the base without the adapter (as loaded for the run), as a second row."""
    data: DataConfig = field(default_factory=DataConfig)
    """The dataset, with the keys of training's data group. With run_dir it starts as the run's data settings,
    so only what differs needs giving (e.g. data.path=other.json)."""
    subset: EvalSubset = EvalSubset.auto
    """Which sequences to score: eval (the held-out split, drawn as in training), train, or all; auto is eval for
    a run on its own data and all otherwise."""
    seq_len: int | None = None
    """Longest sequence in tokens (longer samples as data.overlong says; text is split into windows). Default:
    the run's train.seq_len, else the model's positions up to 2048."""
    batch_size: int = 8
    """Sequences per forward pass."""
    max_sequences: int | None = None
    """Score at most this many sequences (the first of the subset, in data order). Default: all, except for a run
    scored on its own eval split, which gets the first train.eval_max_sequences, as its training evaluations did."""
    seed: int | None = None
    """Seed of the train/eval split. Default: the run's seed, else 42 (training's default)."""
    output: str = "eval.json"
    """JSON file the results are written to (replaced whole)."""
    debug: bool = False
    """Show the traceback of an error instead of its one-line message."""


class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


@dataclass
class PlanCommand:
    """`qlora plan`: the run's memory from the model's config alone (nothing downloaded or loaded): quantized base,
    LoRA, optimizer state, activations, and what fits (train.memory_limit_gb=N plans for a card of N GiB)."""

    device: Device | None = None
    """Plan for a GPU (cuda) or for the CPU. Default: where `qlora train` would run on this machine."""


@dataclass
class PreviewCommand:
    """`qlora data preview`: samples as trained (trained tokens marked), lengths, counts and padding, without
    loading the model."""

    samples: int = 3
    """Samples to show."""


@dataclass
class ReportCommand:
    """`qlora report`: (re)draw a run's report.html and report.png from its run folder."""

    run_dir: str = "???"
    """The run folder to draw."""
    debug: bool = False
    """Show the traceback of an error instead of its one-line message."""


@dataclass
class RecipesCommand:
    """`qlora recipes`: the recipe catalog (task, model, GPU memory and time of each). It takes no keys."""
