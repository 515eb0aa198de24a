"""The end-of-run report: report.png and a self-contained report.html that carries the run's metrics rows."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from qlora import report
from qlora.composition import compose_config
from qlora.errors import QloraError
from qlora.metrics import read_metrics
from qlora.report import HEIGHT_PX, WIDTH_PX, write_report
from qlora.train import run
from tests.runs import TINY

METRICS_SCRIPT = re.compile(r'<script type="application/json" id="metrics">(.*?)</script>', re.S)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real tiny run: 10 steps, eval at 0, 5 and 10, a row at 1, 5 and 10, samples at the end."""
    root = tmp_path_factory.mktemp("report")
    config = compose_config([f"cache_dir={root / 'cache'}", f"model.scratch.path={root / 'cache'}/tiny128", *TINY,
                             f"output_dir={root / 'run'}", "train.max_steps=10", "train.eval_every_steps=5",
                             "train.log_every_steps=5", "train.micro_batch_size=4", "train.eval_max_sequences=8",
                             "train.max_new_tokens=6", "train.report=false"])
    return run(config).output_dir


def embedded_rows(page: str) -> list[dict]:
    return json.loads(METRICS_SCRIPT.search(page).group(1))


def pixels(path: Path):
    image = imread(path)  # floats in [0, 1], height x width x channels
    return image[..., :3]


def hand_written(folder: Path, rows: list[dict], summary: dict | None = None, samples: list | None = None) -> Path:
    """A run folder written by hand: config.yaml, metrics.jsonl, and summary.json / samples.json when given."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("# recipe: default\nmodel:\n  name_or_path: org/some-model\nquant:\n"
                                        "  method: nf4\n  double_quant: true\nlora:\n  r: 8\ntrain:\n  max_steps: 30\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if samples is not None:
        (folder / "samples.json").write_text(json.dumps(samples))
    return folder


@pytest.mark.slow
def test_report_of_a_trained_run(trained):
    png, html = write_report(trained)
    assert (png, html) == (trained / "report.png", trained / "report.html")
    rgb = pixels(png)
    assert rgb.shape == (HEIGHT_PX, WIDTH_PX, 3)
    assert rgb.std() > 0.05  # not a blank canvas
    ink = (rgb.min(axis=2) < 0.9).mean()
    assert 0.02 < ink < 0.5, ink  # curves, text and grid on a mostly white page

    page = html.read_text(encoding="utf-8")
    rows = read_metrics(trained)
    assert embedded_rows(page) == rows  # every value, exactly
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 5, 10]
    summary = json.loads((trained / "summary.json").read_text())
    assert f"{summary['final_eval_loss']:.4f}" in page and f"{summary['first_eval_loss']:.4f}" in page
    assert f"{summary['tokens_seen']:,}" in page
    for sample in json.loads((trained / "samples.json").read_text()):
        assert sample["prompt"] in page and sample["after"] in page
    # self-contained: the figure is report.png itself, inlined; nothing is fetched
    inlined = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(inlined) == png.read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', page) and "<link" not in page and "url(" not in page
    assert "<details><summary>config.yaml</summary>" in page and "lora:\n  r: 16\n" in page


@pytest.mark.slow
def test_samples_are_escaped_and_the_json_cannot_close_its_script(tmp_path):
    rows = [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 3.1, "lr": 1e-4, "note": "</script><b>x</b>"},
            {"step": 2, "loss": float("nan"), "lr": 2e-4}]
    samples = [{"prompt": "<script>alert(1)</script>", "before": "", "after": "a & b < c"}]
    folder = hand_written(tmp_path / "run", rows, samples=samples)
    page = write_report(folder)[1].read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a &amp; b &lt; c" in page
    assert "<script>alert" not in page
    assert page.count("<script") == 1 and page.count("</script>") == 1  # only the metrics element
    assert "(nothing)" in page  # the empty "before"
    back = embedded_rows(page)
    assert back[:2] == rows[:2]
    assert back[2] == {"step": 2, "loss": None, "lr": 2e-4}  # NaN as strict JSON's null


@pytest.mark.parametrize("metrics", [None, "", "\n\n"], ids=["missing", "empty", "blank-lines"])
def test_no_metrics_is_an_error_and_writes_nothing(tmp_path, metrics):
    folder = hand_written(tmp_path / "run", [])
    if metrics is None:
        (folder / "metrics.jsonl").unlink()
    else:
        (folder / "metrics.jsonl").write_text(metrics)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(QloraError, match="no metrics"):
        write_report(folder)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_not_a_run_folder_is_an_error(tmp_path):
    with pytest.raises(QloraError, match="no such folder"):
        write_report(tmp_path / "absent")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    with pytest.raises(QloraError, match="no config.yaml"):
        write_report(tmp_path)
    assert not list(tmp_path.glob("*report*"))
    hand_written(tmp_path / "bad", [])
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    with pytest.raises(QloraError, match="unreadable"):
        write_report(tmp_path / "bad")


def test_a_machine_without_matplotlib_finishes_the_run_with_a_warning(tmp_path, monkeypatch, caplog):
    # GPU images often lack matplotlib; the report is the run's last act and must not fail a finished run.
    folder = hand_written(tmp_path / "run", [{"step": s, "loss": 3.0 - 0.1 * s} for s in (1, 5, 10)])
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` raises ImportError
    with caplog.at_level(logging.WARNING, logger="qlora.report"):
        report.report_finished_run(folder)
    assert "the run finished, but its report could not be written (" in caplog.text
    assert not (folder / "report.png").exists()


@pytest.mark.slow
def test_rewriting_replaces_the_report_whole(tmp_path, trained, monkeypatch):
    folder = tmp_path / "run"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoints", "adapter", "report.*"))
    write_report(folder)
    extra = {"step": 11, "epoch": 9, "loss": 0.5, "lr": 0.0, "tokens_per_s": 10.0, "tokens_seen": 1}
    with open(folder / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(extra) + "\n")
    png, html = write_report(folder)
    assert embedded_rows(html.read_text(encoding="utf-8"))[-1] == extra
    assert pixels(png).shape == (HEIGHT_PX, WIDTH_PX, 3)
    assert not list(folder.glob(".report*"))  # no staging file left behind

    # A failure while rendering leaves the previous report byte for byte.
    old = png.read_bytes(), html.read_bytes()

    def broken(*_):
        raise RuntimeError("render failed")

    monkeypatch.setattr(report, "render_html", broken)
    with pytest.raises(RuntimeError):
        write_report(folder)
    assert (png.read_bytes(), html.read_bytes()) == old


@pytest.mark.slow
def test_minimal_rows_without_optional_keys(tmp_path):
    rows = [{"step": s, "loss": 3.0 - 0.1 * s} for s in (1, 5, 10)]  # no lr, eval, tokens/s, memory, summary
    folder = hand_written(tmp_path / "run", rows)
    png, html = write_report(folder)
    rgb = pixels(png)
    assert rgb.shape == (HEIGHT_PX, WIDTH_PX, 3) and rgb.std() > 0.05
    page = html.read_text(encoding="utf-8")
    assert embedded_rows(page) == rows
    assert "unfinished" in page and "10 of 30" in page
    assert "eval loss" not in page and "Samples" not in page and "peak memory" not in page


@pytest.mark.slow
def test_summary_extras_and_old_memory_key(tmp_path):
    rows = [{"step": 0, "eval_loss": 2.0},
            {"step": 10, "loss": 1.5, "lr": 1e-4, "tokens_per_s": 100.0, "cuda_max_allocated_gb": 1.25},
            {"step": 20, "loss": 1.0, "lr": 5e-5, "tokens_per_s": 300.0, "cuda_max_allocated_gb": 1.75},
            {"step": 20, "eval_loss": 1.0}]
    folder = hand_written(tmp_path / "old", rows, summary={"step": 20, "epoch": 1, "tokens_seen": 1234,
                                                           "tokens_trained": 567, "first_eval_loss": 2.0,
                                                           "final_eval_loss": 1.0})
    page = write_report(folder)[1].read_text(encoding="utf-8")
    table = dict(report.summary_rows(report.read_run(folder)))
    assert table["eval loss"] == "2.0000 \u2192 1.0000"
    assert table["eval perplexity"] == "7.39 \u2192 2.72"  # exp(2), exp(1)
    assert table["peak memory"] == "1.75 GiB"  # the largest cuda_max_allocated_gb row
    assert table["throughput (median)"] == "200 tokens / s"
    assert table["tokens seen"] == "1,234" and table["optimizer steps"] == "20"
    assert "finished" in page and "org/some-model" in page

    new = hand_written(tmp_path / "new", rows, summary={
        "step": 20, "first_eval_loss": 2.0, "final_eval_loss": 1.0, "peak_memory_gb": 3.5, "seconds": 3725.4,
        "base_bytes": 3 * 2**30, "parameters": {"base": 1_000_000_000, "quantized": 900_000_000,
                                                "trainable": 5_000_000}})
    table = dict(report.summary_rows(report.read_run(new)))
    assert table["peak memory"] == "3.50 GiB"  # summary.json's figure wins over the rows'
    assert table["time"] == "1:02:05 (h:mm:ss)"
    assert table["base weights in memory"] == "3.00 GiB"
    assert table["trainable parameters"] == "5,000,000 (5 M, 0.50% of base)"
    assert table["base parameters"] == "1,000,000,000 (1 B)"
