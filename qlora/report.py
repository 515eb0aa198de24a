"""The end-of-run report: output_dir/report.png (the curves) and output_dir/report.html (one self-contained page:
header, the curves, a summary table, before/after samples, the config, and the metrics rows as JSON).

    from qlora.report import write_report
    png, page = write_report(Path("runs/default/2025-01-01_12-00-00"))

It reads only the run folder's files (config.yaml, metrics.jsonl, and summary.json / samples.json when there), so
it works on a finished run, on one still training or stopped, and on runs written by older versions of qlora.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import statistics
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qlora.errors import QloraError, first_line
from qlora.files import write_bytes_atomic, write_text_atomic
from qlora.metrics import perplexity, read_metrics

log = logging.getLogger(__name__)

WIDTH_PX, HEIGHT_PX, DPI = 1600, 1000, 125
"""report.png's size in pixels and the resolution its fonts are laid out at."""

MEMORY_KEYS = ("memory_gb", "cuda_max_allocated_gb")
"""Peak-memory columns of a train row, newest name first (runs before memory_gb logged only CUDA's)."""


@dataclass
class RunRecord:
    """What the report shows of a run folder."""

    folder: Path
    config_text: str
    """config.yaml as written, recipe comment included."""
    config: dict
    rows: list[dict]
    """metrics.jsonl, one dict per line."""
    summary: dict | None
    """summary.json; None while the run has not finished."""
    samples: list[dict]
    finished_at: datetime
    """When summary.json (or, unfinished, metrics.jsonl) was last written."""

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def recipe(self) -> str | None:
        first = self.config_text.split("\n", 1)[0]
        return first.removeprefix("# recipe: ").strip() if first.startswith("# recipe: ") else None

    def setting(self, dotted: str):
        """The config value at `dotted` ("lora.r"), or None where this run's config has no such key."""
        # The YAML is read without the schema, so a run saved by another qlora version (keys added or dropped
        # since) still reports; a missing key shows as absent rather than failing the report.
        node = self.config
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    def series(self, *keys: str) -> tuple[list[int], list[float]]:
        """Steps and values of the rows holding the first of `keys` they have; non-finite values become NaN
        (a gap in the plotted line)."""
        steps, values = [], []
        for row in self.rows:
            key = next((k for k in keys if isinstance(row.get(k), (int, float))), None)
            if key is not None:
                steps.append(row["step"])
                values.append(float(row[key]) if math.isfinite(row[key]) else math.nan)
        return steps, values

    def stat(self, key: str):
        """summary.json's `key`, or None (unfinished runs, and keys older runs did not write)."""
        return (self.summary or {}).get(key)

    @property
    def eval_losses(self) -> tuple[float | None, float | None]:
        """First and final eval loss: summary.json's, else the first and last eval rows'."""
        _, evals = self.series("eval_loss")
        first = self.stat("first_eval_loss") if self.summary else (evals[0] if evals else None)
        final = self.stat("final_eval_loss") if self.summary else (evals[-1] if evals else None)
        return first, final


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write `run_dir/report.png` and `run_dir/report.html` and return their paths (png, html).

    Both are rendered in memory first and each replaces its old file in one rename, so a failure leaves the
    previous report (or none) in place, never a partial one. Raises QloraError when run_dir is not a run folder,
    its metrics.jsonl is missing, empty or unreadable, or the files cannot be written.
    """
    run = read_run(Path(run_dir))
    png = render_png(run)
    page = render_html(run, png)
    png_path, html_path = run.folder / "report.png", run.folder / "report.html"
    try:
        write_bytes_atomic(png_path, png)
        write_text_atomic(html_path, page)
    except OSError as e:
        raise QloraError(f"could not write the report into {run.folder} ({e.strerror or e}); free space or fix "
                         "the folder's permissions, then run it again") from e
    return png_path, html_path


def report_finished_run(run_dir: Path) -> None:
    """`write_report` at the end of a training run (train.report): a failure is logged, never fatal to the run."""
    try:
        png, html = write_report(run_dir)
        log.info("report: %s (and %s)", html, png.name)
    except (QloraError, OSError, ValueError, ImportError) as e:  # ImportError: no matplotlib
        log.warning("the run finished, but its report could not be written (%s); "
                    "qlora report %s retries", first_line(e), run_dir)


def read_run(folder: Path) -> RunRecord:
    """The run folder's files; QloraError naming what is missing or unreadable."""
    if not folder.is_dir():
        raise QloraError(f"{folder}: no such folder; give the run's output_dir")
    if not (folder / "config.yaml").is_file():
        raise QloraError(f"{folder} holds no config.yaml, so it is not a qlora run folder; give the run's output_dir")
    metrics = folder / "metrics.jsonl"
    try:
        config_text = (folder / "config.yaml").read_text(encoding="utf-8")
        config = OmegaConf.to_container(OmegaConf.create(config_text))
        rows = read_metrics(folder) if metrics.is_file() else []
        summary = _read_json(folder / "summary.json")
        samples = _read_json(folder / "samples.json") or []
    except (OSError, ValueError, OmegaConfBaseException) as e:
        raise QloraError(f"{folder}: a run file is unreadable ({first_line(e)}); is the run folder "
                         "complete?") from e
    if not rows:
        raise QloraError(f"{folder} has no metrics ({metrics.name} is missing or empty): the run logged no step; "
                         "train at least train.log_every_steps steps first")
    if not all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in rows):
        raise QloraError(f"{metrics} holds a row that is not a JSON object with an integer step; is it a qlora "
                         "metrics file?")
    if not isinstance(config, dict) or not isinstance(summary, (dict, type(None))) or not isinstance(samples, list):
        raise QloraError(f"{folder}: config.yaml, summary.json or samples.json does not hold what qlora writes")
    stamped = folder / "summary.json" if summary is not None else metrics
    return RunRecord(folder, config_text, config, rows, summary, [s for s in samples if isinstance(s, dict)],
                     datetime.fromtimestamp(stamped.stat().st_mtime))


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ---------------------------------------------------------------- the words shared by the figure and the page


def model_name(run: RunRecord) -> str:
    """A local model folder by its own name, a hub id ("org/name") in full."""
    path = str(run.setting("model.name_or_path") or "?")
    return Path(path).name if path.startswith(("/", ".", "~")) else path


def quant_label(run: RunRecord) -> str:
    method = run.setting("quant.method")
    if method in ("nf4", "fp4"):
        return f"{method}{' + double quant' if run.setting('quant.double_quant') else ''}"
    return "unquantized base" if method == "none" else str(method or "?")


def lora_label(run: RunRecord) -> str:
    variants = [name for key, name in (("lora.dora", "DoRA"), ("lora.rslora", "rsLoRA")) if run.setting(key)]
    alpha = run.setting("lora.alpha")
    alpha_text = f", alpha {alpha:g}" if isinstance(alpha, (int, float)) else ""
    return f"LoRA r={run.setting('lora.r')}{alpha_text}{''.join(f' ({v})' for v in variants)}"


def steps_label(run: RunRecord, unit: str = " steps") -> str:
    """"60 steps"; "20 of 60 steps (unfinished)" before summary.json is written."""
    done = run.stat("step") if run.summary else max(r["step"] for r in run.rows)
    planned = run.setting("train.max_steps")
    return f"{done}{unit}" if run.summary or planned is None else f"{done} of {planned}{unit} (unfinished)"


def preference_run(run: RunRecord) -> bool:
    return run.setting("objective.name") not in (None, "sft")


def eval_label(run: RunRecord) -> str | None:
    first, final = run.eval_losses
    if final is None:
        return None
    if preference_run(run):
        _, accuracy = run.series("eval_reward_accuracy")
        shown = f", reward accuracy {accuracy[0]:.2f} \u2192 {accuracy[-1]:.2f}" if len(accuracy) > 1 else ""
        start = f"{first:.3f} \u2192 " if first is not None and first != final else ""
        return f"{run.setting('objective.name')} eval loss {start}{final:.3f}{shown}"
    if first is None or first == final:
        return f"eval loss {final:.3f} (perplexity {perplexity(final):.2f})"
    return (f"eval loss {first:.3f} \u2192 {final:.3f} "
            f"(perplexity {perplexity(first):.1f} \u2192 {perplexity(final):.2f})")


def peak_memory_gb(run: RunRecord) -> float | None:
    if isinstance(run.stat("peak_memory_gb"), (int, float)):
        return float(run.stat("peak_memory_gb"))
    _, values = run.series(*MEMORY_KEYS)
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else None


# ---------------------------------------------------------------- report.png

_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.labelsize": 10,
    "axes.labelcolor": "#333333",
    "axes.edgecolor": "#999999",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e6e6e6",
    "grid.linewidth": 0.8,
    "xtick.color": "#555555",
    "ytick.color": "#555555",
    "legend.frameon": False,
    "figure.facecolor": "white",
}
_TRAIN, _EVAL, _OTHER = "#1f77b4", "#d62728", "#444444"


@dataclass(frozen=True)
class _Panel:
    title: str
    ylabel: str
    keys: tuple[str, ...]
    color: str
    eval_key: str | None = None
    """The same measure on the held-out split, drawn over the train line."""


_PANELS = (
    _Panel("Reward accuracy", "share of pairs ranked right", ("reward_accuracy",), "#17becf",
           "eval_reward_accuracy"),
    _Panel("Reward margin", "chosen - rejected reward", ("reward_margin",), "#bcbd22", "eval_reward_margin"),
    _Panel("Learning rate", "learning rate", ("lr",), "#2ca02c"),
    _Panel("Gradient norm", "L2 norm before clipping", ("grad_norm",), "#9467bd"),
    _Panel("Throughput", "tokens / s", ("tokens_per_s",), "#ff7f0e"),
    _Panel("Peak memory so far", "GiB", MEMORY_KEYS, "#8c564b"),
)
"""The small panels under the loss, left to right; one without data in this run is left out."""


def render_png(run: RunRecord) -> bytes:
    """The curves as a WIDTH_PX x HEIGHT_PX PNG: train loss with eval loss overlaid on top, and below it learning
    rate, gradient norm, tokens/s and memory (those the run logged)."""
    # A bare Figure on an Agg canvas, under rc_context: no pyplot, so nothing global (the backend a notebook or
    # GUI uses, the rcParams) changes, and nothing leaks between calls.
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with rc_context(_STYLE):
        fig = Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        fig.get_layout_engine().set(h_pad=0.12, w_pad=0.12, hspace=0.06, wspace=0.04)
        details = " \u00b7 ".join(x for x in (model_name(run), quant_label(run), lora_label(run), steps_label(run),
                                              eval_label(run)) if x)
        fig.suptitle(f"{run.name}\n", fontsize=15, fontweight="bold", x=0.01, ha="left")
        fig.text(0.01, 0.955, details, fontsize=11, color="#444444", ha="left", va="top")
        has_loss = any(isinstance(r.get(k), (int, float)) for r in run.rows for k in ("loss", "eval_loss"))
        panels = [p for p in _PANELS if any(math.isfinite(v) for v in run.series(*p.keys)[1])]
        if not has_loss and not panels:
            fig.text(0.5, 0.5, "metrics.jsonl holds no losses or other curves yet", ha="center", fontsize=13)
        else:
            grid = fig.add_gridspec(2 if has_loss and panels else 1, max(len(panels), 1),
                                    height_ratios=[3, 2] if has_loss and panels else None)
            if has_loss:
                _loss_axes(fig.add_subplot(grid[0, :]), run)
            for i, panel in enumerate(panels):
                _panel_axes(fig.add_subplot(grid[-1, i]), run, panel)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _loss_axes(ax, run: RunRecord) -> None:
    steps, losses = run.series("loss")
    if steps:
        ax.plot(steps, losses, color=_TRAIN, linewidth=1.8, marker=_marker(steps), markersize=3, label="train loss")
    eval_steps, evals = run.series("eval_loss")
    if eval_steps:
        ax.plot(eval_steps, evals, color=_EVAL, linewidth=1.4, linestyle="--", marker="o",
                markersize=6 if len(eval_steps) <= 40 else 3,
                markerfacecolor="white", markeredgewidth=1.6, label="eval loss (held-out split)")
        if eval_steps[0] == 0 and math.isfinite(evals[0]):
            _note(ax, 0, evals[0], f"before training: {evals[0]:.3f}", (8, 6), "left")
        if eval_steps[-1] > 0 and math.isfinite(evals[-1]):
            shown = "" if preference_run(run) else f" (perplexity {perplexity(evals[-1]):.2f})"
            _note(ax, eval_steps[-1], evals[-1], f"final: {evals[-1]:.3f}{shown}", (-6, 10), "right")
    ax.set_title("Loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{run.setting('objective.name')} loss per pair" if preference_run(run)
                  else "cross-entropy (nats / token)")
    ax.set_xlim(left=0)
    ax.margins(x=0.02, y=0.08)
    ax.legend(loc="upper right")


def _panel_axes(ax, run: RunRecord, panel: _Panel) -> None:
    steps, values = run.series(*panel.keys)
    ax.plot(steps, values, color=panel.color, linewidth=1.6, marker=_marker(steps), markersize=2.5, label="train")
    if panel.eval_key and (held_out := run.series(panel.eval_key))[0]:
        ax.plot(*held_out, color=_EVAL, linewidth=1.2, linestyle="--", marker="o", markersize=4,
                markerfacecolor="white", label="held-out")
    finite = [v for v in values if math.isfinite(v)]
    if panel.keys == ("tokens_per_s",) and len(finite) > 1:
        median = statistics.median(finite)
        ax.axhline(median, color=_OTHER, linewidth=1, linestyle=":", label=f"median {median:,.0f}")
    clip = run.setting("optim.max_grad_norm")
    if panel.keys == ("grad_norm",) and isinstance(clip, (int, float)) and clip > 0:
        ax.axhline(clip, color=_OTHER, linewidth=1, linestyle=":", label=f"clipped to {clip:g}")
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(loc="best", fontsize=9)
    ax.set_title(panel.title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(panel.ylabel)
    ax.set_xlim(left=0)
    if panel.keys != ("reward_margin",):  # a margin may be negative
        ax.set_ylim(bottom=0)
    ax.margins(x=0.03, y=0.12)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)


def _marker(steps: list[int]) -> str:
    # Dots show where the logged points are; past a few dozen they only thicken the line.
    return "o" if len(steps) <= 60 else ""


def _note(ax, x: float, y: float, text: str, offset: tuple[int, int], ha: str) -> None:
    ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", ha=ha, va="bottom", fontsize=9.5,
                color=_EVAL)


# ---------------------------------------------------------------- report.html

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #222;
       max-width: 1100px; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.6rem; margin: 0 0 .2rem; }
h2 { font-size: 1.15rem; margin: 2rem 0 .6rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.meta { color: #555; margin: 0; }
img { width: 100%; height: auto; border: 1px solid #eee; margin-top: 1rem; }
table { border-collapse: collapse; width: 100%; font-size: .95rem; }
th, td { text-align: left; vertical-align: top; padding: .35rem .6rem; border-bottom: 1px solid #eee; }
th { background: #f6f6f6; font-weight: 600; }
table.summary th { width: 14rem; background: none; font-weight: 500; color: #555; }
td.num { font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; }
.none { color: #999; font-style: italic; }
pre { background: #f6f6f6; padding: .8rem; overflow-x: auto; font-size: .85rem; }
summary { cursor: pointer; font-weight: 600; }
"""


def render_html(run: RunRecord, png: bytes) -> str:
    """The self-contained page: no external file, font or script; the figure is `png` inlined as base64."""
    e = html.escape
    meta = " \u00b7 ".join(e(x) for x in (
        f"finished {run.finished_at:%Y-%m-%d %H:%M}" if run.summary else f"unfinished, last write "
        f"{run.finished_at:%Y-%m-%d %H:%M}", f"model {model_name(run)}", f"recipe {run.recipe or 'none'}",
        quant_label(run), lora_label(run)))
    summary = "\n".join(f"<tr><th>{e(k)}</th><td class=\"num\">{e(v)}</td></tr>" for k, v in summary_rows(run))
    parts = [
        "<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(run.name)} \u00b7 qlora report</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<header><h1>{e(run.name)}</h1><p class=\"meta\">{meta}</p>",
        f"<p class=\"meta\">{e(str(run.folder))}</p></header>",
        f'<img alt="{e(f"Training curves of {run.name}")}" width="{WIDTH_PX}" height="{HEIGHT_PX}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">',
        "<h2>Summary</h2>", f'<table class="summary">{summary}</table>',
        *_samples_html(run),
        "<h2>Config</h2>", "<details><summary>config.yaml</summary>", f"<pre>{e(run.config_text)}</pre>",
        "</details>",
        f'<script type="application/json" id="metrics">{metrics_json(run.rows)}</script>',
        "</body>", "</html>", "",
    ]
    return "\n".join(parts)


def metrics_json(rows: list[dict]) -> str:
    """metrics.jsonl's rows as one JSON array that is safe inside <script>: every "<" is written as \\u003c (so
    no "</script>" or "<!--" can end or bend the element), and NaN / inf (a skipped step's loss) as null, which
    strict JSON readers such as JavaScript's JSON.parse require."""
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
             for row in rows]
    return json.dumps(clean, allow_nan=False).replace("<", "\\u003c")


def summary_rows(run: RunRecord) -> list[tuple[str, str]]:
    """The summary table: (what, value) pairs, leaving out what this run did not record."""
    rows = [("status", "finished" if run.summary else "unfinished (no summary.json yet)"),
            ("optimizer steps", steps_label(run, unit=""))]
    if run.stat("skipped_steps"):
        rows.append(("skipped steps (non-finite)", f"{run.stat('skipped_steps'):,}"))
    if isinstance(run.stat("epoch"), int):
        rows.append(("epochs completed", f"{run.stat('epoch')}"))
    _, seen = run.series("tokens_seen")
    tokens_seen = run.stat("tokens_seen") if run.summary else (int(seen[-1]) if seen else None)
    if tokens_seen is not None:
        rows.append(("tokens seen", f"{tokens_seen:,}"))
    if isinstance(run.stat("tokens_trained"), int):
        rows.append(("tokens trained (carrying loss)", f"{run.stat('tokens_trained'):,}"))
    first, final = run.eval_losses
    if final is not None:
        rows.append(("eval loss", f"{first:.4f} \u2192 {final:.4f}" if first is not None else f"{final:.4f}"))
        if not preference_run(run):
            rows.append(("eval perplexity", f"{perplexity(first):.2f} \u2192 {perplexity(final):.2f}"
                         if first is not None else f"{perplexity(final):.2f}"))
    _, accuracy = run.series("eval_reward_accuracy")
    if accuracy:
        rows.append(("eval reward accuracy", f"{accuracy[0]:.3f} \u2192 {accuracy[-1]:.3f}"))
    _, losses = run.series("loss")
    if losses and math.isfinite(losses[-1]):
        rows.append(("last train loss", f"{losses[-1]:.4f}"))
    params = run.stat("parameters")
    if isinstance(params, dict):
        for key, label in (("base", "base parameters"), ("quantized", "quantized parameters"),
                           ("trainable", "trainable parameters")):
            if isinstance(params.get(key), int):
                share = f", {100 * params[key] / params['base']:.2f}% of base" \
                    if key == "trainable" and isinstance(params.get("base"), int) and params["base"] else ""
                rows.append((label, f"{params[key]:,} ({_count(params[key])}{share})"))
    if isinstance(run.stat("base_bytes"), int):
        rows.append(("base weights in memory", _bytes(run.stat("base_bytes"))))
    memory = peak_memory_gb(run)
    if memory is not None:
        rows.append(("peak memory", f"{memory:.2f} GiB"))
    _, speeds = run.series("tokens_per_s")
    if any(math.isfinite(s) for s in speeds):
        rows.append(("throughput (median)", f"{statistics.median(s for s in speeds if math.isfinite(s)):,.0f} "
                                            "tokens / s"))
    seconds = run.stat("seconds")
    if isinstance(seconds, (int, float)):
        rows.append(("time", _duration(seconds)))
    return rows


def _samples_html(run: RunRecord) -> list[str]:
    if not run.samples:
        return []
    cells = []
    for s in run.samples:
        texts = [str(s.get(k) or "") for k in ("prompt", "before", "after")]
        cells.append("<tr>" + "".join(f'<td class="text">{html.escape(t)}</td>' if t else
                                      '<td class="text"><span class="none">(nothing)</span></td>' for t in texts)
                     + "</tr>")
    return ["<h2>Samples</h2>", "<table><tr><th>prompt</th><th>before training</th><th>after training</th></tr>",
            *cells, "</table>"]


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def _bytes(n: int) -> str:
    for size, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d} (h:mm:ss)" if hours else f"{minutes}:{secs:02d} (m:ss)"
