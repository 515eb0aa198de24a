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
from tests.conftest import REPO

pytestmark = pytest.mark.slow

DTYPES = ["bfloat16", "float16", "float32"]
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
    # what bf16 storage costs, reported (measured 1.2e-4 nats, top-1 99.7%): far above the limit, so the old rule
    # (export vs trained) had to refuse right exports or let wrong ones through
    rounding = v["drift"]["rounding_vs_trained"]
    assert 1e-5 < rounding["mean_kl"] < 1e-3 and rounding["top1_agreement"] > 0.98
    assert v["drift"]["original_merge_vs_trained"]["mean_kl"] > 100 * rounding["mean_kl"]  # measured 0.07


def test_float16_export_passes(exports):
    v, _ = exports("f16", "export.dtype=float16", "export.compare_original=false")
    assert v["passed"] and v["checks"]["merged_vs_rounded_trained"]["mean_kl"] < 1e-12
    assert 1e-8 < v["drift"]["rounding_vs_trained"]["mean_kl"] < 1e-4  # measured 2.6e-6: f16 keeps 3 more bits


def test_float32_export_is_base_plus_adapter(exports, smollm2_run):
    from transformers import AutoModelForCausalLM

    from qlora.model import load_trained_model
    from qlora.runfolder import read_trained

    v, folder = exports("f32", "export.dtype=float32", "export.compare_original=false")
    assert v["passed"] and v["checks"]["merged_vs_rounded_trained"]["mean_kl"] < 1e-12
    assert v["drift"]["rounding_vs_trained"]["mean_kl"] < 1e-9  # float32 rounds nothing (measured 1e-11)
    # Independently of the export's verification: plain transformers vs the run's quantized base + adapter.
    config = read_trained(str(smollm2_run.output_dir)).config
    trained = load_trained_model(config, smollm2_run.output_dir / "adapter", torch.device("cpu"))
    ids = torch.tensor([[1, *range(500, 600)]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits.log_softmax(-1)
        del trained
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=ids).logits
    assert (merged.log_softmax(-1) - expected).abs().max() < 1e-3  # measured 2e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wrong, least", [("scaled", 1e-3), ("left_out", 1e-7), ("original_base", 1e-2)])
def test_a_wrong_merge_fails_in_every_dtype(exports, wrong, least, dtype):
    """Measured mean KL against the rounded trained model (bf16 / f16 / f32): adapter x0.9 ..., layer 0's k_proj
    update left out ..., the original base ...; the limit is 1e-8."""
    v, _ = exports(f"{wrong}-{dtype}", f"export.dtype={dtype}", "export.compare_original=false", wrong=wrong)
    check = v["checks"]["merged_vs_rounded_trained"]
    assert not v["passed"] and check["mean_kl"] > least > 10 * MAX_KL, check


@pytest.mark.parametrize("tensor_type", ["q8_0", "f16"])
def test_gguf_export_passes_and_reads_back(exports, smollm2, tensor_type):
    from transformers import AutoTokenizer

    from qlora.export.gguf_file import load_gguf_model

    v, folder = exports(f"gguf-{tensor_type}", "export.format=gguf", f"export.gguf_type={tensor_type}",
                        "export.compare_original=false")
    assert v["passed"] and v["checks"]["gguf_vs_rounded_merged"]["mean_kl"] < 1e-12
    trained = v["drift"]["gguf_vs_trained"]
    assert trained["top1_agreement"] > 0.98 and trained["mean_kl"] < 1e-3
    model, tokenizer = load_gguf_model(next(folder.glob("*.gguf")))
    text = "Give three tips for staying healthy."
    assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(smollm2)(text)["input_ids"]
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
