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
