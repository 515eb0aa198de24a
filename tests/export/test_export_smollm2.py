"""Export verification on the real model (SmolLM2-135M: 30 layers, tied embeddings) after a short QLoRA run: a
right merge passes in bfloat16, float16 and float32 and as GGUF, and a wrong one fails in every dtype, though
bfloat16's own rounding moves the model far more than some of the wrong merges do.

The wrong merges are injected into merge.py, the code under test, never into the verifier (scripts/
export_fidelity.py's `wrong_merge`, which also makes the table in docs/export.md): every LoRA update scaled by
0.9, one layer's update left out, and the original checkpoint's weights merged where the dequantized ones belong.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from qlora.composition import compose_command
from qlora.config import ExportCommand
from qlora.errors import QloraError
from qlora.export import export
from tests.runs import REPO

pytestmark = pytest.mark.slow

MAX_KL = 1e-8  # export.max_kl's default


def _load_script():
    spec = importlib.util.spec_from_file_location("export_fidelity", REPO / "scripts" / "export_fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["export_fidelity"] = module
    spec.loader.exec_module(module)
    return module


fidelity = _load_script()


@pytest.fixture(scope="module")
def exports(smollm2_run, tmp_path_factory):
    """`exports(name, *options, wrong=None)`: the verification.json of that export of the smollm2_run run (made
    once per module; `wrong` makes merge.py wrong per `wrong_merge`), and the folder it was kept in."""
    root = tmp_path_factory.mktemp("smollm2-exports")
    done: dict[str, tuple[dict, Path]] = {}

    def make(name: str, *options: str, wrong: str | None = None) -> tuple[dict, Path]:
        if name not in done:
            out = root / name
            cmd = compose_command(ExportCommand, [f"run_dir={smollm2_run.output_dir}", f"output_dir={out}", *options])
            if wrong is None:
                export(cmd)
            else:
                with fidelity.wrong_merge(wrong, smollm2_run.output_dir), pytest.raises(QloraError) as failed:
                    export(cmd)
                assert "does not compute what it should" in str(failed.value)
                out = out.with_name(out.name + ".unverified")
            done[name] = json.loads((out / "verification.json").read_text()), out
        return done[name]

    return make


def test_default_bfloat16_export_passes(exports):
    v, _ = exports("bf16")  # every option at its default
    assert v["passed"] and v["max_kl"] == MAX_KL
    assert v["checks"]["merged_vs_rounded_trained"]["mean_kl"] < 1e-12  # measured 0: operation order alone
    # what bf16 storage costs, reported (measured 1.1e-4 nats, top-1 99.3%): above what some wrong merges do, so
    # the old rule (export vs trained, one limit) had to refuse right exports or let wrong ones through
    rounding = v["drift"]["rounding_vs_trained"]
    assert 1e-5 < rounding["mean_kl"] < 1e-3 and rounding["top1_agreement"] > 0.98
    assert v["drift"]["original_merge_vs_trained"]["mean_kl"] > 100 * rounding["mean_kl"]  # measured 0.26


def test_float16_export_passes(exports):
    v, _ = exports("f16", "export.dtype=float16", "export.compare_original=false")
    assert v["passed"] and v["checks"]["merged_vs_rounded_trained"]["mean_kl"] < 1e-12
    assert 1e-7 < v["drift"]["rounding_vs_trained"]["mean_kl"] < 3e-5  # measured 2.8e-6: f16 keeps 3 more bits


def test_float32_export_is_base_plus_adapter(exports, smollm2_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.model import load_trained_model
    from qlora.runfolder import read_trained

    v, folder = exports("f32", "export.dtype=float32", "export.compare_original=false")
    assert v["passed"] and v["checks"]["merged_vs_rounded_trained"]["mean_kl"] < 1e-12
    assert v["drift"]["rounding_vs_trained"]["mean_kl"] < 1e-9  # float32 rounds nothing (measured 1.0e-11)
    # Independently of the export's verification: plain transformers vs the run's quantized base + adapter.
    config = read_trained(str(smollm2_run.output_dir)).config
    trained = load_trained_model(config, smollm2_run.output_dir / "adapter", torch.device("cpu"))
    ids = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        [{"role": "user", "content": "Give three tips for staying healthy."},
         {"role": "assistant", "content": "Eat well, sleep enough and move every day."}], return_tensors="pt",
        return_dict=True)["input_ids"]
    with torch.no_grad():
        expected = trained(input_ids=ids).logits.log_softmax(-1)
        del trained
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=ids).logits
    assert (merged.log_softmax(-1) - expected).abs().max() < 1e-3  # measured 5e-5 (the issue asks < 1e-2)


WRONG_MERGES = [  # (kind, dtype, least KL it must show): every kind in bf16, whose own rounding is the largest
    # (KL 9e-5), and the subtlest kind in every dtype; f16 and f32 round less, so what bf16 catches they catch too
    ("scaled", "bfloat16", 1e-3), ("left_out", "bfloat16", 3e-7), ("original_base", "bfloat16", 0.1),
    ("left_out", "float16", 3e-7), ("left_out", "float32", 3e-7),
]


@pytest.mark.parametrize("wrong, dtype, least", WRONG_MERGES)
def test_a_wrong_merge_fails_in_every_dtype(exports, wrong, dtype, least):
    """Measured mean KL against the rounded trained model on the recipe's 40-step run (scripts/export_fidelity.py
    --wrong, docs/export.md), about the same in every dtype: adapter x0.9 1.9e-3; layer 0's k_proj update left out
    3.3e-6 to 3.7e-6; the original base 0.17. On this test's 8-step run: 1.8e-3, 6.0e-7 to 7.2e-7 (the least of 21
    layers tried), 0.26. The limit is 1e-8, and bf16 rounding alone costs about 1e-4."""
    v, _ = exports(f"{wrong}-{dtype}", f"export.dtype={dtype}", "export.compare_original=false", wrong=wrong)
    check = v["checks"]["merged_vs_rounded_trained"]
    assert not v["passed"] and check["mean_kl"] > least > 10 * MAX_KL, check


@pytest.mark.parametrize("tensor_type, kl, top1", [("q8_0", 5e-3, 0.93), ("q4_k_m", 0.2, 0.75)])  # f16: test_gguf.py
def test_gguf_export_passes_and_reads_back(exports, smollm2, tensor_type, kl, top1):
    """Read back, the file is the bf16 export rounded as the file stores it (f16 matrices: bf16 values exactly);
    against the trained model, q8_0 costs mean KL 2.1e-3, top-1 95.6% (measured), f16 what bf16 did; q4_k_m, with
    llama.cpp's mix for SmolLM2's rows of 576 (Q5_0, Q8_0) and 1536 (Q4_K, Q6_K), calibrated on the run's data,
    costs mean KL 0.079, top-1 85.1% (measured)."""
    from transformers import AutoTokenizer

    from qlora.export.gguf_file import load_gguf_model

    v, folder = exports(f"gguf-{tensor_type}", "export.format=gguf", f"export.gguf_type={tensor_type}",
                        "export.compare_original=false")
    assert v["passed"] and v["checks"]["gguf_vs_rounded_merged"]["mean_kl"] < 1e-12  # measured 0
    trained = v["drift"]["gguf_vs_trained"]
    assert trained["mean_kl"] < kl and trained["top1_agreement"] > top1, trained
    model, tokenizer = load_gguf_model(next(folder.glob("*.gguf")))
    text = "Give three tips for staying healthy."
    assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(smollm2)(text)["input_ids"]
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    if tensor_type == "q4_k_m":
        assert v["file"]["tensor_types"] == {"Q5_0": 166, "F32": 61, "Q4_K": 16, "Q8_0": 15, "Q6_K": 14}
        assert v["file"]["calibration"].startswith("128 sequences") and "of the run's training data" in v["file"][
            "calibration"]
