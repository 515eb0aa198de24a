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
@pytest.mark.slow
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
@pytest.mark.slow
def test_bits_per_parameter_of_a_real_sized_layer_match_the_paper(quant_type, double_quant, bits):
    # 4-bit codes + one fp32 absmax per 64 weights = 4.5 bits; with double quantization the absmax is 8-bit
    # plus one fp32 constant per 256 blocks: 4 + 8/64 + 32/(64*256) = 4.127 (Dettmers et al. 2023, sec. 3).
    layer = bnb.nn.Linear4bit(4096, 4096, bias=False, compress_statistics=double_quant, quant_type=quant_type)
    report = quant_report(torch.nn.Sequential(layer.to("cpu")))
    assert report.quantized_params == 4096 * 4096
    assert report.bits_per_quantized_param == pytest.approx(bits, abs=0.0005)


@pytest.mark.parametrize("option", ["nf4", "nf4-dq", "int8"])
@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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

    config = tiny_config("recipe=default", f"model.name_or_path={tmp_path}")
    with pytest.raises(QloraError, match="could not load the model (config )?from .*is it a complete HF model folder"):
        load_base_model(config.model, config.quant, torch.device("cpu"))


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory) -> Path:
    """A tiny random Gemma 2 folder (soft-capped attention and logits, sliding window, tied embeddings)."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    folder = tmp_path_factory.mktemp("gemma2") / "model"
    tokenizer = demo.build_demo_tokenizer()
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                          sliding_window=32, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    demo.write_demo_dataset(folder.parent / "animals.jsonl")
    return folder


@pytest.mark.slow
def test_gemma2_trains_and_exports_with_the_attention_its_architecture_supports(gemma2, tmp_path):
    """transformers computes no sdpa attention for Gemma 2 (its scores are soft-capped), and says so in the model
    class the config names: attn_implementation=auto picks eager from that, no setting given, no name read."""
    from qlora.composition import compose_command, compose_config
    from qlora.config import ExportCommand
    from qlora.export import export
    from qlora.runfolder import read_trained
    from qlora.train import run

    config = compose_config([f"model.name_or_path={gemma2}", f"data.path={gemma2.parent / 'animals.jsonl'}",
                             f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=4",
                             "train.seq_len=64", "train.grad_accum_steps=1", "train.eval_every_steps=4",
                             "train.samples_from_eval=1", "train.max_new_tokens=4", "train.loggers=[]",
                             "train.progress=false", "train.report=false"])
    assert config.model.attn_implementation == "auto"
    result = run(config)
    assert result.model.config._attn_implementation == "eager"
    assert read_trained(str(result.output_dir)).config.model.attn_implementation == "eager"  # what ran, recorded
    assert result.final_eval_loss < result.first_eval_loss
    exported = export(compose_command(ExportCommand, [f"run_dir={result.output_dir}", f"output_dir={tmp_path / 'x'}"]))
    assert not exported.verification.failed


def test_an_attention_the_architecture_lacks_is_named_as_such(gemma2, tiny_config):
    from qlora.errors import QloraError

    config = tiny_config("recipe=default", f"model.name_or_path={gemma2}", "model.attn_implementation=sdpa")
    with pytest.raises(QloraError, match=r"^transformers cannot load the model from .*: Gemma2ForCausalLM does not "
                                         r"support .*scaled_dot_product_attention.*; set model.attn_implementation"):
        load_base_model(config.model, config.quant, torch.device("cpu"))
