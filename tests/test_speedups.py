"""The memory and speed switches change what a run costs, not what it learns: the same losses within tolerance."""

from __future__ import annotations

import pytest
import torch

from qlora.attention import PER_SAMPLE_SDPA
from qlora.metrics import read_metrics
from qlora.train import run

pytestmark = pytest.mark.slow  # pairs of training runs compared

STEPS = ["train.max_steps=6", "train.log_every_steps=1", "train.eval_every_steps=3", "train.sample_prompts=[]",
         "train.report=false", "lora.dropout=0"]


def losses(result) -> list[float]:
    return [r.get("loss", r.get("eval_loss")) for r in read_metrics(result.output_dir)]


def adapter(result) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in result.model.named_parameters() if p.requires_grad}


# Two ways of computing the same loss agree to float rounding, not bit for bit, and the optimizer decides how far that
# carries. An 8-bit optimizer state turns a last-bit difference into a whole quantization step now and then, on one
# CPU and not on another; torch's float32 AdamW does not. It still divides by the gradient's running size, so an
# element whose gradient is nearly 0 can move by a small share of one step (lr 3e-3 here): hence 1% of lr.
EXACT_OPTIMIZER = ["optim=adamw"]
ADAPTER_ATOL = 3e-5


def max_adapter_difference(a, b) -> float:
    theirs = adapter(b)
    return max(float((value - theirs[name]).abs().max()) for name, value in adapter(a).items())


@pytest.mark.parametrize("chunk", ["7", "100000"])
def test_chunked_loss_trains_as_the_full_logits_do(tiny_config, tmp_path, chunk):
    """Chunks smaller than a micro batch's trained tokens and one chunk for all of them, against full logits."""
    full = run(tiny_config(*STEPS, *EXACT_OPTIMIZER, "train.loss_chunk_tokens=0", output_dir=tmp_path / "full"))
    chunked = run(tiny_config(*STEPS, *EXACT_OPTIMIZER, f"train.loss_chunk_tokens={chunk}",
                              output_dir=tmp_path / "chunked"))
    assert losses(chunked) == pytest.approx(losses(full), rel=1e-5)
    assert max_adapter_difference(chunked, full) < ADAPTER_ATOL


@pytest.mark.parametrize("packing", ["false", "true"])
def test_chunked_loss_over_packed_and_padded_batches(tiny_config, tmp_path, packing):
    runs = [run(tiny_config(*STEPS, f"data.packing={packing}", f"train.loss_chunk_tokens={c}",
                            output_dir=tmp_path / c)) for c in ("0", "16")]
    assert losses(runs[1]) == pytest.approx(losses(runs[0]), rel=1e-5)  # the paged 8-bit optimizer: losses only


def test_embeddings_in_the_compute_dtype(tiny_config, tmp_path):
    """bf16 compute on the CPU: peft's float32 embeddings and head against ours in bf16. The loss moves by
    bf16 rounding only; the base shrinks by half of the two matrices."""
    bf16 = ["quant.compute_dtype=bfloat16", "train.mixed_precision=bf16", *STEPS]
    upcast = run(tiny_config(*bf16, "train.float32_embeddings=true", output_dir=tmp_path / "fp32"))
    kept = run(tiny_config(*bf16, output_dir=tmp_path / "bf16"))
    model = kept.model.get_base_model()
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32  # the rest of peft's preparation stands
    assert upcast.model.get_base_model().get_input_embeddings().weight.dtype == torch.float32
    frozen = [sum(p.numel() * p.element_size() for p in r.model.parameters() if not p.requires_grad)
              for r in (upcast, kept)]
    embeddings = sum(m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings()))
    assert frozen[0] - frozen[1] == 2 * embeddings  # 4 bytes a weight -> 2
    assert losses(kept) == pytest.approx(losses(upcast), rel=2e-2)
    assert losses(kept)[-1] < 0.9 * losses(kept)[0]


def test_trained_embeddings_stay_float32(tiny_config, tmp_path):
    result = run(tiny_config(*STEPS, "quant.compute_dtype=bfloat16", "train.mixed_precision=bf16",
                             "lora.modules_to_save=[lm_head]", output_dir=tmp_path / "run"))
    head = result.model.get_base_model().get_output_embeddings()
    assert all(p.dtype == torch.float32 for p in head.parameters())
    assert result.model.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16


def test_recomputing_some_layers_trains_as_recomputing_none_or_all(tiny_config, tmp_path):
    """Gradient checkpointing changes what is kept, not what is computed: with LoRA dropout on, the recomputed
    forward draws the same masks. The memory limit makes auto recompute one of the tiny model's two layers."""
    settings = {"none": ["train.gradient_checkpointing=false"], "all": ["train.gradient_checkpointing=true"],
                "auto": ["train.gradient_checkpointing=auto", "train.memory_limit_gb=0.001"]}
    runs = {name: run(tiny_config(*STEPS, "lora.dropout=0.1", *extra, output_dir=tmp_path / name))
            for name, extra in settings.items()}
    recomputed = {name: [layer.gradient_checkpointing for layer in r.model.get_base_model().model.layers]
                  for name, r in runs.items()}
    assert recomputed == {"none": [False, False], "all": [True, True], "auto": [True, False]}
    for name in ("all", "auto"):
        assert losses(runs[name]) == losses(runs["none"])
        for key, value in adapter(runs["none"]).items():
            torch.testing.assert_close(adapter(runs[name])[key], value, rtol=0, atol=0)


def test_per_sample_attention_trains_as_the_block_diagonal_mask(tiny_config, tmp_path):
    packed = [*STEPS, "data.packing=true"]
    runs = {value: run(tiny_config(*packed, *EXACT_OPTIMIZER, f"train.per_sample_attention={value}",
                                   output_dir=tmp_path / value))
            for value in ("false", "true")}
    assert [runs[v].model.config._attn_implementation for v in ("false", "true")] == ["sdpa", PER_SAMPLE_SDPA]
    assert losses(runs["true"]) == pytest.approx(losses(runs["false"]), rel=1e-5)
    assert max_adapter_difference(runs["true"], runs["false"]) < ADAPTER_ATOL
