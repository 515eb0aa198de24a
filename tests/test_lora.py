"""LoRA targets every linear layer but the output head by default, and names bad targets."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora.config import LoraConfig
from qlora.errors import QloraError
from qlora.lora import attach_lora, linear_module_names


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_all_linear_excludes_the_head(model):
    assert linear_module_names(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_adapters_are_the_only_trainable_parameters(model):
    linear = set(linear_module_names(model))
    peft_model = attach_lora(model, LoraConfig(r=4, alpha=8))
    trainable = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
    assert len(trainable) == 2 * 7 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert peft_model.peft_config["default"].target_modules == linear


def test_named_targets_rslora_dora(model):
    peft_model = attach_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rslora=True,
                                               dora=True))
    config = peft_model.peft_config["default"]
    assert config.target_modules == {"q_proj", "v_proj"} and config.use_rslora and config.use_dora
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)


def test_unknown_target_is_named(model):
    with pytest.raises(QloraError, match="lora.target_modules: qproj not linear layers of this model; choose from"):
        attach_lora(model, LoraConfig(target_modules=["qproj"]))
