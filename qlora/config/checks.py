"""Every check of a config or command that no single field's type can make, in one place.

Each `validate*` function collects all the problems it finds and raises one ConfigError listing them, so a
user fixes a command line in one round.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

from qlora.config.commands import EvalCommand, ExportCommand, ExportFormat, GenerateCommand, GGUFType, MergeMode
from qlora.config.schema import (
    AUTO,
    CHAT_TEMPLATE_NAMES,
    Config,
    DataConfig,
    DataFormat,
    DistStrategy,
    DPOLoss,
    DType,
    Logger,
    LoraInit,
    MixedPrecision,
    ModelConfig,
    ObjectiveName,
    OptimizerName,
    QuantMethod,
    ScratchTokenizer,
)
from qlora.errors import ConfigError, QloraError

DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def is_data_file(path: str) -> bool:
    """Whether data.path names a local file (by suffix or a path-like start) rather than a hub dataset id."""
    return Path(path).suffix in DATA_FILE_SUFFIXES or path.startswith(("/", ".", "~"))


def is_jinja(template: str) -> bool:
    """Whether data.chat_template is a Jinja template itself rather than a built-in template's name."""
    return "{{" in template or "{%" in template


def builds_scratch_model(cfg: ModelConfig) -> bool:
    """Whether the model is (to be) built from `cfg.scratch` rather than loaded as given."""
    return cfg.scratch is not None and cfg.name_or_path == cfg.scratch.path


def inside(path: str, folder: str) -> bool:
    """Whether `path` lies inside `folder` (after ~ and .. are resolved)."""
    return Path(path).expanduser().resolve().is_relative_to(Path(folder).expanduser().resolve())


def generates_demo_data(cfg: Config) -> bool:
    """Whether data.path is the demo dataset to generate: the framework writes generated files in cache_dir only."""
    return cfg.data.generate_demo and inside(cfg.data.path, cfg.cache_dir)


def data_problems(data: DataConfig, generated: bool = False) -> list[str]:
    """What is wrong with the data settings by themselves: the eval fraction, the chat template's name, and data
    files that do not exist
    (data.path is not looked for when it is `generated`, the demo dataset that will be written there)."""
    problems = []
    if not 0 <= data.eval_fraction < 1:
        problems.append(f"data.eval_fraction must be in [0, 1) (got {data.eval_fraction})")
    template = data.chat_template
    if template is not None and template not in CHAT_TEMPLATE_NAMES and not is_jinja(template):
        problems.append(f"data.chat_template={template} is neither a built-in template "
                        f"({', '.join(CHAT_TEMPLATE_NAMES)}) nor a Jinja template")
    files = [("data.path", data.path)] if not generated else []
    if data.eval_path is not None:
        files.append(("data.eval_path", data.eval_path))
    for key, path in files:
        if is_data_file(path) and not Path(path).expanduser().is_file():
            problems.append(f"{key}: {path} does not exist; give a json/jsonl/csv/parquet file or a hub dataset id")
    return problems


LOGGER_PACKAGES = {Logger.tensorboard: "tensorboard", Logger.wandb: "wandb", Logger.mlflow: "mlflow"}
"""The package each train.loggers choice needs, and how to install it."""
LOGGER_INSTALL = {Logger.tensorboard: "pip install tensorboard", Logger.wandb: "pip install 'qlora[wandb]'",
                  Logger.mlflow: "pip install 'qlora[mlflow]'"}


def logger_problems(loggers) -> list[str]:
    """One line per selected logger whose package is not installed, naming the fix; [] when all are there."""
    return [f"train.loggers includes {logger.value}, but {LOGGER_PACKAGES[logger]} is not installed: "
            f"{LOGGER_INSTALL[logger]} (or drop it from train.loggers)"
            for logger in dict.fromkeys(loggers) if importlib.util.find_spec(LOGGER_PACKAGES[logger]) is None]


def dist_problems(cfg: Config) -> list[str]:
    """Combinations the chosen distribution strategy cannot run."""
    dist = cfg.dist
    problems = []
    if dist.timeout_minutes <= 0:
        problems.append(f"dist.timeout_minutes must be > 0 (got {dist.timeout_minutes})")
    if dist.strategy != DistStrategy.fsdp:
        if dist.cpu_offload:
            problems.append(f"dist.cpu_offload applies to dist=fsdp only (dist.strategy={dist.strategy.value}); "
                            "drop it or use dist=fsdp")
        return problems
    if cfg.quant.method == QuantMethod.int8:
        problems.append("dist=fsdp shards 4-bit weights only (bitsandbytes' int8 weights cannot be flattened and "
                        "sharded); use a 4-bit quant (quant=nf4-dq) or dist=ddp")
    if cfg.optim.name != OptimizerName.adamw:
        problems.append(f"dist=fsdp with optim={cfg.optim.name.value}: bitsandbytes optimizers cannot step FSDP's "
                        "sharded (DTensor) parameters; use optim=adamw (the adapter's state is small) or dist=ddp")
    return problems


REFUSED_INITS = {
    LoraInit.pissa: "peft's PiSSA moves the base weight's principal components into the adapter and needs the residual "
                    "re-quantized (its pissa_init refuses a 4-bit weight), so the base trained against would not be "
                    "the 4-bit checkpoint that eval and export load; use lora.init=loftq",
    LoraInit.olora: "peft's OLoRA subtracts Q R from the base weight and re-quantizes it, so the base trained against "
                    "would not be the 4-bit checkpoint that eval and export load; use lora.init=loftq",
    LoraInit.eva: "EVA sets A from an SVD of each layer's activations over the training data before the optimizer is "
                  "built and may move rank between layers (peft's initialize_lora_eva_weights); this recipe does not "
                  "run that pass yet; use lora.init=loftq or gaussian",
}
"""lora.init choices refused, and why (the one-line config error)."""


def quality_problems(cfg: Config) -> list[str]:
    """lora.init / lora.loftq_iters, optim.lora_plus_ratio and train.neftune_alpha against each other and the base."""
    problems = []
    init = cfg.lora.init
    if init in REFUSED_INITS:
        problems.append(f"lora.init={init.value}: {REFUSED_INITS[init]}")
    if init == LoraInit.loftq and cfg.quant.method not in (QuantMethod.nf4, QuantMethod.fp4):
        problems.append(f"lora.init=loftq corrects a 4-bit base's quantization error, and quant.method="
                        f"{cfg.quant.method.value} has none to correct; use quant=nf4 (or fp4), or lora.init=default")
    if init == LoraInit.loftq and cfg.lora.dora:
        problems.append("lora.init=loftq with lora.dora=true: DoRA's magnitudes are computed from the base before "
                        "LoftQ sets the adapter, so the start would not be LoftQ's; set one of them off")
    if cfg.lora.loftq_iters != 1:
        problems.append(f"lora.loftq_iters={cfg.lora.loftq_iters}: only 1; with the base kept as the checkpoint's "
                        "4-bit weights one SVD of the residual is already the best rank-r correction, and more "
                        "iterations re-quantize the base, which eval and export do not load")
    ratio = cfg.optim.lora_plus_ratio
    if ratio is not None and not (ratio > 0 and math.isfinite(ratio)):
        problems.append(f"optim.lora_plus_ratio must be > 0 (got {ratio}); 16 is the paper's, null turns LoRA+ off")
    alpha = cfg.train.neftune_alpha
    if alpha is not None and not (alpha > 0 and math.isfinite(alpha)):
        problems.append(f"train.neftune_alpha must be > 0 (got {alpha}); 5 is common, null turns NEFTune off")
    return problems


def validate(cfg: Config) -> None:
    """Check a training config (`qlora train`, `plan`, `data preview`): what no single field can, and that the
    selected loggers are installed; raise one ConfigError listing every problem found."""
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(cfg.lora.r > 0, f"lora.r must be > 0 (got {cfg.lora.r})")
    need(cfg.lora.alpha > 0, f"lora.alpha must be > 0 (got {cfg.lora.alpha})")
    need(0 <= cfg.lora.dropout < 1, f"lora.dropout must be in [0, 1) (got {cfg.lora.dropout})")
    need(len(cfg.lora.target_modules) > 0, "lora.target_modules is empty; use [all-linear] or module names")
    need(cfg.optim.lr > 0 and math.isfinite(cfg.optim.lr), f"optim.lr must be > 0 (got {cfg.optim.lr})")
    need(cfg.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0 (got {cfg.optim.weight_decay})")
    need(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
         f"optim.betas must be two numbers in [0, 1) (got {list(cfg.optim.betas)})")
    need(cfg.optim.max_grad_norm >= 0, f"optim.max_grad_norm must be >= 0 (got {cfg.optim.max_grad_norm})")
    need(cfg.optim.warmup_steps >= 0, f"optim.warmup_steps must be >= 0 (got {cfg.optim.warmup_steps})")
    for key in ("max_steps", "micro_batch_size", "grad_accum_steps"):
        value = getattr(cfg.train, key)
        need(value > 0, f"train.{key} must be > 0 (got {value})")
    seq_len = cfg.train.seq_len
    need(seq_len == AUTO or (isinstance(seq_len, int) and seq_len > 0),
         f"train.seq_len must be auto or a number > 0 (got {seq_len})")
    need(cfg.train.samples_from_eval >= 0, f"train.samples_from_eval must be >= 0 (got {cfg.train.samples_from_eval})")
    need(0 <= cfg.data.max_invalid_fraction <= 1,
         f"data.max_invalid_fraction must be in [0, 1] (got {cfg.data.max_invalid_fraction})")
    for key in ("eval_every_steps", "log_every_steps", "num_workers", "max_new_tokens", "save_every_steps",
                "keep_checkpoints"):
        value = getattr(cfg.train, key)
        need(value >= 0, f"train.{key} must be >= 0 (got {value})")
    checkpointing = cfg.train.gradient_checkpointing
    need(isinstance(checkpointing, bool) or checkpointing == AUTO,
         f"train.gradient_checkpointing must be auto, true or false (got {checkpointing})")
    need(cfg.train.loss_chunk_tokens >= 0, f"train.loss_chunk_tokens must be >= 0 (got {cfg.train.loss_chunk_tokens})")
    need(cfg.train.eval_max_sequences > 0,
         f"train.eval_max_sequences must be > 0 (got {cfg.train.eval_max_sequences})")
    for role, names in vars(cfg.data.roles).items():
        need(len(names) > 0, f"data.roles.{role} is empty; give at least one speaker name")
    if cfg.data.format == DataFormat.text and cfg.data.train_on_prompt:
        problems.append("data.train_on_prompt applies to alpaca and chat data; text data is trained on every token")
    scratch = cfg.model.scratch
    if builds_scratch_model(cfg.model) and scratch.tokenizer == ScratchTokenizer.bpe:
        corpus = scratch.tokenizer_corpus
        need(corpus is not None and Path(corpus).expanduser().is_file(),
             f"model.scratch.tokenizer_corpus: {corpus} is not a file; the bpe tokenizer is trained on it")
        need(scratch.tokenizer_vocab_size >= 300, "model.scratch.tokenizer_vocab_size must be >= 300 "
             f"(256 bytes plus special tokens; got {scratch.tokenizer_vocab_size})")
    if cfg.quant.double_quant and cfg.quant.method not in (QuantMethod.nf4, QuantMethod.fp4):
        problems.append(f"quant.double_quant applies to 4-bit methods only (quant.method={cfg.quant.method.value}); "
                        "set quant.double_quant=false or choose quant=nf4-dq / fp4-dq")
    if cfg.train.mixed_precision == MixedPrecision.fp16 and cfg.quant.compute_dtype == DType.bfloat16:
        problems.append("train.mixed_precision=fp16 with quant.compute_dtype=bfloat16 mixes two half types; use bf16")
    if builds_scratch_model(cfg.model):
        need(inside(scratch.path, cfg.cache_dir), f"model.scratch.path: {scratch.path} is outside cache_dir "
             f"({cfg.cache_dir}); generated models are written there only")
    else:
        local = Path(cfg.model.name_or_path).expanduser()
        looks_local = cfg.model.name_or_path.startswith((".", "/", "~")) or local.exists()
        need(not looks_local or (local / "config.json").is_file(),
             f"model.name_or_path: {cfg.model.name_or_path} is not a model folder (no config.json); "
             "give a Hugging Face model folder or a hub id")
    problems += data_problems(cfg.data, generated=generates_demo_data(cfg))
    if cfg.resume is not None and cfg.overwrite:
        problems.append("resume and overwrite=true contradict each other: resume continues the run in output_dir, "
                        "overwrite replaces it; give one")
    problems += dist_problems(cfg)
    problems += quality_problems(cfg)
    problems += objective_problems(cfg)
    problems += logger_problems(cfg.train.loggers)
    scratch_positions = scratch.max_position_embeddings if builds_scratch_model(cfg.model) else None
    if scratch_positions is not None and isinstance(seq_len, int) and seq_len > scratch_positions:
        problems.append(f"train.seq_len={cfg.train.seq_len} is longer than the model's "
                        f"{scratch_positions} positions (model.scratch.max_position_embeddings); lower train.seq_len")
    if problems:
        raise ConfigError(problems)


PREFERENCE_OBJECTIVES = (ObjectiveName.dpo, ObjectiveName.orpo, ObjectiveName.simpo)


def objective_problems(cfg: Config) -> list[str]:
    """The objective against its own keys and the data: a preference objective needs preference pairs, and SFT
    cannot train on pairs."""
    objective, data = cfg.objective, cfg.data
    name = objective.name.value
    problems = []
    preference = objective.name in PREFERENCE_OBJECTIVES
    if preference and data.format != DataFormat.preference:
        problems.append(f"objective={name} trains on preference pairs, but data.format={data.format.value}; set "
                        "data.format=preference with prompt / chosen / rejected records (docs/preference.md)")
    if not preference and data.format == DataFormat.preference:
        problems.append("data.format=preference holds pairs to prefer one answer of, which objective=sft does not "
                        "train on; choose objective=dpo, orpo or simpo")
    if not preference:
        return problems
    if not (objective.beta > 0 and math.isfinite(objective.beta)):
        problems.append(f"objective.beta must be > 0 (got {objective.beta})")
    if not 0 <= objective.label_smoothing < 0.5:
        problems.append(f"objective.label_smoothing must be in [0, 0.5) (got {objective.label_smoothing})")
    if objective.name != ObjectiveName.dpo:
        if objective.loss_type != DPOLoss.sigmoid or objective.label_smoothing:
            problems.append(f"objective.loss_type and objective.label_smoothing apply to objective=dpo (got {name})")
        if objective.precompute_reference:
            problems.append(f"objective.precompute_reference applies to objective=dpo: {name} has no reference model")
    elif objective.label_smoothing and objective.loss_type != DPOLoss.sigmoid:
        problems.append(f"objective.label_smoothing applies to objective.loss_type=sigmoid "
                        f"(got {objective.loss_type.value})")
    if data.packing:
        problems.append(f"data.packing with objective={name}: a pair's two answers are scored as whole sequences; "
                        "set data.packing=false")
    if data.train_on_prompt:
        problems.append(f"data.train_on_prompt with objective={name}: preference objectives score the answers "
                        "only; set data.train_on_prompt=false")
    if cfg.train.neftune_alpha:
        problems.append(f"train.neftune_alpha with objective={name}: NEFTune's noise is for SFT and would reach the "
                        "reference pass too; set train.neftune_alpha=null")
    return problems


ONE_TARGET = ("give exactly one of run_dir=RUN_FOLDER (a trained run) or model=MODEL (a merged export, a model "
              "folder or a hub id)")


def validate_export(cmd: ExportCommand) -> None:
    """Check `qlora export`'s options and output_dir before anything loads."""
    problems = []
    options = cmd.export
    if options.dtype == DType.auto:
        problems.append("export.dtype must be bfloat16, float16 or float32 (got auto)")
    if options.probe_samples <= 0 or options.probe_seq_len < 2:
        problems.append("export.probe_samples must be > 0 and export.probe_seq_len >= 2")
    if not options.max_kl > 0:
        problems.append(f"export.max_kl must be > 0 (got {options.max_kl})")
    if options.format != ExportFormat.gguf and options.gguf_type != GGUFType.auto:
        problems.append(f"export.gguf_type applies to export.format=gguf (got format={options.format.value})")
    if options.gguf_type.k_quant and importlib.util.find_spec("auto_round") is None:
        problems.append(f"export.gguf_type={options.gguf_type.value} is a K-quant, packed by auto-round, which is "
                        "not installed; pip install 'qlora[quantize]' (or choose q4_0, q5_0 or q8_0)")
    if options.calibration not in ("run_data", "none") and not Path(options.calibration).expanduser().is_file():
        problems.append(f"export.calibration={options.calibration}: no such file; give run_data, none or the path of "
                        "a data file in the run's data.format")
    if options.calibration_samples <= 0:
        problems.append(f"export.calibration_samples must be > 0 (got {options.calibration_samples})")
    if options.format == ExportFormat.adapter and options.merge == MergeMode.original:
        problems.append("export.merge applies to merged exports; export.format=adapter writes the adapter unmerged")
    try:
        size_bytes(options.max_shard_size)
    except QloraError as e:
        problems.append(str(e))
    out = Path(cmd.output_dir).expanduser()
    run = Path(cmd.run_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        problems.append(f"output_dir {out} is a file; give a folder path")
    elif out.is_dir() and any(out.iterdir()) and not cmd.overwrite:
        problems.append(f"output_dir {out} already holds files; choose another output_dir or pass overwrite=true "
                        "(the old export is replaced only once the new one is verified)")
    if out.resolve() == run or run.is_relative_to(out.resolve()):
        problems.append(f"output_dir {out} would replace the run itself; choose a folder outside {cmd.run_dir}")
    if problems:
        raise ConfigError(problems)


def validate_generate(cmd: GenerateCommand) -> None:
    """Check `qlora generate`'s options before anything loads."""
    problems = []
    if (cmd.run_dir is None) == (cmd.model is None):
        problems.append("give exactly one of run_dir=RUN_FOLDER (a trained run) or model=EXPORT (a merged export)")
    if not cmd.temperature >= 0:
        problems.append(f"temperature must be >= 0 (got {cmd.temperature}); 0 decodes greedily")
    if not 0 < cmd.top_p <= 1:
        problems.append(f"top_p must be in (0, 1] (got {cmd.top_p})")
    if cmd.max_new_tokens <= 0:
        problems.append(f"max_new_tokens must be > 0 (got {cmd.max_new_tokens})")
    if problems:
        raise ConfigError(problems)


def validate_eval(cmd: EvalCommand) -> None:
    """Check `qlora eval`'s options before anything loads."""
    from qlora.config.assets import group_options

    problems = []
    if (cmd.run_dir is None) == (cmd.model is None):
        problems.append(ONE_TARGET)
    if cmd.base and cmd.run_dir is None:
        problems.append("base=true compares a run with its base; give run_dir= (for a base alone use model=BASE)")
    if cmd.batch_size <= 0:
        problems.append(f"batch_size must be > 0 (got {cmd.batch_size})")
    if cmd.max_sequences is not None and cmd.max_sequences <= 0:
        problems.append(f"max_sequences must be > 0 (got {cmd.max_sequences}); leave it unset to score everything")
    if cmd.seq_len is not None and cmd.seq_len < 2:
        problems.append(f"seq_len must be >= 2 (got {cmd.seq_len})")
    if cmd.quant is not None and cmd.quant not in (options := group_options("quant")):
        problems.append(f"quant={cmd.quant} is not a quant option; choose one of: {', '.join(options)}")
    problems += data_problems(cmd.data, generated=cmd.data.generate_demo)  # a run's demo data is regenerated
    if Path(cmd.output).expanduser().is_dir():
        problems.append(f"output={cmd.output} is a folder; give the path of the JSON file to write")
    if problems:
        raise ConfigError(problems)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def size_bytes(text: str) -> int:
    """Bytes in a size such as '5GB', '500MB' or '2GiB' (decimal units as transformers uses, or binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise QloraError(f"export.max_shard_size={text!r} is not a size; write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
