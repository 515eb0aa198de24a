"""The run folder: what may start in it, and the moment a run takes it over.

A run writes nothing into output_dir until everything that can be checked has been (config, checkpoint,
tokenizer, data, weights). Only then does it `commit`: replace an old run if overwrite=true, write config.yaml
and the tokenizer, and start train.log with the lines logged so far. So a bad input leaves an existing run folder
byte for byte as it was, and a new one empty.

    output_dir/
        config.yaml  train.log  metrics.jsonl  tb/      from the commit on
        tokenizer/                                      from the commit on (with the chat template used)
        checkpoints/step-NNNNNN/                        see qlora.checkpoint
        adapter/  samples.json                          at the end
        summary.json                                    last of all: the run finished
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qlora import checkpoint
from qlora.config import Config, without_removed_keys
from qlora.errors import QloraError, first_line
from qlora.files import disk_full, out_of_space, write_folder_atomic, write_text_atomic

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"


def check_output_dir(config: Config) -> None:
    """Refuse to start where the run would clobber something, unless overwrite or resume says how to proceed."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise QloraError(f"output_dir {out} is a file; choose a folder path for output_dir")
    if config.resume not in (None, "auto"):
        source = checkpoint.run_dir_of(checkpoint.resolve_path(config.resume))
        if _same(source, out) or not _holds_files(out):
            return
        raise QloraError(f"output_dir {out} already holds {_contents(out)}; resume={config.resume} continues into "
                         f"an empty output_dir or into its own run folder {source}")
    if config.overwrite or not _holds_files(out):
        return
    if config.resume == "auto":
        if checkpoint.complete_checkpoints(out) or (out / "config.yaml").is_file():
            return
        raise QloraError(f"output_dir {out} holds files but no run; resume=auto continues the run in output_dir, "
                         "so point output_dir at a run folder")
    found = checkpoint.complete_checkpoints(out)
    if checkpoint.is_finished(out):
        raise QloraError(f"output_dir {out} already holds a finished run; choose another output_dir, continue "
                         "training it with resume=auto and a higher train.max_steps, or replace it with overwrite=true")
    if found:
        raise QloraError(f"output_dir {out} holds an unfinished run (newest checkpoint: {found[-1].name}); continue "
                         "it with resume=auto, or replace it with overwrite=true")
    raise QloraError(f"output_dir {out} already holds {_contents(out)}; choose another output_dir or pass "
                     "overwrite=true to replace it")


def _holds_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _contents(folder: Path) -> str:
    if checkpoint.is_finished(folder):
        return "a finished run"
    return "a run" if (folder / "config.yaml").is_file() else "files"


def _same(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def config_yaml(config: Config, recipe: str | None = None) -> str:
    """The resolved config as YAML; a first comment line names the recipe it came from, when known."""
    header = f"# recipe: {recipe}\n" if recipe else ""
    return header + OmegaConf.to_yaml(OmegaConf.structured(config))


def clear(folder: Path) -> None:
    """Empty `folder` (overwrite=true, at the commit: never before the new run has passed every check)."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def commit(config: Config, tokenizer, runlog: RunLog, recipe: str | None = None) -> None:
    """Take over output_dir (the main process does): the run passed every check, so an old run may now be
    replaced. Writes config.yaml and the tokenizer, and starts train.log."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.overwrite:
        clear(out)
    checkpoint.remove_partial(out)
    write_text_atomic(out / "config.yaml", config_yaml(config, recipe))
    write_folder_atomic(out / "tokenizer", lambda folder: tokenizer.save_pretrained(str(folder)))
    runlog.commit(out / "train.log")


def save_results(out: Path, model, adapter: dict | None, *, samples: list[dict], summary: dict) -> None:
    """The finished run's adapter (`adapter` holds its tensors when they were gathered from shards), samples.json and,
    last, summary.json."""
    needed = checkpoint.estimated_bytes(adapter if adapter is not None else trainable_state(model))
    try:
        write_folder_atomic(out / "adapter", lambda folder: model.save_pretrained(str(folder), state_dict=adapter))
        if samples:
            write_text_atomic(out / "samples.json", json.dumps(samples, indent=2) + "\n")
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    except Exception as e:
        full = out_of_space(e, out, needed)
        if not full and not isinstance(e, OSError):
            raise
        found = checkpoint.complete_checkpoints(out)
        kept = f"checkpoint {found[-1]} holds the trained weights" if found else "no checkpoint holds them"
        why = disk_full(out, "the adapter", needed) if full else f"{e.strerror or e} while saving the adapter to {out}"
        fix = "free disk space" if full else "fix the file system"
        raise QloraError(f"{why}; {kept}. {fix}, then rerun with resume=auto to save it again") from e


def trainable_state(model) -> dict:
    """The parameters that train (the adapter's), by name: what save_pretrained writes."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class RunLog(logging.Handler):
    """Holds the run's log records until the run folder is committed, then writes them and the rest to train.log.

    Until `commit`, a failing run writes no log file anywhere; from then on train.log is appended to (a resumed
    run continues its run's log).
    """

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.held: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None

    def __enter__(self) -> RunLog:
        logging.getLogger().addHandler(self)
        self.qlora_level = logging.getLogger("qlora").level
        logging.getLogger("qlora").setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)
        logging.getLogger("qlora").setLevel(self.qlora_level)
        if self.file is not None:
            self.file.close()

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            self.held.append(record)
        else:
            self.file.handle(record)

    def commit(self, path: Path) -> None:
        self.file = _LogFile(path, mode="a", encoding="utf-8")
        self.file.setFormatter(logging.Formatter(LOG_FORMAT))
        for record in self.held:
            self.file.handle(record)
        self.held.clear()

    def error(self, message: str) -> None:
        """Record an error the CLI prints, in train.log only (the console gets it once, from the CLI)."""
        if self.file is not None:
            self.file.handle(logging.makeLogRecord({"name": "qlora", "levelno": logging.ERROR,
                                                    "levelname": "ERROR", "msg": message}))


class _LogFile(logging.FileHandler):
    """train.log. A line that cannot be written (a full disk) ends the file, not the run, and prints no traceback:
    the run's next write of its own (a metrics row, a checkpoint) stops it with the cause in one line."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # flushing what a full disk would not take
            pass


@dataclass
class TrainedRun:
    """A finished run, or one of its checkpoints, as `qlora export` and `qlora generate` read it."""

    folder: Path
    """The run folder."""
    adapter: Path
    """The adapter folder (peft format)."""
    config: Config
    state: dict
    """The run's summary.json (or the checkpoint's state.json): step, eval losses, tokens."""
    recipe: str | None

    @property
    def tokenizer(self) -> Path:
        return self.folder / "tokenizer"


def read_trained(path: str, key: str = "run_dir") -> TrainedRun:
    """The trained run at `path` (a run folder with adapter/, or a checkpoint folder); QloraError if it has none."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise QloraError(f"{key}={path}: no such folder; give a finished run's folder or one of its checkpoints")
    if (folder / "state.json").is_file():  # a checkpoint
        run_folder, config_file, state_file = checkpoint.run_dir_of(folder), folder / "config.yaml", "state.json"
    else:
        run_folder, config_file, state_file = folder, folder / "config.yaml", "summary.json"
        if not (folder / "adapter").is_dir():
            found = checkpoint.complete_checkpoints(folder)
            why = f"; its newest checkpoint is {found[-1]}: export that, or finish the run with resume=auto" \
                if found else " (and no checkpoint); is it a qlora run folder?"
            raise QloraError(f"{key}={path} holds no finished run (no adapter/){why}")
    try:
        schema = OmegaConf.structured(Config)
        text = config_file.read_text()
        saved = without_removed_keys(OmegaConf.to_container(OmegaConf.create(text)))
        config = OmegaConf.to_object(OmegaConf.merge(schema, saved))
        state = json.loads((folder / state_file).read_text())
    except (OSError, ValueError, OmegaConfBaseException) as e:
        raise QloraError(f"{key}={path}: {config_file.name} or {state_file} is missing or unreadable "
                         f"({first_line(e)}); is it a complete qlora run?") from e
    if not (run_folder / "tokenizer").is_dir():
        raise QloraError(f"{key}={path}: {run_folder / 'tokenizer'} is missing; the run folder is incomplete")
    recipe = text.split("\n", 1)[0].removeprefix("# recipe: ") if text.startswith("# recipe: ") else None
    return TrainedRun(run_folder, folder / "adapter", config, state, recipe)
