"""GPU-only checks: paging, bf16 compute and CUDA memory figures (skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from qlora.metrics import read_metrics
from qlora.train import run
from tests.runs import compose

pytestmark = pytest.mark.gpu


def test_paged_optimizer_state_is_paged_on_cuda(tmp_path):
    result = run(compose(tmp_path / "cache", tmp_path / "run", "train.max_steps=3", "train.eval_every_steps=0",
                         "train.sample_prompts=[]"))
    states = list(result.optimizer.state.values())
    assert states and all(s["state1"].is_paged and s["state1"].dtype == torch.uint8 for s in states)
    base = result.model.get_base_model()
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.device.type == "cuda"
    assert base.model.layers[0].self_attn.q_proj.base_layer.compute_dtype == torch.bfloat16
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert all(r["memory_gb"] > 0 for r in rows)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["planned_memory_gb"] > 0 and summary["peak_memory_gb"] > 0  # the memory check ran on CUDA


def test_a_resumed_paged_optimizer_stays_paged_and_continues_the_same_run(tmp_path):
    # Adapter matrices of 1e5+ elements are what bitsandbytes pages: width 512 with r=256 gives 131,072.
    shape = [f"model.scratch.path={tmp_path}/cache/w512", "model.scratch.hidden_size=512",
             "model.scratch.intermediate_size=1024", "lora.r=256", "train.max_steps=6", "train.save_every_steps=3",
             "train.eval_every_steps=0", "train.sample_prompts=[]", "train.log_every_steps=1"]
    run(compose(tmp_path / "cache", tmp_path / "whole", *shape))
    first = run(compose(tmp_path / "cache", tmp_path / "half", *shape, "train.max_steps=3"))
    resumed = run(compose(tmp_path / "cache", tmp_path / "half", *shape, "resume=auto", "train.max_steps=6"))
    big = [s for s in resumed.optimizer.state.values() if s["state1"].numel() >= 1e5]
    assert big and all(s["state1"].is_paged for s in big)
    assert first.state.step == 3 and resumed.state.step == 6
    losses = [[r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("whole", "half")]
    # GPU kernels are not bit-reproducible from run to run; the documented tolerance is 1e-3 relative.
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_out_of_memory_in_training_names_the_settings_to_lower(tmp_path):
    from qlora.errors import QloraError

    # About 110 MB of 4-bit weights fit in 1 GB; a whole-dataset batch without gradient checkpointing does not.
    big = [f"model.scratch.path={tmp_path}/cache/w2048", "model.scratch.hidden_size=2048",
           "model.scratch.intermediate_size=5632", "model.scratch.num_hidden_layers=4",
           "model.scratch.num_attention_heads=16", "model.scratch.num_key_value_heads=4", "train.max_steps=2",
           "train.micro_batch_size=160", "train.eval_every_steps=0", "train.sample_prompts=[]"]
    torch.cuda.set_per_process_memory_fraction(2**30 / torch.cuda.get_device_properties(0).total_memory)
    try:
        with pytest.raises(QloraError, match=r"^out of GPU memory in training step 1; lower "
                                             r"train.micro_batch_size=160"):
            run(compose(tmp_path / "cache", tmp_path / "run", *big))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert not (tmp_path / "run" / "adapter").exists()


def test_per_sample_attention_on_cuda_is_the_masked_attention():
    """bf16 on CUDA takes torch's variable-length flash attention: the same logits as SDPA under the mask."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qlora.attention import use_per_sample_sdpa
    from tests.runs import packed_batch

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").cuda().to(torch.bfloat16)
    batch = packed_batch()
    inputs = {"input_ids": batch["input_ids"].cuda(), "position_ids": batch["position_ids"].cuda(), "use_cache": False}
    with torch.no_grad():
        masked = model(**inputs).logits.float()
        assert use_per_sample_sdpa(model)
        per_sample = model(**inputs).logits.float()
    torch.testing.assert_close(per_sample, masked, rtol=0, atol=0.05)  # bf16: kernels round differently
