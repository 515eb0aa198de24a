"""LoRA targets every linear layer but the output head by default, and names bad targets."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora.config import LoraConfig, LoraInit
from qlora.errors import QloraError
from qlora.lora import attach_lora, init_adapter, linear_module_names


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


# lora.init ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    """A tiny Llama saved as a checkpoint folder (safetensors): LoftQ reads its float weights from there."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    folder = tmp_path_factory.mktemp("float") / "model"
    model.save_pretrained(folder)
    return folder


def _nf4_with_adapter(folder, **lora):
    from qlora.config import ModelConfig, QuantConfig
    from qlora.model import load_base_model

    base = ModelConfig(name_or_path=str(folder))
    model = load_base_model(base, QuantConfig(), torch.device("cpu"))
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0, **lora)
    model = attach_lora(model, cfg)
    init_adapter(model, cfg, base)
    return model


def _layer_errors(model, folder):
    """Per adapted layer: ||W - (Q + scaling * B @ A)||_F and the singular values of W - Q."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    from qlora.export.merge import dequantized_weight

    weights = load_file(folder / "model.safetensors")
    rows = []
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            w, q = weights[f"{name}.weight"].float(), dequantized_weight(module.get_base_layer()).float()
            b, a = module.lora_B["default"].weight.detach(), module.lora_A["default"].weight.detach()
            ba = module.scaling["default"] * b @ a
            rows.append((float((w - q - ba).norm()), torch.linalg.svdvals(w - q)))
    return rows


def test_loftq_leaves_the_best_rank_r_error_on_a_real_nf4_layer(float_folder):
    default = _layer_errors(_nf4_with_adapter(float_folder), float_folder)
    loftq = _layer_errors(_nf4_with_adapter(float_folder, init=LoraInit.loftq), float_folder)
    assert len(loftq) == 14
    for (before, s), (after, _) in zip(default, loftq, strict=True):
        assert before == pytest.approx(float(s.norm()), rel=1e-5)  # B = 0: the whole quantization error
        # Eckart-Young: what a rank-4 correction cannot remove is the residual's other singular values
        assert after == pytest.approx(float(s[4:].norm()), rel=1e-4)
        assert after < 0.97 * before


def test_loftq_takes_the_adapter_scaling_into_account(float_folder):
    from qlora.loftq import loftq_residual_factors

    torch.manual_seed(1)
    w, q = torch.randn(48, 32), torch.randn(48, 32)
    s = torch.linalg.svdvals(w - q)
    for scaling in (0.5, 2.0, 8 / 4 ** 0.5):
        a, b = loftq_residual_factors(w, q, r=4, scaling=scaling)
        assert float((w - q - scaling * b @ a).norm()) == pytest.approx(float(s[4:].norm()), rel=1e-5)
    # Factors made for scaling 1 (peft 0.21's replace_lora_weights_loftq ignores the scaling) used at scaling 2
    # remove nothing: the residual's norm is exactly what it was.
    a, b = loftq_residual_factors(w, q, r=4, scaling=1.0)
    assert float((w - q - 2.0 * b @ a).norm()) == pytest.approx(float(s.norm()), rel=1e-5)


def test_loftq_with_rslora_scaling(float_folder):
    after = _layer_errors(_nf4_with_adapter(float_folder, init=LoraInit.loftq, rslora=True), float_folder)
    for error, s in after:
        assert error == pytest.approx(float(s[4:].norm()), rel=1e-4)


def test_gaussian_init_starts_as_a_no_op_with_normal_a(model):
    peft_model = attach_lora(model, LoraConfig(r=8, alpha=16, init=LoraInit.gaussian))
    layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    assert torch.count_nonzero(b) == 0
    assert float(a.std()) == pytest.approx(1 / 8, rel=0.1)  # 8 x 32 draws of N(0, 1/r^2)


def test_loftq_needs_the_float_weights(tmp_path):
    from qlora.config import ModelConfig

    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(QloraError, match="lora.init=loftq reads the float weights: .* no safetensors .*"
                                         "use lora.init=default"):
        from qlora.loftq import apply_loftq

        apply_loftq(None, ModelConfig(name_or_path=str(folder)))
