"""The loggers behind train.loggers: each backend receives the rows and hyperparameters (read back from its own
store), a resumed run continues the same backend run, missing packages and failing backends are named."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from dataclasses import asdict
from pathlib import Path

import mlflow
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from wandb.proto import wandb_internal_pb2

from qlora.config import Config, Logger, logger_problems
from qlora.errors import ConfigError, QloraError
from qlora.metrics import LOGGER_IDS, MetricsLog, flatten, read_metrics
from qlora.train import run

HYPERPARAMETERS = asdict(Config())  # enums and nested groups, as train.py passes them
R = Config().lora.r


def rows(steps: range, offset: float = 0.0) -> list[dict]:
    """Train rows with losses exact in float32 (TensorBoard's precision), and a non-numeric value to leave out."""
    return [{"step": s, "loss": 10.0 - 0.5 * s + offset, "lr": 0.001, "note": "text", "skipped": False}
            for s in steps]


def write(run_dir: Path, loggers: list[Logger], steps: range, start: int = 0, offset: float = 0.0,
          history: Path | None = None, hyperparameters: dict = HYPERPARAMETERS) -> None:
    metrics = MetricsLog(run_dir, loggers, "qlora-test", run_dir.name, hyperparameters, start=start,
                         history=history)
    if start == 0:
        metrics.write({"step": 0, "eval_loss": 11.0})
    for row in rows(steps, offset):
        metrics.write(row)
    metrics.close()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A local MLflow file store (mlflow-skinny has no sqlite store; the file store needs the opt-in)."""
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    yield
    wandb.teardown()  # W&B keeps its settings per process; the next test starts from its own environment


def tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def mlflow_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def wandb_records(run_folder: Path) -> list:
    """The records of an offline run's .wandb file: LevelDB's log format (32 KiB blocks of checksummed chunks)
    after a 7-byte W&B header, each record a wandb_internal_pb2.Record."""
    data = next(run_folder.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    records, chunks, pos = [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def wandb_history(run_folder: Path, key: str) -> dict[int, float]:
    found = {}
    for record in wandb_records(run_folder):
        if record.WhichOneof("record_type") == "history":
            items = {_key(item): json.loads(item.value_json) for item in record.history.item}
            if key in items:
                found[record.history.step.num] = items[key]
    return found


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)  # W&B fills one or the other


def wandb_folders(run_dir: Path) -> list[Path]:
    """The offline run folders of a run, oldest first, once W&B has written them out."""
    import wandb

    wandb.teardown()  # run.finish() returns before wandb-core has written the run's file; this waits for it
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def wandb_run(run_folder: Path):
    [record] = [r.run for r in wandb_records(run_folder) if r.WhichOneof("record_type") == "run"]
    return record


def test_tensorboard_gets_the_rows_and_the_hyperparameters(tmp_path):
    write(tmp_path / "run", [Logger.tensorboard], range(1, 6))
    assert tensorboard_scalars(tmp_path / "run", "loss") == {s: 10.0 - 0.5 * s for s in range(1, 6)}
    assert tensorboard_scalars(tmp_path / "run", "eval_loss") == {0: 11.0}
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert not {"note", "skipped", "step"} & set(events.Tags()["scalars"])
    table = events.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"| lora.r | {R} |" in table and '| train.loggers | ["tensorboard"] |' in table
    start_info = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start_info.session_start_info.hparams["lora.r"].number_value == R
    assert start_info.session_start_info.hparams["optim.name"].string_value == Config().optim.name.value
    assert [p for p in (tmp_path / "run" / "tb").iterdir() if p.is_dir()] == []  # no second run folder


def test_mlflow_gets_the_rows_and_the_hyperparameters(tmp_path, mlflow_store):
    many = {**HYPERPARAMETERS, "extra": {f"p{i}": i for i in range(120)}, "long": "x" * 7000}
    write(tmp_path / "run", [Logger.mlflow], range(1, 6), hyperparameters=many)
    run_id = json.loads((tmp_path / "run" / LOGGER_IDS).read_text())["mlflow"]
    client = mlflow.MlflowClient()
    found = client.get_run(run_id)
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert client.get_experiment(found.info.experiment_id).name == "qlora-test"
    assert mlflow_history(run_id, "loss") == [(s, 10.0 - 0.5 * s) for s in range(1, 6)]
    assert mlflow_history(run_id, "eval_loss") == [(0, 11.0)]
    assert set(found.data.metrics) == {"loss", "eval_loss", "lr"}
    params = found.data.params
    assert params["lora.r"] == str(R) and params["train.loggers"] == '["tensorboard"]'
    assert set(params) == set(flatten(many)) and len(params) > 200  # more than MLflow takes in one request
    assert params["extra.p119"] == "119" and params["long"] == "x" * 6000  # MLflow's longest param value


@pytest.mark.slow
def test_wandb_gets_the_rows_and_the_config(tmp_path, wandb_offline):
    write(tmp_path / "run", [Logger.wandb], range(1, 6))
    [folder] = wandb_folders(tmp_path / "run")
    assert wandb_history(folder, "loss") == {s: 10.0 - 0.5 * s for s in range(1, 6)}
    assert wandb_history(folder, "eval_loss") == {0: 11.0}
    assert wandb_history(folder, "note") == {} and wandb_history(folder, "skipped") == {}
    start = wandb_run(folder)
    assert (start.project, start.display_name) == ("qlora-test", "run")
    config = {_key(item): json.loads(item.value_json) for item in start.config.update}
    assert config["lora"]["r"] == R and config["optim"]["name"] == Config().optim.name.value
    assert json.loads((tmp_path / "run" / LOGGER_IDS).read_text()) == {"wandb": start.run_id}


@pytest.mark.slow
def test_resume_continues_the_same_backend_runs_and_duplicates_nothing(tmp_path, mlflow_store, wandb_offline):
    """Killed after step 15 with the newest checkpoint at 10; the resumed run redoes 11..15 (offset values)."""
    run_dir, loggers = tmp_path / "run", [Logger.tensorboard, Logger.wandb, Logger.mlflow]
    write(run_dir, loggers, range(1, 16))
    ids = json.loads((run_dir / LOGGER_IDS).read_text())
    write(run_dir, loggers, range(11, 21), start=10, offset=0.25)
    assert json.loads((run_dir / LOGGER_IDS).read_text()) == ids

    resumed = {s: 10.0 - 0.5 * s + (0.25 if s > 10 else 0) for s in range(1, 21)}
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(21))
    assert {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r} == resumed
    assert tensorboard_scalars(run_dir, "loss") == resumed  # purge_step hides the first run's 11..15
    # MLflow only appends: it keeps the steps it has (1..15) and takes the new ones, each step once
    assert mlflow_history(ids["mlflow"], "loss") == [(s, 10.0 - 0.5 * s + (0.25 if s > 15 else 0))
                                                     for s in range(1, 21)]
    folders = wandb_folders(run_dir)  # offline, W&B writes a folder per session (of the one run)
    assert {wandb_run(folder).run_id for folder in folders} == {ids["wandb"]}
    assert wandb_history(folders[-1], "loss") == {s: 10.0 - 0.5 * s + 0.25 for s in range(11, 21)}


def test_resume_into_a_new_folder_starts_new_backend_runs_with_the_earlier_rows(tmp_path, mlflow_store):
    loggers = [Logger.tensorboard, Logger.mlflow]
    write(tmp_path / "a", loggers, range(1, 16))
    write(tmp_path / "b", loggers, range(11, 21), start=10, history=tmp_path / "a" / "metrics.jsonl")
    old, new = (json.loads((tmp_path / d / LOGGER_IDS).read_text())["mlflow"] for d in "ab")
    assert new != old
    expected = [(s, 10.0 - 0.5 * s) for s in range(1, 21)]
    assert mlflow_history(new, "loss") == expected and mlflow_history(new, "eval_loss") == [(0, 11.0)]
    assert sorted(tensorboard_scalars(tmp_path / "b", "loss").items()) == expected
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == list(range(21))


def test_logger_problems_names_the_missing_package_and_training_refuses_to_start(tmp_path, monkeypatch,
                                                                                 tiny_config):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` finds when it is not installed
    line = ("train.loggers includes wandb, but wandb is not installed: pip install 'qlora[wandb]' "
            "(or drop it from train.loggers)")
    assert logger_problems([Logger.tensorboard, Logger.wandb, Logger.mlflow, Logger.wandb]) == [line]
    assert logger_problems([Logger.tensorboard, Logger.mlflow]) == []
    with pytest.raises(ConfigError) as error:
        run(tiny_config("train.loggers=[tensorboard,wandb]"))
    assert error.value.problems == [line]
    assert not (tmp_path / "run").exists()


def test_a_logger_that_cannot_start_is_one_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    with pytest.raises(QloraError, match=r"^train.loggers includes mlflow, but it could not start a run \(.+\); "
                                         r"check MLFLOW_TRACKING_URI"):
        MetricsLog(tmp_path / "run", [Logger.tensorboard, Logger.mlflow], "qlora-test", "run", HYPERPARAMETERS)
    assert not (tmp_path / "run" / LOGGER_IDS).exists()


def test_a_failing_logger_is_dropped_and_the_others_still_get_every_row(tmp_path, mlflow_store, caplog):
    run_dir = tmp_path / "run"
    metrics = MetricsLog(run_dir, [Logger.tensorboard, Logger.mlflow], "qlora-test", "run", HYPERPARAMETERS)
    first, second = rows(range(1, 4)), rows(range(4, 7))
    for row in first:
        metrics.write(row)
    shutil.rmtree(tmp_path / "mlruns")  # the tracking store goes away mid-run
    for row in second:
        metrics.write(row)
    metrics.close()
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 7))
    assert tensorboard_scalars(run_dir, "loss") == {r["step"]: r["loss"] for r in first + second}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("train.loggers: mlflow failed at step 4 (")


def test_close_ends_every_logger_even_when_one_fails(tmp_path, mlflow_store, caplog):
    run_dir = tmp_path / "run"
    metrics = MetricsLog(run_dir, [Logger.tensorboard, Logger.mlflow], "qlora-test", "run", HYPERPARAMETERS)
    for row in rows(range(1, 4)):
        metrics.write(row)
    shutil.rmtree(tmp_path / "mlruns")  # so ending the MLflow run fails
    metrics.close()
    assert tensorboard_scalars(run_dir, "loss") == {1: 9.5, 2: 9.0, 3: 8.5}  # flushed by its close
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("train.loggers: closing mlflow failed (")


@pytest.mark.slow
def test_a_training_run_logs_to_tensorboard_and_mlflow(tiny_config, mlflow_store, tmp_path):
    steps = 6
    overrides = ["train.loggers=[tensorboard,mlflow]", "train.project=qlora-e2e", "train.log_every_steps=1",
                 "train.eval_every_steps=3", "train.micro_batch_size=8", "train.grad_accum_steps=1"]
    out = tmp_path / "run"
    run(tiny_config(f"train.max_steps={steps}", "train.save_every_steps=3", *overrides))
    run_id = json.loads((out / LOGGER_IDS).read_text())["mlflow"]
    # continue the finished run for 3 more steps: the same MLflow run, each step once
    run(tiny_config(f"train.max_steps={steps + 3}", "train.save_every_steps=3", "resume=auto", *overrides))
    assert json.loads((out / LOGGER_IDS).read_text())["mlflow"] == run_id

    rows_written = read_metrics(out)
    losses = [(r["step"], r["loss"]) for r in rows_written if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows_written if "eval_loss" in r]
    assert [s for s, _ in losses] == list(range(1, steps + 4)) and [s for s, _ in evals] == [0, 3, 6, 9]
    assert mlflow_history(run_id, "loss") == losses and mlflow_history(run_id, "eval_loss") == evals
    assert mlflow_history(run_id, "tokens_per_s")[-1][0] == steps + 3
    found = mlflow.MlflowClient().get_run(run_id)
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.params["lora.r"] == str(R)
    assert found.data.params["train.loggers"] == '["tensorboard", "mlflow"]'
    assert tensorboard_scalars(out, "loss") == pytest.approx(dict(losses), rel=1e-6)
    assert tensorboard_scalars(out, "eval_loss") == pytest.approx(dict(evals), rel=1e-6)
