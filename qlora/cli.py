"""The `qlora` command: `qlora train`, `plan`, `export`, `generate`, `eval`, `data preview`, `recipes`, `report`.

One grammar for all of them: `key=value` arguments, typed by the command's schema (qlora.config), and
`qlora COMMAND --help` for its keys. `train` takes Hydra overrides (`plan` and `data preview` take them too,
beside their own keys); it composes and validates the config first (and every point of a `-m` sweep), so a bad
key, type, option or value is one line with exit status 2 before Hydra creates any folder or anything is
loaded. Then Hydra runs the job as usual: `--cfg job`, `-m` and every other Hydra flag work.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

USAGE = """usage: qlora <command> [key=value ...]      (qlora <command> --help lists a command's keys)

commands:
  train [overrides]   fine-tune: qlora train recipe=NAME lora.r=32 optim.lr=1e-4 output_dir=runs/a
                      Hydra flags work: -m (sweep), --cfg job (print config), --help (config groups)
  plan [device=cuda|cpu] [overrides]
                      the run's GPU memory from the model's config alone (nothing downloaded or loaded):
                      quantized base, LoRA, optimizer state, activations; what fits the GPU
                      (train.memory_limit_gb=N plans for a card of N GiB)
  export run_dir=RUN output_dir=DIR [export.format=hf|gguf|adapter] [export.merge=dequantized|original]
                      merge the adapter into the base it was trained against, verify the result's logits
                      against the trained model, and write a Hugging Face folder, a GGUF file or the adapter
  generate run_dir=RUN|model=EXPORT prompt=TEXT [temperature=0.7 top_p=0.9 max_new_tokens=256 seed=N]
                      answer a prompt (formatted as in training), streamed to the terminal
  eval run_dir=RUN|model=MODEL [data.path=FILE] [quant=nf4-dq] [base=true] [output=eval.json]
                      perplexity and mean loss per trained token of a run (on its held-out split by default),
                      a merged export or a base model, as a table and as JSON
  data preview [samples=N] [overrides]
                      show samples as trained (trained tokens marked), lengths, counts and padding,
                      without loading the model: qlora data preview recipe=NAME
  recipes             the recipe catalog: task, model, GPU memory and time of each
  report run_dir=RUN  (re)draw a run's report.html and report.png from its run folder

Errors are one line each; pass debug=true (or set QLORA_DEBUG=1) for the traceback.
"""

OVERRIDES_NOTE = ("Every other argument is a training override, as for qlora train: recipe=NAME, GROUP=OPTION, "
                  "GROUP.KEY=VALUE (qlora train --help lists the groups; docs/config.md every key).")


@dataclass(frozen=True)
class Command:
    """A command other than train: its schema (the keys it takes), and what it does with them."""

    usage: str
    schema: Callable[[], type]
    """The schema's dataclass, imported when the command runs (so `qlora --help` imports nothing heavy)."""
    job: Callable
    """job(cmd) or, with `overrides`, job(cmd, overrides): runs the command."""
    overrides: bool = False
    """Arguments whose key is not the schema's are training overrides."""
    old_flags: dict[str, str] = field(default_factory=dict)
    """Earlier spellings, `--flag VALUE` -> the key they now are (accepted with a deprecation notice)."""
    positional: str | None = None
    """The key an earlier bare positional argument now is (accepted with a deprecation notice)."""
    defaults: Callable[[list[str]], dict | None] | None = None
    """Defaults that depend on the arguments (a run's data settings for eval), over the schema's own."""
    logs: bool = True
    """Show qlora's progress messages (INFO); False keeps the output to what the command prints."""


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `qlora` command itself, not a caller in Python: its own process to set up
        from qlora.memory import exec_with_compact_malloc

        argv = sys.argv[1:]
        exec_with_compact_malloc(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "data" and rest[:1] == ["preview"]:
        name, rest = "data preview", rest[1:]
    if name == "train":
        return train(rest)
    if name not in COMMANDS:
        print(f"qlora: unknown command '{' '.join(argv[:2])}'; choose one of: train, {', '.join(COMMANDS)} "
              "(qlora --help)", file=sys.stderr)
        return 2
    return run_command(COMMANDS[name], rest)


def run_command(command: Command, args: list[str]) -> int:
    """Parse `args` into the command's schema (one-line errors, exit 2), then run it."""
    from qlora.errors import QloraError

    if any(a in ("-h", "--help") for a in args):
        from qlora.config.fields import help_text

        print(help_text(command.schema(), command.usage, OVERRIDES_NOTE if command.overrides else ""), end="")
        return 0
    try:
        args = _current_spelling(command, args)
        from qlora.composition import check_keys, compose_command

        schema = command.schema()
        own, overrides = _split(schema, args) if command.overrides else (args, [])
        check_keys(schema, own)  # before any defaults are read (a run folder, for eval)
        cmd = compose_command(schema, own, command.defaults(own) if command.defaults else None)
        _quiet_libraries()
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        if command.logs:
            logging.getLogger("qlora").setLevel(logging.INFO)
        command.job(cmd, overrides) if command.overrides else command.job(cmd)
    except QloraError as e:
        return _report(e, _debug(args))
    except KeyboardInterrupt:
        print("qlora: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _current_spelling(command: Command, args: list[str]) -> list[str]:
    """`args` with the earlier spellings (`--device cuda`, a bare run folder) as key=value, each said once."""
    out, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        flag, eq, value = arg.partition("=")
        if flag in command.old_flags:
            if not eq:
                if not rest:
                    from qlora.errors import ConfigError

                    raise ConfigError(f"{flag} needs a value; write {command.old_flags[flag]}=VALUE")
                value = rest.pop(0)
            key = command.old_flags[flag]
            _deprecated(f"{flag} {value}", f"{key}={value}")
            out.append(f"{key}={value}")
        elif command.positional and not eq and not arg.startswith("-"):
            _deprecated(f"a bare {command.positional} ({arg})", f"{command.positional}={arg}")
            out.append(f"{command.positional}={arg}")
        else:
            out.append(arg)
    return out


def _deprecated(old: str, new: str) -> None:
    print(f"qlora: deprecated: {old} still works in this release only; write {new}", file=sys.stderr)


def _split(schema: type, args: list[str]) -> tuple[list[str], list[str]]:
    """The arguments whose key is a field of `schema`, and the others (training overrides)."""
    import dataclasses

    own_keys = {f.name for f in dataclasses.fields(schema)}
    own = [a for a in args if a.partition("=")[0] in own_keys]
    return own, [a for a in args if a not in own]


def _recipes(cmd) -> None:
    from qlora.recipes import catalog, table

    print(table(catalog()))


def _report_job(cmd) -> None:
    from qlora.report import write_report

    png, html = write_report(Path(cmd.run_dir))
    print(f"wrote {html} and {png}")


def _export(cmd) -> None:
    from qlora.export import export as run_export

    result = run_export(cmd)
    print(f"exported {cmd.run_dir} to {result.output_dir}: {', '.join(result.files)}")


def _generate(cmd) -> None:
    from qlora.generate import generate as run_generate

    run_generate(cmd)


def _evaluate(cmd) -> None:
    from qlora.evaluation import evaluate as run_evaluate

    run_evaluate(cmd)


def _eval_defaults(args: list[str]) -> dict | None:
    from qlora.evaluation import command_defaults

    return command_defaults(args)


def _preview(cmd, overrides: list[str]) -> None:
    from qlora import data
    from qlora.data.preview import preview

    config = _validated_config(overrides)
    tokenizer = _tokenizer(config)
    config = _with_seq_len(config, tokenizer)
    tokenized = data.load(config.data, tokenizer, seq_len=config.train.seq_len, seed=config.seed,
                          cache_dir=Path(config.cache_dir).expanduser())
    preview(config, tokenizer, tokenized, cmd.samples)


def _plan(cmd, overrides: list[str]) -> None:
    import torch

    from qlora import plan as planning

    config = _plan_config(overrides)
    if config.train.seq_len == "auto":  # chosen from the data's lengths, as `qlora train` chooses it
        config = _with_seq_len(config, _tokenizer(config))
    device = cmd.device.value if cmd.device else ("cuda" if torch.cuda.is_available() else "cpu")
    print(planning.describe(planning.plan(config, device), config))


def _schema(name: str) -> Callable[[], type]:
    def load() -> type:
        from qlora import config

        return getattr(config, name)

    return load


COMMANDS = {
    "plan": Command("qlora plan [device=cuda|cpu] [training overrides]", _schema("PlanCommand"), _plan,
                    overrides=True, old_flags={"--device": "device"}, logs=False),
    "export": Command("qlora export run_dir=RUN output_dir=DIR [key=value ...]", _schema("ExportCommand"), _export),
    "generate": Command("qlora generate run_dir=RUN|model=EXPORT prompt=TEXT [key=value ...]",
                        _schema("GenerateCommand"), _generate),
    "eval": Command("qlora eval run_dir=RUN|model=MODEL [key=value ...]", _schema("EvalCommand"), _evaluate,
                    defaults=_eval_defaults),
    "data preview": Command("qlora data preview [samples=N] [training overrides]", _schema("PreviewCommand"),
                            _preview, overrides=True, old_flags={"--samples": "samples"}, logs=False),
    "recipes": Command("qlora recipes", _schema("RecipesCommand"), _recipes, logs=False),
    "report": Command("qlora report run_dir=RUN", _schema("ReportCommand"), _report_job, positional="run_dir",
                      logs=False),
}


def train(args: list[str]) -> int:
    from qlora.errors import QloraError

    try:
        extra = _preflight(args)
    except QloraError as e:
        return _report(e, _debug(args))
    # Among the user's overrides: argparse takes the overrides as one run of positionals.
    first = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
    return _hydra_train([*args[:first], *extra, *args[first:]])


def _preflight(args: list[str]) -> list[str]:
    """Compose and validate every run the arguments describe, and check what each output folder holds.

    Returns extra Hydra overrides: for a sweep, name each job's folder after the swept keys alone; for
    resume=PATH without an output_dir, continue in the run folder that holds the checkpoint.
    """
    from hydra._internal.utils import get_args_parser  # Hydra's own command-line grammar

    from qlora import checkpoint
    from qlora.composition import choose_recipe, compose_config, expand_sweeps, parse_overrides
    from qlora.config import validate
    from qlora.errors import ConfigError
    from qlora.runfolder import check_output_dir

    parsed = get_args_parser().parse_args(args)
    if parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion:
        return []
    overrides = parse_overrides(parsed.overrides)
    fixed = [o.key_or_group for o in overrides if not o.is_sweep_override()]
    runs = expand_sweeps(overrides) if parsed.multirun else [parsed.overrides]
    chosen = {choose_recipe(run) for run in runs}
    if len(chosen) > 1:
        raise ConfigError("the sweep mixes the demo's model with models of your own, which get different recipes; "
                          "name one with recipe=NAME")
    recipe = chosen.pop()
    if recipe is not None and parsed.cfg:  # a run logs its recipe itself
        print(f"qlora: recipe={recipe} (the model is not the demo's, so no demo settings; recipe=NAME picks another)",
              file=sys.stderr)
    extra = [f"recipe={recipe}"] if recipe else []
    for run in runs:
        config = compose_config(run)
        if parsed.cfg:  # printing the config: types and keys checked above, nothing will run
            continue
        validate(config)
        if config.resume is not None and "output_dir" not in fixed:
            if config.resume == "auto":
                raise ConfigError("resume=auto continues the run in output_dir; give output_dir=RUN_FOLDER too")
            config.output_dir = str(checkpoint.run_dir_of(checkpoint.resolve_path(config.resume)))
            extra.append(f"output_dir={config.output_dir}")
        check_output_dir(config)
    if not parsed.multirun:
        return extra
    excluded = ",".join(["output_dir", "overwrite", *fixed])
    return [*extra, f"hydra.job.config.override_dirname.exclude_keys=[{excluded}]"]


def _hydra_train(args: list[str]) -> int:
    import hydra

    from qlora.composition import CONFIG_DIR, HYDRA_VERSION_BASE, register

    register()
    sys.argv = ["qlora train", *args]  # Hydra reads its overrides and flags from sys.argv
    hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=HYDRA_VERSION_BASE)(_job)()
    return 0


def _job(cfg) -> None:
    """One Hydra job: the typed config, placed in Hydra's output folder, trained."""
    from hydra.core.hydra_config import HydraConfig

    from qlora.composition import to_config
    from qlora.errors import QloraError

    out = Path(HydraConfig.get().runtime.output_dir)  # a sweep gives each job its own folder
    debug = bool(cfg.get("debug"))
    try:
        config = to_config(cfg)
        config.output_dir = str(out)
        _quiet_libraries()
        from qlora.train import run

        run(config, recipe=HydraConfig.get().runtime.choices.get("recipe"))
    except QloraError as e:
        _remove_if_empty(out)  # Hydra made it; the run never started
        sys.exit(_report(e, debug))
    except KeyboardInterrupt:  # outside the training loop, which checkpoints and stops on its own
        if debug:
            raise
        _remove_if_empty(out)
        from qlora.checkpoint import complete_checkpoints

        found = complete_checkpoints(out)
        print(f"qlora: interrupted; continue from checkpoint {found[-1]} with resume=auto" if found else
              "qlora: interrupted before training started; nothing was saved", file=sys.stderr)
        sys.exit(130)


def _tokenizer(config):
    """The run's tokenizer, with the chat template it trains with (generated demo assets made first)."""
    from qlora import data, demo, hub
    from qlora.model import load_tokenizer

    hub.prepare(hub.hub_ids(config))
    demo.prepare_assets(config)
    tokenizer = load_tokenizer(config.model)
    data.use_chat_template(config.data, tokenizer)
    return tokenizer


NO_DATA = "data.path: value is required but not set"


def _plan_config(overrides: list[str]):  # -> qlora.config.Config
    """The config to plan. Memory needs no data: where the recipe needs a data.path that the overrides do not give
    (recipe=custom, a user's model), plan at the stated train.seq_len or, with seq_len=auto, at the model's context,
    saying which on stderr and that data.path makes it exact."""
    import dataclasses

    from qlora.errors import ConfigError
    from qlora.model import check_model_config, max_positions

    try:
        return _validated_config(overrides)
    except ConfigError as e:
        if not any(p.startswith(NO_DATA) for p in e.problems):
            raise
    config = _validated_config([*overrides, "data.path="])
    seq_len = config.train.seq_len
    if seq_len == "auto":
        seq_len = max_positions(check_model_config(config.model, "auto"))
        if seq_len is None:
            raise ConfigError("train.seq_len=auto and no data.path: the model's config states no context length to "
                              "plan at; give train.seq_len=N or data.path=FILE")
        said = f"at the model's context, {seq_len} tokens (train.seq_len=auto, no data.path)"
    else:
        said = f"at train.seq_len={seq_len} (no data.path)"
    print(f"qlora: planning {said}; data.path=FILE plans the sequence length the data needs", file=sys.stderr)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seq_len=seq_len))


def _with_seq_len(config, tokenizer):
    """train.seq_len=auto chosen as `qlora train` chooses it (from the data's lengths), said on stderr."""
    from qlora import data
    from qlora.model import check_model_config, max_positions

    if config.train.seq_len != "auto":
        return config
    resolved = data.with_seq_len(config, tokenizer, max_positions(check_model_config(config.model, "auto")))
    print(f"qlora: train.seq_len=auto: {resolved.train.seq_len} (from the lengths of {config.data.path})",
          file=sys.stderr)
    return resolved


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _validated_config(overrides: list[str]):  # -> qlora.config.Config
    """The training config the overrides compose to, checked, with the libraries' chatter turned down."""
    from qlora.composition import compose_config, parse_overrides
    from qlora.config import validate

    parse_overrides(overrides)
    config = compose_config(overrides)
    validate(config)
    _quiet_libraries()
    return config


def _quiet_libraries() -> None:
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Messages that say nothing a qlora user can act on.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")  # int8 with a float32 compute dtype
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported, if ever


def _debug(args: list[str]) -> bool:
    """debug=true among the overrides (read before the config can be composed, which may be what fails)."""
    return any(a.replace(" ", "").lower() in ("debug=true", "debug=1") for a in args)


def _report(e: Exception, debug: bool = False) -> int:
    import os

    from qlora.errors import QloraError

    if debug or os.environ.get("QLORA_DEBUG"):
        raise e
    for line in str(e).splitlines() or [type(e).__name__]:
        print(f"qlora: {line}", file=sys.stderr)
    return e.exit_code if isinstance(e, QloraError) else 1


if __name__ == "__main__":
    sys.exit(main())
