"""The 4- to 6-bit GGUF types: llama.cpp's per-tensor mixes, the K-quants auto-round packs, and the importance
matrix they are calibrated by."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from qlora.export.calibration import Calibration, importance_matrix
from qlora.export.gguf_file import load_gguf_model, stored_types, write_gguf
from qlora.export.gguf_types import encode, stored_values, tensor_type

# llama.cpp's Q4_K_M puts Q6_K in half of a 32-layer model's attn_v and ffn_down: the first and last 4 layers and
# every third between (use_more_bits)
MORE_BITS_OF_32 = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def _types(file_type: str, kind: str, cols: int = 4096, layers: int = 32, tied: bool = False) -> list[QType]:
    return [tensor_type(file_type, f"blk.{i}.{kind}.weight", (4096, cols), layers, tied) for i in range(layers)]


def test_q4_k_m_gives_six_bits_to_half_of_attn_v_and_ffn_down():
    for kind in ("attn_v", "ffn_down"):
        types = _types("q4_k_m", kind)
        assert [i for i, t in enumerate(types) if t == QType.Q6_K] == MORE_BITS_OF_32
        assert {t for t in types} == {QType.Q4_K, QType.Q6_K}
        assert [i for i, t in enumerate(_types("q5_k_m", kind)) if t == QType.Q6_K] == MORE_BITS_OF_32
    for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert set(_types("q4_k_m", kind)) == {QType.Q4_K}
        assert set(_types("q5_k_m", kind)) == {QType.Q5_K}
        assert set(_types("q6_k", kind)) == {QType.Q6_K}


def test_q4_k_s_gives_five_bits_to_the_first_layers():
    assert [i for i, t in enumerate(_types("q4_k_s", "attn_v")) if t == QType.Q5_K] == [0, 1, 2, 3]
    assert [i for i, t in enumerate(_types("q4_k_s", "ffn_down")) if t == QType.Q5_K] == [0, 1, 2, 3]  # 32 / 8
    assert set(_types("q4_k_s", "ffn_up")) == {QType.Q4_K}
    assert set(_types("q5_k_s", "attn_v")) == set(_types("q5_k_s", "ffn_down")) == {QType.Q5_K}


@pytest.mark.parametrize("file_type, output, embedding", [
    ("q4_k_m", QType.Q6_K, QType.Q4_K), ("q5_k_s", QType.Q6_K, QType.Q5_K), ("q6_k", QType.Q6_K, QType.Q6_K),
    ("q4_0", QType.Q8_0, QType.Q4_0), ("q8_0", QType.Q8_0, QType.Q8_0), ("bf16", QType.BF16, QType.BF16)])
def test_the_output_head_keeps_more_bits(file_type, output, embedding):
    assert tensor_type(file_type, "output.weight", (32000, 4096), 32, tied=False) == output
    assert tensor_type(file_type, "token_embd.weight", (32000, 4096), 32, tied=False) == embedding
    assert tensor_type(file_type, "token_embd.weight", (32000, 4096), 32, tied=True) == output  # it is the head
    assert tensor_type(file_type, "blk.0.attn_norm.weight", (4096,), 32, tied=False) == QType.F32


def test_rows_no_k_block_fits_fall_back_as_in_llama_cpp():
    """SmolLM2's rows of 576 (hidden size) hold no 256-value block; its rows of 1536 (ffn_down's input) do."""
    assert set(_types("q4_k_m", "attn_q", cols=576, layers=30)) == {QType.Q5_0}
    assert set(_types("q5_k_m", "attn_q", cols=576, layers=30)) == {QType.Q5_1}
    assert set(_types("q6_k", "attn_q", cols=576, layers=30)) == {QType.Q8_0}
    assert set(_types("q4_k_m", "attn_v", cols=576, layers=30)) == {QType.Q5_0, QType.Q8_0}  # Q6_K -> Q8_0
    assert set(_types("q4_k_m", "ffn_down", cols=1536, layers=30)) == {QType.Q4_K, QType.Q6_K}
    assert tensor_type("q4_k_m", "token_embd.weight", (49152, 576), 30, tied=True) == QType.Q8_0
    assert tensor_type("q4_k_m", "blk.0.ffn_down.weight", (64, 112), 30, tied=False) == QType.F16  # no 32-block


# Everything below packs real K-quants through auto-round and reads them back with gguf and transformers.

SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A Llama of rows 256 and 512 long, so every K-quant fits, with the scratch BPE tokenizer."""
    from qlora.config import ScratchArchitecture, ScratchModelConfig, ScratchTokenizer
    from qlora.demo import ensure_scratch_model, write_demo_dataset

    root = tmp_path_factory.mktemp("kquant")
    corpus = root / "corpus.jsonl"
    write_demo_dataset(corpus)
    out = root / "llama256"
    ensure_scratch_model(out, ScratchModelConfig(
        path=str(out), architecture=ScratchArchitecture.llama, tokenizer=ScratchTokenizer.bpe,
        tokenizer_corpus=str(corpus), tokenizer_vocab_size=512, **SHAPE))
    return out


def _model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(0))


def _importance(folder: Path) -> dict[str, torch.Tensor]:
    return importance_matrix(_model(folder), Calibration(list(_ids()), "random ids"))


@pytest.mark.slow
def test_the_importance_matrix_is_the_mean_squared_input_of_each_column(folder):
    model = _model(folder)
    ids = _ids()
    importance = importance_matrix(model, Calibration(list(ids), "random ids"))
    with torch.no_grad():
        first = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        hidden = model.model(ids).last_hidden_state  # the final norm's output: what the head multiplies
    torch.testing.assert_close(importance["model.layers.0.self_attn.q_proj.weight"],
                               first.reshape(-1, 256).square().mean(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(importance["lm_head.weight"], hidden.reshape(-1, 256).square().mean(0),
                               rtol=1e-5, atol=0)
    assert len(importance) == 4 * 7 + 1  # q k v o gate up down per layer, and the head


@pytest.mark.slow
@pytest.mark.parametrize("file_type", ["q4_k_m", "q4_k_s", "q5_k_m", "q6_k"])
def test_a_k_quant_file_computes_what_its_rounding_says(folder, tmp_path, file_type):
    """The file holds llama.cpp's mix, each tensor's values are `stored_values` of the HF tensor (rounded with its
    importance matrix), and transformers reading the file computes what the HF model so rounded computes."""
    importance = _importance(folder)
    path = tmp_path / f"m-{file_type}.gguf"
    written = write_gguf(folder, path, file_type, importance=importance)
    types = stored_types(path, folder)
    assert written == types  # what the writer says it wrote is what the file holds
    k_types = {QType.Q4_K, QType.Q5_K, QType.Q6_K}
    assert k_types & set(types.values())  # rows of 256 and 512: K-quants, not fallbacks
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 4)
    reference = _model(folder)
    for key, param in reference.named_parameters():
        name = names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))[1]
        assert types[key] == tensor_type(file_type, name, tuple(param.shape), 4, tied=False), key
        param.data = stored_values(param.data, types[key], importance.get(key))
    read_back, _ = load_gguf_model(path)
    with torch.no_grad():
        torch.testing.assert_close(read_back(_ids()).logits, reference(_ids()).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_importance_matrix_lowers_the_weighted_rounding_error(folder):
    """Calibrated, a K-quant puts its rounding where the inputs are small: the importance-weighted error falls, and
    the bytes differ from plain round-to-nearest."""
    importance = _importance(folder)
    model = _model(folder)
    plain, weighted = 0.0, 0.0
    for key in ("model.layers.0.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.weight"):
        weight, columns = dict(model.named_parameters())[key].data, importance[key]
        assert not np.array_equal(encode(weight, QType.Q4_K), encode(weight, QType.Q4_K, columns))
        for calibrated in (False, True):
            error = (stored_values(weight, QType.Q4_K, columns if calibrated else None) - weight).square()
            score = (error * columns).sum().item()
            plain, weighted = (plain + score, weighted) if not calibrated else (plain, weighted + score)
    assert weighted < 0.97 * plain, (weighted, plain)


@pytest.mark.slow
def test_k_quant_encoding_does_not_touch_its_input(folder):
    """auto-round rounds its float32 input in place; the writer hands it a copy."""
    weight = _model(folder).model.layers[0].mlp.down_proj.weight.data
    before = weight.clone()
    encode(weight, QType.Q4_K)
    assert torch.equal(weight, before)


def test_k_quants_without_auto_round_are_refused_at_config_time(monkeypatch, tmp_path):
    import importlib.util

    from qlora.composition import compose_command
    from qlora.config import ExportCommand, validate_export
    from qlora.errors import ConfigError

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "auto_round" else find_spec(name, *a))
    options = [f"run_dir={tmp_path / 'run'}", f"output_dir={tmp_path / 'out'}", "export.format=gguf"]
    with pytest.raises(ConfigError, match=r"q4_k_m is a K-quant, packed by auto-round, which is not installed; "
                                          r"pip install 'qlora\[quantize\]'"):
        validate_export(compose_command(ExportCommand, [*options, "export.gguf_type=q4_k_m"]))
    validate_export(compose_command(ExportCommand, [*options, "export.gguf_type=q4_0"]))  # the gguf package's own


@pytest.mark.parametrize("template, before, after", [
    ("chatml", "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    ("alpaca", "Below is an instruction", "\n\n### Response:\n")])
def test_the_ollama_template_is_the_run_s_chat_template(template, before, after):
    """Rebuilt from its pieces, the Modelfile's one-turn prompt is what the run's chat template renders."""
    from transformers import GenerationConfig

    from qlora.data import CHAT_TEMPLATES, alpaca_chat_template
    from qlora.demo import build_demo_tokenizer
    from qlora.export.modelfile import chat_pieces, modelfile

    tokenizer = build_demo_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"] if template == "chatml" else alpaca_chat_template(bos=False)
    pieces = chat_pieces(tokenizer)
    asked = [{"role": "user", "content": "Where does a duck live?"}]
    assert (pieces.before_user + "Where does a duck live?" + pieces.after_user + pieces.generation
            == tokenizer.apply_chat_template(asked, tokenize=False, add_generation_prompt=True))
    assert pieces.before_user.startswith(before) and (pieces.after_user + pieces.generation).endswith(after)
    answered = tokenizer.apply_chat_template([*asked, {"role": "assistant", "content": "In a pond."}], tokenize=False)
    assert answered.endswith("In a pond." + pieces.after_answer)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if template == "chatml" else tokenizer.eos_token_id
    text = modelfile("m-q4_k_m.gguf", tokenizer, GenerationConfig(eos_token_id=[eos], do_sample=True, temperature=0.7))
    lines = text.splitlines()
    assert lines[1] == "FROM ./m-q4_k_m.gguf" and lines[2].startswith('TEMPLATE """{{- range .Messages }}')
    assert f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(eos)}"' in lines and "PARAMETER temperature 0.7" in lines
