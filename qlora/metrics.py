"""Run metrics: one JSON object per row in metrics.jsonl, mirrored to the loggers train.loggers names.

Each logger is a `Backend`: TensorBoard (output_dir/tb), Weights & Biases, MLflow. Their packages are imported
only when a run uses them; whether they are installed is checked with the config (qlora.config.checks).
"""

from __future__ import annotations

import json
import logging
import math
import time
from enum import Enum
from pathlib import Path
from typing import Protocol

from qlora.config import Logger
from qlora.errors import QloraError, first_line
from qlora.files import write_text_atomic

log = logging.getLogger(__name__)

Scalar = str | int | float | bool | None

LOGGER_IDS = "loggers.json"
"""In the run folder: the W&B and MLflow run ids, so that a resumed run continues the same backend run."""

def perplexity(mean_loss: float) -> float:
    """The exponential of a mean token loss (inf where that overflows)."""
    return math.exp(mean_loss) if mean_loss < 700 else math.inf


_SETUP = {Logger.tensorboard: "check that output_dir is writable",
          Logger.wandb: "run `wandb login`, or set WANDB_MODE=offline to log locally",
          Logger.mlflow: "check MLFLOW_TRACKING_URI (a tracking server, or a local store the installed mlflow "
                         "supports)"}
# The TensorBoard HPARAMS tab shows these scalar tags (their last values) next to each run's hyperparameters.
_HPARAM_METRICS = ("loss", "eval_loss")


class Backend(Protocol):
    """Where metric rows go besides metrics.jsonl."""

    run_id: str | None
    """The backend's id of the run (stored in loggers.json to continue it on resume); None if it has none."""
    fresh: bool
    """True when this backend started a new run: the rows of the steps before the resume are sent to it too."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record one row's numbers at optimizer step `step`."""

    def close(self) -> None:
        """Flush and end the run."""


class NoMetrics:
    """What processes other than the main one log to: nothing (the main process logs the run's numbers)."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLog:
    """Appends rows to `run_dir/metrics.jsonl` (flushed per row) and sends their numbers to each logger.

    A run that continues from step `start` (0 for a fresh one) first drops the rows after it, which a run
    killed after its last checkpoint left behind, so the file reads as one uninterrupted run. `history`, when
    given, is the metrics.jsonl those first rows come from (a run resumed into a new folder).

    `hyperparameters` (the run's config as a nested dict) go with the run to every logger: nested to W&B,
    flattened to dotted keys (`lora.r`) for MLflow params and TensorBoard. A resumed run (start > 0) continues
    the W&B / MLflow run whose id `run_dir/loggers.json` holds; a logger that starts a new run instead gets the
    kept rows first. `name` names the backend runs (the run folder's name).

    Raises QloraError when a logger cannot start its run (not logged in, unreachable tracking server).
    """

    def __init__(self, run_dir: Path, loggers: list[Logger], project: str, name: str, hyperparameters: dict, *,
                 start: int = 0, history: Path | None = None) -> None:
        path = run_dir / "metrics.jsonl"
        source = history or path
        kept = [row for row in read_metrics(source.parent) if row["step"] <= start] if start and source.is_file() \
            else []
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
        params = _plain(hyperparameters)
        ids = _read_ids(run_dir) if start else {}
        self.backends: dict[Logger, Backend] = {}
        try:
            for logger in dict.fromkeys(loggers):
                self.backends[logger] = _start(logger, run_dir, project, name, params, start, ids.get(logger.value))
            for backend in self.backends.values():
                if backend.fresh:
                    for row in kept:
                        if metrics := _numbers(row):
                            backend.log(metrics, row["step"])
            new_ids = {logger.value: b.run_id for logger, b in self.backends.items() if b.run_id is not None}
            if any(ids.get(key) != value for key, value in new_ids.items()):
                write_text_atomic(run_dir / LOGGER_IDS, json.dumps({**_read_ids(run_dir), **new_ids}, indent=2) + "\n")
        except BaseException:
            self._close_backends()
            raise
        self.file = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        """Append `row` (it has a "step"); its int and float values go to the loggers as metrics."""
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        metrics = _numbers(row)
        if not metrics:
            return
        for logger, backend in list(self.backends.items()):
            try:
                backend.log(metrics, row["step"])
            except Exception as e:
                # A tracking server that went away must not end hours of training: metrics.jsonl has every row.
                log.warning("train.loggers: %s failed at step %d (%s); not logging to it for the rest of this run "
                            "(metrics.jsonl has every row)", logger.value, row["step"], first_line(e))
                del self.backends[logger]
                _close_quietly(logger, backend, warn=False)  # it has been reported once

    def close(self) -> None:
        """Close metrics.jsonl and end every logger's run; a logger that fails to close is a warning, not an error."""
        try:
            self.file.close()
        except OSError:  # pending only after a row's flush failed (a full disk), and that failure was raised
            pass
        finally:
            self._close_backends()

    def _close_backends(self) -> None:
        while self.backends:
            logger, backend = self.backends.popitem()
            _close_quietly(logger, backend)


def read_metrics(run_dir: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl. A last line without its newline is a row whose write was cut short (a
    full disk, a kill mid-write) and is left out when it does not parse."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    lines = text.splitlines()
    torn = lines[-1] if lines and not text.endswith("\n") else None
    if torn is not None:
        try:
            json.loads(torn)
        except ValueError:
            lines.pop()
    return [json.loads(line) for line in lines if line.strip()]


def flatten(params: dict, prefix: str = "") -> dict[str, Scalar]:
    """Nested dicts as one level of dotted keys (`{"lora": {"r": 8}}` -> `{"lora.r": 8}`); lists become JSON text."""
    flat: dict[str, Scalar] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (list, dict)):
            flat[f"{prefix}{key}"] = json.dumps(value)
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class TensorBoard:
    """Scalars under run_dir/tb; the hyperparameters once per tb folder, as a table (TEXT) and in HPARAMS."""

    run_id: str | None = None

    def __init__(self, run_dir: Path, params: dict, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        folder = run_dir / "tb"
        self.fresh = not folder.is_dir()
        # purge_step: TensorBoard hides the events a killed run wrote after the checkpoint this one resumes from.
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=start + 1)
        if self.fresh:
            flat = flatten(params)
            table = "\n".join(f"| {key} | {value} |" for key, value in flat.items())
            self.writer.add_text("hyperparameters", "| key | value |\n|---|---|\n" + table, 0)
            # Written into this writer's own folder (add_hparams would make a second run folder per call).
            for summary in hparams({k: v for k, v in flat.items() if v is not None},
                                   dict.fromkeys(_HPARAM_METRICS, 0.0)):
                self.writer.file_writer.add_summary(summary)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run in `project`, its files under run_dir/wandb; WANDB_* variables (WANDB_MODE=offline) apply."""

    def __init__(self, run_dir: Path, project: str, name: str, params: dict, run_id: str | None) -> None:
        import wandb

        self.fresh = run_id is None
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), config=params, id=run_id,
                              resume="allow" if run_id else None)
        self.run_id: str | None = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run in experiment `project` at MLflow's tracking URI (MLFLOW_TRACKING_URI), the flattened
    hyperparameters as its params.

    A continued run gets only the steps after the last one it holds: MLflow appends, so a step logged again after
    a resume would show up twice.
    """

    def __init__(self, project: str, name: str, params: dict, run_id: str | None) -> None:
        import mlflow
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self.client = mlflow.MlflowClient()
        self.last_step = -1
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as e:
                log.warning("train.loggers: MLflow run %s (from %s) not found at %s (%s); starting a new run",
                            run_id, LOGGER_IDS, mlflow.get_tracking_uri(), first_line(e))
                run_id = None
            else:
                self.client.update_run(run_id, status="RUNNING")
                self.last_step = max((m.step for key in run.data.metrics
                                      for m in self.client.get_metric_history(run_id, key)), default=-1)
        self.fresh = run_id is None
        if run_id is None:
            # The client, not mlflow.set_experiment / start_run: those set process-wide state (the active run,
            # MLFLOW_EXPERIMENT_ID) that a caller's own MLflow use would inherit.
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            # MLflow caps a param's value length and the params per request.
            items = [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in flatten(params).items()]
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(run_id, params=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        self.run_id: str | None = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.last_step:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _start(logger: Logger, run_dir: Path, project: str, name: str, params: dict, start: int,
           run_id: str | None) -> Backend:
    try:
        if logger == Logger.tensorboard:
            return TensorBoard(run_dir, params, start)
        if logger == Logger.wandb:
            return WandB(run_dir, project, name, params, run_id)
        return MLflow(project, name, params, run_id)
    except Exception as e:
        raise QloraError(f"train.loggers includes {logger.value}, but it could not start a run ({first_line(e)}); "
                         f"{_SETUP[logger]}, or drop it from train.loggers") from e


def _numbers(row: dict) -> dict[str, float]:
    """The metrics of a row: its int and float values except the step."""
    return {key: value for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _plain(value):
    """`value` with enums as their values, tuples as lists and paths as text: what every backend can store."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _read_ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / LOGGER_IDS
    try:
        ids = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        ids = None
    if not isinstance(ids, dict):
        log.warning("%s is unreadable; the loggers start new runs", path)
        return {}
    return ids


def _close_quietly(logger: Logger, backend: Backend, warn: bool = True) -> None:
    try:
        backend.close()
    except Exception as e:
        log.log(logging.WARNING if warn else logging.DEBUG, "train.loggers: closing %s failed (%s)", logger.value,
                first_line(e))
