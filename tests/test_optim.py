"""The configured optimizer class really runs, with 8-bit state where it says so; schedules have their shape."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from qlora.config import OptimConfig, OptimizerName, Schedule
from qlora.optim import build_optimizer, lr_lambda

EXPECTED = {
    OptimizerName.paged_adamw_8bit: (bnb.optim.PagedAdamW8bit, torch.uint8, True),
    OptimizerName.paged_adamw_32bit: (bnb.optim.PagedAdamW32bit, torch.float32, True),
    OptimizerName.paged_lion_8bit: (bnb.optim.PagedLion8bit, torch.uint8, True),
    OptimizerName.adamw_8bit: (bnb.optim.AdamW8bit, torch.uint8, False),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_bitsandbytes_optimizers_keep_the_configured_state(name):
    cls, state_dtype, paged = EXPECTED[name]
    weight = torch.nn.Parameter(torch.randn(64, 64))
    opt = build_optimizer([weight], OptimConfig(name=name, min_8bit_size=1024), torch.device("cpu"))
    assert type(opt) is cls
    assert opt.is_paged == paged
    before = weight.detach().clone()
    weight.grad = torch.randn_like(weight)
    opt.step()
    assert opt.state[weight]["state1"].dtype == state_dtype
    assert not torch.equal(weight, before)


def test_small_tensors_keep_32bit_state_below_min_8bit_size():
    weight = torch.nn.Parameter(torch.randn(8, 8))
    opt = build_optimizer([weight], OptimConfig(name=OptimizerName.adamw_8bit, min_8bit_size=4096),
                          torch.device("cpu"))
    weight.grad = torch.randn_like(weight)
    opt.step()
    assert opt.state[weight]["state1"].dtype == torch.float32


def test_torch_adamw():
    opt = build_optimizer([torch.nn.Parameter(torch.ones(3))], OptimConfig(name=OptimizerName.adamw, lr=0.1),
                          torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 0.1


@pytest.mark.parametrize("schedule,at_half,at_end", [(Schedule.constant, 1.0, 1.0), (Schedule.linear, 0.5, 0.0),
                                                      (Schedule.cosine, 0.5, 0.0)])
def test_schedules_after_warmup(schedule, at_half, at_end):
    f = lr_lambda(OptimConfig(schedule=schedule, warmup_steps=10), max_steps=110)
    assert [round(f(s), 3) for s in (0, 9)] == [round(1 / 11, 3), round(10 / 11, 3)]
    assert f(10) == 1.0
    assert f(60) == pytest.approx(at_half)
    assert f(110) == pytest.approx(at_end)


def test_lora_plus_puts_b_in_its_own_group_at_lr_times_ratio():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora.config import LoraConfig
    from qlora.lora import attach_lora
    from qlora.optim import build_scheduler, param_groups

    torch.manual_seed(0)
    model = attach_lora(LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=4,
                                                     num_key_value_heads=2)), LoraConfig(r=4, alpha=8))
    names = {id(p): n for n, p in model.named_parameters()}
    cfg = OptimConfig(name=OptimizerName.adamw, lr=1e-3, lora_plus_ratio=16, warmup_steps=2,
                      schedule=Schedule.cosine)
    opt = build_optimizer(param_groups(model, cfg), cfg, torch.device("cpu"))
    a_group, b_group = opt.param_groups
    assert len(a_group["params"]) == len(b_group["params"]) == 7
    assert all(".lora_A." in names[id(p)] for p in a_group["params"])
    assert all(".lora_B." in names[id(p)] for p in b_group["params"])
    assert (a_group["lr"], b_group["lr"]) == (1e-3, pytest.approx(16e-3))
    scheduler = build_scheduler(opt, cfg, max_steps=10)
    for _ in range(5):
        opt.step()
        scheduler.step()
    factor = lr_lambda(cfg, 10)(5)
    assert scheduler.get_last_lr() == [pytest.approx(1e-3 * factor), pytest.approx(16e-3 * factor)]
    assert len(opt.state_dict()["param_groups"]) == 2
    off = param_groups(model, OptimConfig())
    assert len(off) == 1 and len(off[0]["params"]) == 14 and "lr" not in off[0]


@pytest.mark.slow
def test_a_resumed_run_with_every_quality_option_equals_the_uninterrupted_one(tiny_config, tmp_path):
    """LoRA+ (two param groups in the optimizer state), NEFTune (noise drawn from the checkpointed RNG), LoftQ (not
    redone on resume: the adapter is restored) and dropout: bit-exact after a resume."""
    from qlora import checkpoint
    from qlora.train import run
    from tests.runs import run_differences

    options = ["lora.init=loftq", "optim.lora_plus_ratio=16", "train.neftune_alpha=5", "lora.dropout=0.1",
               "train.max_steps=8", "train.save_every_steps=4", "train.keep_checkpoints=0", "train.log_every_steps=1",
               "train.eval_every_steps=4", "train.report=false"]
    reference = run(tiny_config(*options, output_dir=tmp_path / "reference"))
    assert len(reference.optimizer.state_dict()["param_groups"]) == 2
    older = checkpoint.complete_checkpoints(tmp_path / "reference")[0]
    assert checkpoint.step_of(older) == 4
    run(tiny_config(*options, f"resume={older}", output_dir=tmp_path / "resumed"))
    assert run_differences(tmp_path / "reference", tmp_path / "resumed") == []
