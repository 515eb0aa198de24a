"""scripts/fidelity.py at its tiny size, as a user runs it: pretraining, quantization error, storage and
fine-tuning parity on demo records, with the paper's orderings and the storage figures asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qlora import demo
from tests.runs import REPO

pytestmark = pytest.mark.slow  # pretrains and fine-tunes through scripts/fidelity.py


def test_fidelity_script_reproduces_the_papers_orderings(tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(demo.demo_records()))
    out = tmp_path / "fidelity.json"
    done = subprocess.run([sys.executable, "scripts/fidelity.py", "--size", "tiny", "--data", str(data),
                           "--cache", str(tmp_path / "cache"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    q, f = r["quantization_error"], r["finetune"]

    # Storage, measured from the tensors: NF4 keeps a float32 absmax per 64 weights (4 + 32/64 bits); double
    # quantization makes it 8 bits plus a float32 per 256 blocks (4.127), more where a layer has a partial block.
    assert q["nf4"]["bits_per_quantized_param"] == 4.5 == q["fp4"]["bits_per_quantized_param"]
    assert 4.127 <= q["nf4-dq"]["bits_per_quantized_param"] < 4.15
    assert 8 < q["int8"]["bits_per_quantized_param"] <= 8.5  # one float32 scale per row of 64 or 128
    # Quantization error: NF4 below FP4, double quantization adding (almost) nothing, int8 far below both.
    assert q["none"]["weight_mse"] == 0
    assert q["nf4"]["weight_mse"] < 0.8 * q["fp4"]["weight_mse"]
    assert abs(q["nf4-dq"]["weight_mse"] / q["nf4"]["weight_mse"] - 1) < 0.01
    assert q["int8"]["weight_mse"] < 0.01 * q["nf4"]["weight_mse"]
    ppl = {mode: row["perplexity"] for mode, row in q.items()}
    assert abs(ppl["nf4"] - ppl["none"]) < abs(ppl["fp4"] - ppl["none"])
    # Fine-tuning: every base learns from the same run; the table is relative to unquantized LoRA.
    assert set(f) == {"none", "nf4-dq", "nf4", "fp4", "int8"}
    assert f["none"]["vs_16bit"] == 0
    for mode, row in f.items():
        assert row["eval_loss"][0] < row["eval_loss_before"][0], mode
    assert "| nf4-dq |" in done.stdout and "vs unquantized LoRA" in done.stdout
