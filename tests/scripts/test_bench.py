"""scripts/bench.py: a tiny side-by-side run end to end on the CPU, and the GPU-only arithmetic (MFU, the
longest-sequence search, the 8B workload's shape) checked without a GPU. No timing is asserted: the figures are
measurements of a shared machine."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from qlora.demo import demo_records
from tests.runs import REPO

SHARED = REPO.parent / "shared" / "data" / "alpaca_5000.json"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def nf4_dq_bits(shapes: list[tuple[int, int]]) -> float:
    """Bits per weight of nf4 + double quant, by hand: half a byte per weight, a uint8 absmax per 64-weight block,
    a float32 absmax per 256 blocks and a float32 offset per tensor."""
    weights = total = 0
    for rows, cols in shapes:
        n = rows * cols
        blocks = math.ceil(n / 64)
        weights += n
        total += n / 2 + blocks + 4 * math.ceil(blocks / 256) + 4
    return 8 * total / weights


@pytest.mark.slow
def test_tiny_side_by_side_run(tmp_path):
    # Real Alpaca records where ../shared is beside the checkout; else the demo's generated ones, same layout.
    records = json.loads(SHARED.read_text())[:400] if SHARED.is_file() else demo_records()
    data = tmp_path / "alpaca_400.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "scripts/bench.py", "--workload", "tiny", "--data", str(data),
                           "--json", str(out), "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    runs, medians, ratios = report["runs"], report["medians"], report["ratios"]

    assert set(runs) == {"qlora", "baseline"} and all(len(r) == 1 for r in runs.values())
    for side in ("qlora", "baseline"):
        run = runs[side][0]
        for figure in ("tokens_per_s", "tokens_per_s_p90", "peak_memory_bytes", "time_to_first_step_s",
                       "time_to_training_s"):
            assert math.isfinite(run[figure]) and run[figure] > 0, (side, figure)
        assert run["steps"] == len(run["step_tokens"]) == len(run["step_seconds"]) == 4
        assert run["time_to_training_s"] > run["time_to_first_step_s"]
        assert run["peak_reserved_bytes"] is None  # CUDA's caching allocator only
    # qlora's memory plan is reported beside its measured peak (resident set here): within a factor of 2 of it.
    plan = runs["qlora"][0]["planned_memory_bytes"]
    assert 0.5 < plan / runs["qlora"][0]["peak_memory_bytes"] < 2
    assert "planned_memory_bytes" not in runs["baseline"][0] and "planned_memory_bytes" not in ratios
    # Both bases are measured by the same function: tiny layers (64 x 64, 32 x 64, 128 x 64, 64 x 128) have
    # partial double-quant blocks, so 4.137 here rather than the paper's 4.127.
    layer = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    expected = nf4_dq_bits(layer * 2)
    assert abs(expected - 4.1372) < 1e-4
    assert abs(runs["qlora"][0]["bits_per_quantized_param"] - expected) < 1e-9
    assert runs["baseline"][0]["bits_per_quantized_param"] == runs["qlora"][0]["bits_per_quantized_param"]
    assert runs["baseline"][0]["trainable_params"] == runs["qlora"][0]["trainable_params"]
    # The baseline recomputes both layers; qlora's auto none, as a few kilobytes of activations fit anywhere.
    assert (runs["qlora"][0]["recomputed_layers"], runs["baseline"][0]["recomputed_layers"]) == (0, 2)
    for figure, ratio in ratios.items():
        assert ratio == pytest.approx(medians["qlora"][figure] / medians["baseline"][figure]), figure
    assert {"tokens_per_s", "tokens_per_s_p90", "peak_memory_bytes", "time_to_first_step_s", "time_to_training_s",
            "bits_per_quantized_param", "base_bytes"} <= set(ratios)
    assert "mfu" not in ratios  # GPU only
    assert set(report["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}
    assert report["date"] and report["device"].startswith("CPU") and "--workload tiny" in report["command"]
    assert "| tokens per second (non-padding, steady state) |" in done.stdout


@pytest.fixture(scope="module")
def llama_8b():
    """The gpu workload's model config and its skeleton on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    arch = bench.llama_config(bench.WORKLOADS["gpu"].shape, vocab_size=8192)
    with torch.device("meta"):
        return arch, AutoModelForCausalLM.from_config(arch)


def test_gpu_workload_is_llama_3_1_8b(llama_8b):
    arch, model = llama_8b
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert arch.vocab_size == 128256 and arch.rope_parameters["rope_theta"] == 500000.0


def test_mfu_on_the_frozen_base_basis(llama_8b):
    arch, _ = llama_8b
    # Linear weights per layer: q and o 4096 x 4096, k and v 1024 x 4096, gate, up and down 14336 x 4096;
    # 32 layers plus the 128256 x 4096 head: N = 7,504,658,432. At seq_len 2048:
    # 4N + 6 * layers * heads * head_dim * seq_len = 30,018,633,728 + 6 * 32 * 4096 * 2048 = 31,629,246,464.
    assert bench.flops_per_token(arch, 2048) == 31_629_246_464
    # 3,000 tokens/s on an H200 (989 TFLOP/s dense bf16): 9.594% of its peak.
    assert bench.mfu(3000, 31_629_246_464, bench.peak_flops_of("NVIDIA H200")) == pytest.approx(0.0959431, rel=1e-6)
    assert bench.peak_flops_of("NVIDIA H200 NVL") == 835e12
    assert bench.peak_flops_of("Some Other GPU") is None


def test_longest_search_doubles_then_bisects():
    tried = []

    def fits(n: int) -> bool:
        tried.append(n)
        return n <= 5000

    found = bench.longest_fitting(fits, start=256, cap=65536, granularity=256)
    assert (found.seq_len, found.capped) == (4864, False)  # the largest multiple of 256 up to 5000
    assert tried == [256, 512, 1024, 2048, 4096, 8192, 6144, 5120, 4608, 4864]
    assert found.probes == [(n, n <= 5000) for n in tried]

    assert bench.longest_fitting(lambda n: True, 256, 1000, 256) == bench.Longest(1000, True, [
        (256, True), (512, True), (1000, True)])
    assert bench.longest_fitting(lambda n: False, 256, 1000, 256).seq_len == 0


def test_rates_leave_out_the_warm_up_steps():
    assert bench.steady_rate([100, 200, 200], [10.0, 1.0, 1.0], warmup_steps=1) == 200
    with pytest.raises(ValueError):
        bench.steady_rate([100], [1.0], warmup_steps=1)
    # Steps at 100, 200, ..., 1000 tokens/s after a slow first one: the 90th percentile lies between the top two.
    tokens = [1] + [100 * k for k in range(1, 11)]
    assert bench.least_disturbed_rate(tokens, [100.0] + [1.0] * 10, warmup_steps=1) == pytest.approx(910)
    assert bench.steady_rate(tokens, [100.0] + [1.0] * 10, warmup_steps=1) == 550


def test_coarse_longest_tries_each_point_until_a_side_runs_out():
    tried = []

    def fits(side: str, n: int) -> bool:
        tried.append((side, n))
        return n <= {"qlora": 40000, "baseline": 9000}[side]

    found = bench.coarse_longest(fits, [32768, 8192, 65536])
    # Both sides at each point before the next; the baseline drops out at its first failure.
    assert tried == [("qlora", 8192), ("baseline", 8192), ("qlora", 32768), ("baseline", 32768), ("qlora", 65536)]
    assert found["qlora"] == bench.Longest(32768, False, [(8192, True), (32768, True), (65536, False)])
    assert found["baseline"] == bench.Longest(8192, False, [(8192, True), (32768, False)])
    assert bench.coarse_longest(lambda side, n: True, [256, 512])["qlora"] == bench.Longest(
        512, True, [(256, True), (512, True)])
    none = bench.coarse_longest(lambda side, n: False, [256, 512])
    assert none["baseline"] == bench.Longest(0, False, [(256, False)])
