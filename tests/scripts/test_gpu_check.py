"""scripts/gpu_check.sh --dry-run: the GPU check's every part end to end on the CPU (bench.py's tiny workload), and
the JSON and Markdown it leaves filled with numbers. Timing is not asserted: the figures measure a shared machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.runs import ALPACA_5000, REPO


@pytest.mark.slow
def test_dry_run_writes_every_part_and_the_tables(tmp_path):
    if not ALPACA_5000.is_file():
        pytest.skip(f"{ALPACA_5000} is not beside the checkout")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": ""}
    done = subprocess.run(["scripts/gpu_check.sh", "--dry-run", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert report["dry_run"] and report["failed"] is False and report["budget_s"] == 360
    assert parts["versions"]["status"] == "ok" and parts["versions"]["versions"]["torch"]
    # Without CUDA every GPU test is collected and skipped; none fails.
    tests = parts["gpu tests"]
    assert tests["status"] == "ok" and tests["tests"] == tests["skipped"] >= 4 and tests["failures"] == 0
    assert parts["ddp"]["status"] == "skipped" and "needs 2 CUDA devices" in parts["ddp"]["note"]
    assert parts["bench default"]["status"] == parts["bench gradient_checkpointing"]["status"] == "ok"

    default = json.loads((out / "bench_default.json").read_text())
    gc = json.loads((out / "bench_gradient_checkpointing.json").read_text())
    layers = default["architecture"]["num_hidden_layers"]
    assert gc["qlora_overrides"] == ["train.gradient_checkpointing=true"] and gc["reused_runs"] == ["baseline"]
    assert gc["runs"]["baseline"] == default["runs"]["baseline"]  # one baseline run serves both comparisons
    assert gc["runs"]["qlora"][0]["recomputed_layers"] == layers == default["runs"]["baseline"][0]["recomputed_layers"]
    for report_ in (default, gc):
        q = report_["runs"]["qlora"][0]
        for figure in ("tokens_per_s", "peak_memory_bytes", "planned_memory_bytes", "time_to_first_step_s"):
            assert math.isfinite(q[figure]) and q[figure] > 0, figure
        assert report_["ratios"]["tokens_per_s"] == pytest.approx(
            q["tokens_per_s"] / report_["runs"]["baseline"][0]["tokens_per_s"])

    longest = parts["longest"]["longest"]
    assert parts["longest"]["points"] == [256, 512]
    for side in ("qlora", "baseline"):  # the tiny model fits at both points on any CPU
        assert longest[side] == {"seq_len": 512, "capped": True, "probes": [[256, True], [512, True]]}

    table = (out / "gpu_check.md").read_text()
    assert table in done.stdout
    assert "| part | status | seconds | note |" in table
    row = next(line for line in table.splitlines() if line.startswith("| tokens/s (non-padding, steady state) |"))
    cells = [c.strip() for c in row.strip("|").split("|")[1:]]
    assert len(cells) == 3 and all(float(c.replace(",", "")) > 0 for c in cells)
    assert f"{default['runs']['qlora'][0]['tokens_per_s']:,.0f}" == cells[0]
    assert "| longest seq_len at micro batch 1 (probed 256, 512; default settings) | ≥ 512 |  | ≥ 512 |" in table
