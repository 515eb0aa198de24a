"""Configuration: what a run or command may be told, and every check of it.

    schema.py    the training config: one dataclass per Hydra config group (model, quant, lora, data, optim,
                 train, dist, objective) and their closed choices
    commands.py  the schemas of the other commands (export, generate, eval, plan, data preview, report, recipes)
    checks.py    every check no single field's type can make, for training and for each command, reported in
                 one round (`validate`, `validate_export`, `validate_generate`, `validate_eval`)
    assets.py    where the YAML lives: configs/ (the groups' options) and recipes/
    fields.py    the docstrings written under the fields, for `qlora COMMAND --help` and docs/config.md

Everything public is importable from `qlora.config` itself. This package imports nothing else of qlora but
`qlora.errors`, so any module may import it.
"""

from qlora.config.checks import (
    DATA_FILE_SUFFIXES,
    builds_scratch_model,
    data_problems,
    dist_problems,
    generates_demo_data,
    inside,
    is_data_file,
    is_jinja,
    logger_problems,
    size_bytes,
    validate,
    validate_eval,
    validate_export,
    validate_generate,
)
from qlora.config.commands import (
    Device,
    EvalCommand,
    EvalSubset,
    ExportCommand,
    ExportConfig,
    ExportFormat,
    GenerateCommand,
    GGUFType,
    MergeMode,
    PlanCommand,
    PreviewCommand,
    RecipesCommand,
    ReportCommand,
)
from qlora.config.schema import (
    AUTO,
    CHAT_TEMPLATE_NAMES,
    REMOVED_KEYS,
    RENAMED_KEYS,
    ArchitectureConfig,
    ColumnsConfig,
    Config,
    DataConfig,
    DataFormat,
    DistConfig,
    DistStrategy,
    DPOLoss,
    DType,
    Logger,
    LoraConfig,
    LoraInit,
    MixedPrecision,
    ModelConfig,
    ObjectiveConfig,
    ObjectiveName,
    OnInvalid,
    OnNonFinite,
    OptimConfig,
    OptimizerName,
    Overlong,
    QuantConfig,
    QuantMethod,
    RolesConfig,
    Schedule,
    ScratchArchitecture,
    ScratchModelConfig,
    ScratchTokenizer,
    TrainConfig,
    renamed_key_message,
    without_removed_keys,
)

__all__ = [
    "AUTO", "ArchitectureConfig", "CHAT_TEMPLATE_NAMES", "ColumnsConfig", "Config", "DATA_FILE_SUFFIXES", "DPOLoss",
    "DType", "DataConfig", "DataFormat", "Device", "DistConfig", "DistStrategy", "EvalCommand", "EvalSubset",
    "ExportCommand", "ExportConfig", "ExportFormat", "GGUFType", "GenerateCommand", "Logger", "LoraConfig", "LoraInit",
    "MergeMode", "MixedPrecision", "ModelConfig", "ObjectiveConfig", "ObjectiveName", "OnInvalid", "OnNonFinite",
    "OptimConfig", "OptimizerName", "Overlong", "PlanCommand", "PreviewCommand", "QuantConfig", "QuantMethod",
    "REMOVED_KEYS", "RENAMED_KEYS", "RecipesCommand", "ReportCommand", "RolesConfig", "Schedule", "ScratchArchitecture",
    "ScratchModelConfig", "ScratchTokenizer", "TrainConfig", "builds_scratch_model", "data_problems", "dist_problems",
    "generates_demo_data", "inside", "is_data_file", "is_jinja", "logger_problems", "size_bytes", "validate",
    "validate_eval", "validate_export", "validate_generate", "renamed_key_message", "without_removed_keys",
]
