"""GGUF export: tiny Llama / Qwen2 folders written as GGUF and read back by transformers' GGUF loader.

Read-back is the reference for layout (transformers undoes llama.cpp's q/k row order on load), so exact logits
at f32, and at f16 / bf16 / q8_0 exact logits against the HF model whose weights went through the same rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from qlora.config import ScratchArchitecture, ScratchModelConfig, ScratchTokenizer
from qlora.data import CHAT_TEMPLATES
from qlora.demo import build_demo_tokenizer, demo_records, ensure_scratch_model, write_demo_dataset
from qlora.errors import QloraError
from qlora.export import gguf_file, gguf_types
from qlora.export.gguf_file import load_gguf_model, write_gguf
from qlora.export.gguf_types import GGUF_TYPES, stored_values

pytestmark = pytest.mark.slow  # every test exports tiny models to GGUF and loads them back

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
TEXTS = [
    "<|im_start|>user\nWhat sound does a cow make?<|im_end|>\n<|im_start|>assistant\n",
    "A duck lives in a pond. 12345 apples,  two  spaces\n\nand lines",
    "café, naïve, 東京 and ü",
]
MESSAGES = [{"role": "user", "content": "Where does a duck live?"}, {"role": "assistant", "content": "In a pond."}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """HF folders: scratch llama, qwen2 and mistral (untied, one file), and a tied qwen2 saved in shards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    root = tmp_path_factory.mktemp("gguf-models")
    corpus = root / "corpus.jsonl"
    write_demo_dataset(corpus)
    out = {}
    # not plain "mistral": transformers reads a GGUF whose general.name is exactly that as an architecture
    # gguf-py does not have, and fails
    for arch, folder in (("llama", "llama"), ("qwen2", "qwen2"), ("mistral", "mistral-tiny")):
        out[arch] = root / folder
        ensure_scratch_model(out[arch], ScratchModelConfig(
            path=str(out[arch]), architecture=ScratchArchitecture(arch), tokenizer=ScratchTokenizer.bpe,
            tokenizer_corpus=str(corpus), tokenizer_vocab_size=400, **SHAPE))
    # a row length of 112 is no multiple of 32: q8_0 must keep ffn_down in f16
    config = Qwen2Config(**SHAPE | {"intermediate_size": 112}, vocab_size=400, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(config)
    out["tied"] = root / "qwen2-tied"
    model.save_pretrained(out["tied"], max_shard_size="100KB")
    AutoTokenizer.from_pretrained(out["qwen2"]).save_pretrained(out["tied"])
    assert (out["tied"] / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture(scope="module")
def exported(folders, tmp_path_factory):
    """`exported(model, tensor_type)`: the GGUF file for that folder and type, written once per module."""
    root = tmp_path_factory.mktemp("gguf-out")
    done: dict[tuple[str, str], Path] = {}

    def export(model: str, tensor_type: str) -> Path:
        if (model, tensor_type) not in done:
            path = root / f"{model}-{tensor_type}.gguf"
            write_gguf(folders[model], path, tensor_type)
            done[model, tensor_type] = path
        return done[model, tensor_type]

    return export


def _hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _logits(model, vocab_size: int = 400) -> torch.Tensor:
    ids = torch.randint(0, vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def _round_matrices(model, tensor_type: str):
    """The model with each 2-D weight rounded as the GGUF stores it (vectors stay float32)."""
    for param in model.parameters():
        if param.ndim != 2:
            continue
        if tensor_type in ("f16", "bf16") or param.shape[-1] % 32:
            param.data = param.data.to(torch.float16 if tensor_type != "bf16" else torch.bfloat16).float()
        else:
            blocks = gguf.quants.quantize(param.data.numpy(), QType.Q8_0)
            param.data = torch.from_numpy(gguf.quants.dequantize(blocks, QType.Q8_0))
    return model


@pytest.mark.parametrize("model", ["llama", "qwen2", "mistral", "tied"])
def test_f32_logits_equal_the_hf_model(folders, exported, model):
    gguf_model, _ = load_gguf_model(exported(model, "f32"))
    torch.testing.assert_close(_logits(gguf_model), _logits(_hf_model(folders[model])), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tensor_type", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("model", ["llama", "qwen2", "tied"])
def test_lower_precision_logits_equal_the_rounded_hf_model(folders, exported, model, tensor_type):
    """Read back in float32, the file's weights are exactly the HF weights after the type's own rounding."""
    gguf_model, _ = load_gguf_model(exported(model, tensor_type))
    reference = _round_matrices(_hf_model(folders[model]), tensor_type)
    torch.testing.assert_close(_logits(gguf_model), _logits(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tensor_type, max_delta", [("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 3e-2)])
def test_lower_precision_logits_stay_close_to_the_original(folders, exported, tensor_type, max_delta):
    # measured max |dlogit|: f16 2.6e-4, bf16 2.0e-3, q8_0 7.3e-3 (logit std 0.16: random init, near-flat softmax)
    gguf_logits = _logits(load_gguf_model(exported("llama", tensor_type))[0])
    hf_logits = _logits(_hf_model(folders["llama"]))
    assert (gguf_logits - hf_logits).abs().max() < max_delta


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_q8_0_keeps_the_distribution(folders, exported, model):
    gguf_logits = _logits(load_gguf_model(exported(model, "q8_0"))[0])
    hf_logits = _logits(_hf_model(folders[model]))
    kl = torch.nn.functional.kl_div(gguf_logits.log_softmax(-1), hf_logits.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    assert kl.mean() < 1e-4  # measured 1.2e-6 on both
    # random-init logits have near ties; wherever the top two are clearly apart, the argmax must agree
    top2 = hf_logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * (gguf_logits - hf_logits).abs().max()
    agree = gguf_logits.argmax(-1) == hf_logits.argmax(-1)
    assert agree[clear].all() and agree.float().mean() >= 0.95


@pytest.mark.parametrize("model", ["llama", "qwen2", "mistral"])
def test_tokenizer_and_chat_template_survive(folders, exported, model):
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(folders[model])
    _, read_back = load_gguf_model(exported(model, "q8_0"))
    for text in TEXTS:
        assert read_back(text)["input_ids"] == original(text)["input_ids"], text
    assert read_back.chat_template == original.chat_template == CHAT_TEMPLATES["chatml"]
    assert (read_back.apply_chat_template(MESSAGES, tokenize=True)
            == original.apply_chat_template(MESSAGES, tokenize=True))
    assert (read_back.bos_token, read_back.eos_token, read_back.pad_token) == ("<s>", "</s>", "<pad>")


def _fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("tensor_type", GGUF_TYPES)
@pytest.mark.parametrize("model, arch, n_tensors", [("llama", "llama", 21), ("qwen2", "qwen2", 27),
                                                    ("tied", "qwen2", 26)])
def test_metadata(exported, model, arch, n_tensors, tensor_type):
    path = exported(model, tensor_type)
    fields, tensors = _fields(path)
    assert fields["general.architecture"] == arch
    assert fields["general.name"] == {"tied": "qwen2-tied"}.get(model, model)  # the folder's name
    # llama.h's llama_ftype numbers
    assert fields["general.file_type"] == {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
                                           "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
                                           "bf16": 32}[tensor_type]
    assert fields[f"{arch}.block_count"] == 2
    assert fields[f"{arch}.attention.head_count"] == 4
    assert fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields[f"{arch}.embedding_length"] == 64
    assert fields[f"{arch}.rope.dimension_count"] == 16
    assert fields[f"{arch}.rope.freq_base"] == 10000.0
    assert fields[f"{arch}.vocab_size"] == 400
    assert fields["tokenizer.ggml.model"] == "gpt2"
    # the scratch tokenizer splits with ByteLevel's GPT-2 regex; transformers' Qwen2Tokenizer swaps in Qwen2's
    assert fields["tokenizer.ggml.pre"] == {"llama": "gpt-2"}.get(model, "qwen2")
    assert len(fields["tokenizer.ggml.tokens"]) == 400
    assert fields["tokenizer.ggml.token_type"][:5] == [gguf.TokenType.CONTROL] * 5  # <s> </s> <pad> <|im_*|>
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATES["chatml"]
    assert fields["GGUF.tensor_count"] == len(tensors) == n_tensors
    assert ("output.weight" in tensors) == (model != "tied")
    # rows of 64 and 128 hold no 256-value K-quant block: llama.cpp's fallbacks (Q4_K -> Q5_0, Q5_K -> Q5_1,
    # Q6_K -> Q8_0); the output head is Q8_0 in every quantized file, and rows of 112 hold no 32-block: f16
    expected = {"f32": QType.F32, "f16": QType.F16, "bf16": QType.BF16, "q8_0": QType.Q8_0, "q5_1": QType.Q5_1,
                "q5_0": QType.Q5_0, "q4_1": QType.Q4_1, "q4_0": QType.Q4_0, "q6_k": QType.Q8_0, "q5_k_m": QType.Q5_1,
                "q5_k_s": QType.Q5_1, "q4_k_m": QType.Q5_0, "q4_k_s": QType.Q5_0}[tensor_type]
    quantized = expected not in (QType.F32, QType.F16, QType.BF16)
    for name, tensor in tensors.items():
        if len(tensor.shape) == 1:
            assert tensor.tensor_type == QType.F32, name
        elif model == "tied" and quantized and "ffn_down" in name:
            assert tensor.tensor_type == QType.F16, name
        elif quantized and (name == "output.weight" or (model == "tied" and name == "token_embd.weight")):
            assert tensor.tensor_type == QType.Q8_0, name
        elif tensor_type in ("q4_k_m", "q5_k_m") and name in ("blk.1.attn_v.weight", "blk.1.ffn_down.weight"):
            assert tensor.tensor_type == QType.Q8_0, name  # Q6_K in the last eighth of 2 layers, as Q8_0
        elif tensor_type == "q4_k_s" and name.endswith("attn_v.weight"):
            assert tensor.tensor_type == QType.Q5_1, name  # Q5_K in the first 4 layers, as Q5_1
        else:
            assert tensor.tensor_type == expected, name


@pytest.mark.parametrize("split, name", [(gguf_file._LLAMA3_SPLIT, "llama-bpe"), (gguf_file._QWEN2_SPLIT, "qwen2"),
                                         (r"\p{N}+|[^\p{N}]+", "default")])
def test_pre_tokenizer_is_named_from_its_split_regex(folders, tmp_path, caplog, split, name):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(folders["llama"], folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    write_gguf(folder, tmp_path / "m.gguf", "f16")
    assert _fields(tmp_path / "m.gguf")[0]["tokenizer.ggml.pre"] == name
    assert ("tokenizer.ggml.pre=default" in caplog.text) == (name == "default")


def test_given_name(folders, tmp_path):
    write_gguf(folders["llama"], tmp_path / "m.gguf", "f16", name="my-model")
    assert _fields(tmp_path / "m.gguf")[0]["general.name"] == "my-model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_llama_q_k_rows_are_in_llama_cpp_rotary_order(folders, exported):
    """llama.cpp rotates dims (2i, 2i+1) of a head; transformers rotates (i, i + d/2). Checked without
    transformers' GGUF loader, which undoes the reorder and so cannot tell a wrong one from a right one twice."""
    from safetensors.torch import load_file

    weights = load_file(folders["llama"] / "model.safetensors")
    _, tensors = _fields(exported("llama", "f32"))
    for proj, gguf_name, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):
        hf = weights[f"model.layers.1.self_attn.{proj}.weight"].numpy()
        written = np.asarray(tensors[f"blk.1.{gguf_name}.weight"].data)
        d = 16
        for h in range(heads):
            for i in range(d // 2):
                np.testing.assert_array_equal(written[h * d + 2 * i], hf[h * d + i])
                np.testing.assert_array_equal(written[h * d + 2 * i + 1], hf[h * d + i + d // 2])
    # Qwen2 keeps transformers' order
    qwen_hf = load_file(folders["qwen2"] / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(_fields(exported("qwen2", "f32"))[1]["blk.1.attn_q.weight"].data),
                                  qwen_hf)


def test_llama3_rope_scaling_becomes_rope_freqs(folders, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE, vocab_size=400, rope_parameters=rope))
    model.save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(folders["llama"]).save_pretrained(tmp_path / "hf")
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f16")
    fields, tensors = _fields(tmp_path / "m.gguf")
    factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data)).double()
    assert tensors["rope_freqs.weight"].tensor_type == QType.F32 and fields["llama.rope.freq_base"] == 500000.0
    # llama.cpp divides the unscaled frequencies by the factors; that must give transformers' llama3 frequencies
    unscaled = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    torch.testing.assert_close(unscaled / factors, model.model.rotary_emb.inv_freq.double(), rtol=1e-6, atol=0)
    assert factors[0] == 1.0 and factors[-1] == 8.0  # high frequencies untouched, the lowest scaled by factor


def _sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer: BPE over "▁"-spaced text with <0xXX> byte fallback tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    texts = [r["instruction"] + " " + r["output"] for r in demo_records()]
    trained = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=250, special_tokens=["<unk>", "<s>", "</s>"],
                                                           show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for token, _ in sorted(spec["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, chat_template=CHAT_TEMPLATES["chatml"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def test_sentencepiece_style_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = _sentencepiece_style_tokenizer()
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE, vocab_size=len(tokenizer)))
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", "q8_0")

    fields, _ = _fields(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    types, tokens = fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.tokens"]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert tokens[3 + 0x0A] == "<0x0A>" and set(types[3:259]) == {gguf.TokenType.BYTE}
    scores = fields["tokenizer.ggml.scores"]
    assert len(scores) == len(tokens) and scores[tokens.index("▁a")] > scores[tokens.index("▁does")]

    original = AutoTokenizer.from_pretrained(tmp_path / "hf")
    _, read_back = load_gguf_model(tmp_path / "m.gguf")
    for text in TEXTS:
        assert read_back(text)["input_ids"] == original(text)["input_ids"], text
    assert read_back.apply_chat_template(MESSAGES) == original.apply_chat_template(MESSAGES)


# -- what GGUF cannot hold: a one-line error, and nothing written --------------------------------------


def _tiny_llama(folder: Path, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE, vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_unsupported_architecture(folders, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=400)).save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(folders["llama"]).save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    with pytest.raises(QloraError, match=r"model_type 'gpt2'.*llama, mistral, qwen2.*export.format=hf"):
        write_gguf(tmp_path / "hf", out / "m.gguf", "f16")
    assert not out.exists() or not any(out.iterdir())


def test_word_level_tokenizer(tmp_path):
    folder = _tiny_llama(tmp_path / "hf", build_demo_tokenizer())
    out = tmp_path / "out"
    with pytest.raises(QloraError, match=r"BPE.*WordLevel.*export.format=hf"):
        write_gguf(folder, out / "m.gguf", "f16")
    assert not out.exists() or not any(out.iterdir())


def test_unknown_tensor_type(folders, tmp_path):
    with pytest.raises(QloraError, match="f32, f16, bf16, q8_0"):
        write_gguf(folders["llama"], tmp_path / "m.gguf", "q4_k")
    assert not any(tmp_path.iterdir())


def test_unknown_checkpoint_tensor(folders, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "hf"
    shutil.copytree(folders["llama"], folder)
    weights = load_file(folder / "model.safetensors")
    save_file(weights | {"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(QloraError, match=r"model\.layers\.0\.mlp\.extra_proj\.weight"):
        write_gguf(folder, tmp_path / "out" / "m.gguf", "f16")
    assert not (tmp_path / "out").exists()


def test_failure_mid_write_leaves_the_old_file(folders, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")
    calls = []

    def fail_on_third(data, qtype, importance=None):
        calls.append(qtype)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(data, qtype, importance)

    real = gguf_file.encode
    monkeypatch.setattr(gguf_file, "encode", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(folders["llama"], out, "q8_0")
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_q8_0_quantizes_in_row_chunks_without_changing_a_byte(folders, exported, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_types, "_ROWS_PER_CHUNK", 7)  # no tensor here has a multiple of 7 rows
    write_gguf(folders["llama"], tmp_path / "m.gguf", "q8_0")
    assert (tmp_path / "m.gguf").read_bytes() == exported("llama", "q8_0").read_bytes()


@pytest.mark.parametrize("tensor_type", GGUF_TYPES)
def test_stored_values_are_what_the_file_holds(folders, exported, tensor_type):
    """The rounding export verification applies to the HF tensors equals what the file holds, tensor by tensor,
    with the types read from the file and q/k rows put back in transformers' order."""
    from safetensors.torch import load_file

    path = exported("llama", tensor_type)
    types = gguf_file.stored_types(path, folders["llama"])
    weights = load_file(folders["llama"] / "model.safetensors")
    assert types.keys() == weights.keys()
    _, tensors = _fields(path)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for key, hf in weights.items():
        written = tensors[names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))[1]]
        assert types[key] == written.tensor_type, key
        data = torch.from_numpy(gguf.quants.dequantize(np.asarray(written.data), written.tensor_type).copy())
        data = data.reshape(hf.shape)
        heads = {"q_proj": 4, "k_proj": 2}.get(key.split(".")[-2])
        if heads:  # llama.cpp's rows (h, i, half) back to transformers' (h, half, i)
            data = data.reshape(heads, -1, 2, hf.shape[1]).transpose(1, 2).reshape(hf.shape)
        assert torch.equal(stored_values(hf, types[key]), data), key


def test_q8_0_rounding_commutes_with_the_rotary_row_order():
    """q8_0 blocks run along rows, so quantizing the permuted q/k rows equals permuting the quantized rows:
    verification may round the HF tensor in its own row order."""
    weight = torch.randn(4 * 16, 96, generator=torch.Generator().manual_seed(0))
    permuted = gguf_file._interleave_rotary_halves(weight, 4)
    blocks = torch.from_numpy(gguf.quants.quantize(weight.numpy(), QType.Q8_0))
    assert torch.equal(torch.from_numpy(gguf.quants.quantize(permuted.numpy(), QType.Q8_0)),
                       gguf_file._interleave_rotary_halves(blocks, 4))
    torch.testing.assert_close(stored_values(permuted, QType.Q8_0),
                               gguf_file._interleave_rotary_halves(stored_values(weight, QType.Q8_0), 4),
                               rtol=0, atol=0)
    assert not torch.equal(stored_values(weight, QType.Q8_0), weight)  # it does round
