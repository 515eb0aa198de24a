"""GPU-only checks: paging, bf16 compute and CUDA memory figures (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from qlora.metrics import read_metrics
from qlora.train import run
from tests.test_train import compose

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
    assert all(r["cuda_max_allocated_gb"] > 0 for r in rows)
