"""The base really is stored by bitsandbytes in the configured format, and we measure it correctly."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from qlora import demo
from qlora.model import load_base_model, quant_report


@pytest.fixture
def tiny_model_dir(tiny_config) -> Path:
    config = tiny_config()
    demo.ensure_scratch_model(Path(config.model.name_or_path), config.model.scratch)
    return Path(config.model.name_or_path)


@pytest.mark.parametrize("option,quant_type,nested", [("nf4", "nf4", False), ("nf4-dq", "nf4", True),
                                                      ("fp4", "fp4", False), ("fp4-dq", "fp4", True)])
def test_4bit_layers_are_bitsandbytes_with_the_configured_format(tiny_config, tiny_model_dir, option, quant_type,
                                                                  nested):
    config = tiny_config(f"quant={option}")
    model = load_base_model(config.model, config.quant, torch.device("cpu"))
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    for m in linears:
        assert m.weight.dtype == torch.uint8
        assert m.weight.quant_state.quant_type == quant_type
        assert m.weight.quant_state.nested == nested
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # transformers keeps the head unquantized
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant,bits", [(False, 4.5), (True, 4.127)])
def test_bits_per_parameter_of_a_real_sized_layer_match_the_paper(quant_type, double_quant, bits):
    # 4-bit codes + one fp32 absmax per 64 weights = 4.5 bits; with double quantization the absmax is 8-bit
    # plus one fp32 constant per 256 blocks: 4 + 8/64 + 32/(64*256) = 4.127 (Dettmers et al. 2023, sec. 3).
    layer = bnb.nn.Linear4bit(4096, 4096, bias=False, compress_statistics=double_quant, quant_type=quant_type)
    report = quant_report(torch.nn.Sequential(layer.to("cpu")))
    assert report.quantized_params == 4096 * 4096
    assert report.bits_per_quantized_param == pytest.approx(bits, abs=0.0005)


@pytest.mark.parametrize("option", ["nf4", "nf4-dq", "int8"])
def test_quant_report_counts_every_byte_of_the_tiny_model(tiny_config, tiny_model_dir, option):
    config = tiny_config(f"quant={option}")
    report = quant_report(load_base_model(config.model, config.quant, torch.device("cpu")))
    s = config.model.scratch
    kv_width = s.num_key_value_heads * s.hidden_size // s.num_attention_heads
    shapes = [(s.hidden_size, s.hidden_size)] * 2 + [(kv_width, s.hidden_size)] * 2  # q, o; k, v
    shapes += [(s.intermediate_size, s.hidden_size)] * 2 + [(s.hidden_size, s.intermediate_size)]  # gate, up; down
    shapes *= s.num_hidden_layers

    def layer_bytes(rows: int, cols: int) -> float:
        n = rows * cols
        if option == "int8":
            return n + 4 * rows  # int8 weights, one fp32 scale per output row
        if option == "nf4":
            return n / 2 + 4 * n / 64  # packed codes, fp32 absmax per block of 64
        blocks = n // 64  # double quant: uint8 absmax, fp32 per 256 of them, fp32 offset
        return n / 2 + blocks + 4 * -(-blocks // 256) + 4

    assert report.quantized_params == sum(r * c for r, c in shapes)
    assert report.quantized_bytes == sum(layer_bytes(r, c) for r, c in shapes)


def test_4bit_dequantized_weights_equal_bitsandbytes_roundtrip(tiny_config, tiny_model_dir):
    from safetensors.torch import load_file

    config = tiny_config("quant=nf4-dq")
    model = load_base_model(config.model, config.quant, torch.device("cpu"))
    original = load_file(tiny_model_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    layer = model.model.layers[0].self_attn.q_proj
    ours = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    packed, state = bnb.functional.quantize_4bit(original.float(), quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours, bnb.functional.dequantize_4bit(packed, state))
    assert 0 < (ours - original).abs().max() < original.abs().max() / 4  # quantized, but close


def test_int8_and_unquantized_bases(tiny_config, tiny_model_dir):
    config = tiny_config("quant=int8")
    int8 = load_base_model(config.model, config.quant, torch.device("cpu"))
    layer = int8.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
    before = quant_report(int8)
    assert before.bits_per_quantized_param == pytest.approx(8 + 32 / 64, abs=0.3)
    with torch.no_grad():
        int8(input_ids=torch.tensor([[1, 2, 3]]))  # moves each layer's row scales from the weight to its state
    assert quant_report(int8) == before

    config = tiny_config("quant=none")
    plain = load_base_model(config.model, config.quant, torch.device("cpu"))
    assert type(plain.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert plain.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


def test_eval_forward_keeps_the_training_layout(tiny_config, tiny_model_dir):
    # bitsandbytes would repack 4-bit weights for CPU inference on AVX512-BF16 machines, after which no
    # gradient flows through the base; the loader must prevent that (see model._keep_training_layout).
    config = tiny_config("quant=nf4-dq")
    model = load_base_model(config.model, config.quant, torch.device("cpu")).eval()
    layer = model.model.layers[0].self_attn.q_proj
    packed_before = layer.weight.data.clone()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert layer.weight.quant_state.nested
    assert torch.equal(layer.weight.data, packed_before)


def test_missing_model_is_a_clear_error(tiny_config, tmp_path):
    from qlora.errors import QloraError

    config = tiny_config(f"model.name_or_path={tmp_path}")
    with pytest.raises(QloraError, match="could not load the model from"):
        load_base_model(config.model, config.quant, torch.device("cpu"))
