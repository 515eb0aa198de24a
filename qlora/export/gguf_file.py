"""One GGUF file from a merged Hugging Face model folder, for llama.cpp and the runtimes built on it.

The file holds the model's shape and tokenizer as metadata under llama.cpp's key names, and its weights under
llama.cpp's tensor names (taken from the `gguf` package's TensorNameMap) in the requested storage type.
Architectures: Llama and Mistral (GGUF architecture "llama") and Qwen2 ("qwen2"). Tokenizers: byte-level BPE
(tokenizer.ggml.model "gpt2") and SentencePiece-style BPE with byte fallback ("llama").
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import TokenType

from qlora.errors import QloraError
from qlora.export.gguf_types import FILE_TYPES, GGUF_TYPES, describe, encode, tensor_type
from qlora.files import fsync_dir

log = logging.getLogger(__name__)

# Hugging Face model_type -> GGUF architecture. Mistral's weights and maths are Llama's; llama.cpp runs it as one.
_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}

# Pre-tokenizer split regexes llama.cpp has built in, as they appear in the models' tokenizer.json, keyed by the
# tokenizer.ggml.pre name llama.cpp knows them by. They differ only in how digits are grouped.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


@dataclass
class _Vocab:
    """The tokenizer as llama.cpp stores it."""

    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None  # SentencePiece-style only
    add_space_prefix: bool | None  # SentencePiece-style only


@dataclass
class _Tensor:
    """One tensor of the output: where it comes from, and how it is stored."""

    name: str  # GGUF name
    shape: tuple[int, ...]
    qtype: QType
    source: str | None = None  # name in the safetensors shards; None for a tensor computed here
    shard: Path | None = None
    heads: int | None = None  # set on q/k projections that get llama.cpp's rotary row order

    @property
    def nbytes(self) -> int:
        block, block_bytes = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * block_bytes


def write_gguf(hf_dir: Path, out_file: Path, file_type: str, *, name: str | None = None,
               importance: dict[str, torch.Tensor] | None = None) -> dict[str, QType]:
    """Convert a merged, unquantized Hugging Face model folder into one GGUF file for llama.cpp-family runtimes.

    The folder is what `save_pretrained` writes: config.json, safetensors weights (one file or shards with
    model.safetensors.index.json) and the tokenizer (tokenizer.json, tokenizer_config.json). `file_type` is one
    of GGUF_TYPES, and each tensor gets the type llama.cpp's mix for it gives (qlora.export.gguf_types). `name`
    becomes general.name (default: the folder's name). `importance` maps a checkpoint weight's name to its
    importance matrix (one weight per column), which the K-quants round by.

    Returns the storage type of each checkpoint tensor written, by its checkpoint name.

    Tensors are read and written one at a time, so memory is about three times the largest tensor (usually the
    embedding: ~2 GB in bf16 for a 70B Llama 3), never the whole model. The file appears at `out_file` only when
    complete; on any error nothing is left behind.

    Raises:
        QloraError: unknown file_type, an architecture or tokenizer GGUF cannot hold, or a checkpoint tensor
            with no GGUF name.
    """
    if file_type not in FILE_TYPES:
        raise QloraError(f"unknown GGUF type {file_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    hf_dir, out_file = Path(hf_dir), Path(out_file)
    config = _read_config(hf_dir)
    arch = _ARCHS[config.model_type]
    tensors = _plan_tensors(hf_dir, config, arch, file_type)
    importance = importance or {}
    vocab, tokenizer = _read_vocab(hf_dir, config.vocab_size)

    # header, metadata and tensor table first, then the data tensor by tensor (GGUFWriter's streaming mode)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    _add_model_metadata(writer, config, name or hf_dir.name, FILE_TYPES[file_type][1])
    _add_tokenizer_metadata(writer, vocab, tokenizer)
    for tensor in tensors:
        # the dtype argument is unused when raw_dtype is given; the shape is the unquantized one
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.qtype)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, staging_name = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".tmp", dir=out_file.parent)
    os.close(fd)
    staging = Path(staging_name)
    try:
        writer.write_header_to_file(staging)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with ExitStack() as stack:
            shards: dict[Path, object] = {}
            for tensor in tensors:
                data = _source_data(tensor, config, shards, stack)
                writer.write_tensor_data(encode(data, tensor.qtype, importance.get(tensor.source)))
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(staging, out_file)
    except BaseException:
        writer.close()
        staging.unlink(missing_ok=True)
        raise
    fsync_dir(out_file.parent)
    log.info("wrote %s: %s (%s), %.1f MB", out_file, file_type, describe([t.qtype for t in tensors]),
             out_file.stat().st_size / 1e6)
    return {t.source: t.qtype for t in tensors if t.source is not None}


def load_gguf_model(gguf_path: Path, dtype: torch.dtype = torch.float32):
    """The model and tokenizer transformers reads back from the GGUF file, for checking an export.

    Returns `(model, tokenizer)`: AutoModelForCausalLM in eval mode, with weights dequantized to `dtype`, and
    the AutoTokenizer transformers builds from the file's tokenizer metadata.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype)
    return model.eval(), tokenizer


def _read_config(hf_dir: Path):
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise QloraError(f"{hf_dir} has no config.json; GGUF export needs a Hugging Face model folder")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in _ARCHS:
        raise QloraError(
            f"GGUF export does not support model_type {model_type!r} (supported: {', '.join(_ARCHS)}); "
            "set export.format=hf to export a Hugging Face folder instead"
        )
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(hf_dir)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config) -> tuple[float, dict]:
    """rope_theta and the rope parameters, from transformers 5's rope_parameters or the older top-level keys."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise QloraError("config.json states no rope_theta; GGUF export needs it for rope.freq_base")
    params.setdefault("rope_type", params.get("type", "default"))
    return float(theta), params


def _add_model_metadata(writer: gguf.GGUFWriter, config, name: str, file_type: gguf.LlamaFileType) -> None:
    head_dim = _head_dim(config)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    # llama.cpp assumes hidden_size / heads unless told; models like Mistral Nemo have a wider head
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta, rope = _rope(config)
    writer.add_rope_freq_base(theta)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        original = rope.get("original_max_position_embeddings")
        if original:
            writer.add_rope_scaling_orig_ctx_len(original)
    # "llama3" scaling travels as the rope_freqs tensor (see _plan_tensors); "default" needs nothing


def _read_vocab(hf_dir: Path, vocab_size: int):
    """The tokenizer in llama.cpp's layout, and the transformers tokenizer it came from."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {"model": {"type": type(tokenizer).__name__}}
    model = spec["model"]
    parts = _component_types(spec.get("pre_tokenizer")) | _component_types(spec.get("decoder"))
    byte_level = "ByteLevel" in parts
    sentencepiece = not byte_level and (model.get("byte_fallback") or "Metaspace" in parts
                                        or "▁" in json.dumps(spec.get("normalizer"), ensure_ascii=False))
    if model["type"] != "BPE" or not model.get("merges") or not (byte_level or sentencepiece):
        kind = model["type"] if model["type"] != "BPE" else "BPE" + (" without merges" if byte_level or sentencepiece
                                                                       else " neither byte-level nor SentencePiece")
        raise QloraError(
            f"GGUF needs a BPE tokenizer with merges (byte-level, or SentencePiece-style), and this one is {kind}; "
            "set export.format=hf to export a Hugging Face folder instead"
        )

    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    # An added token past the embedding can never have reached the model (transformers' Qwen2Tokenizer adds
    # <|endoftext|> to any vocabulary, for one), and llama.cpp needs exactly one token per embedding row.
    beyond = [a["content"] for i, a in added.items() if i >= vocab_size]
    if beyond:
        log.warning("GGUF export: leaving out added token(s) %s, whose ids are past the model's %d embedding rows",
                    ", ".join(beyond), vocab_size)
        added = {i: a for i, a in added.items() if i < vocab_size}
    if max(model["vocab"].values()) >= vocab_size:
        raise QloraError(
            f"the tokenizer has ids up to {max(model['vocab'].values())} but the model embeds only {vocab_size} "
            "tokens; resize the model's embeddings to the tokenizer (model.resize_token_embeddings) first"
        )
    id_to_token = {i: t for t, i in model["vocab"].items()} | {i: a["content"] for i, a in added.items()}
    # transformers' LlamaTokenizer leaves the BPE model's unk_token unset; the tokenizer itself knows it
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else model["vocab"].get(model.get("unk_token"))
    tokens, types = [], []
    for i in range(vocab_size):
        if sentencepiece and i == unk and i in id_to_token:  # SentencePiece marks it apart from control tokens
            tokens.append(id_to_token[i])
            types.append(TokenType.UNKNOWN)
        elif i in added:
            tokens.append(added[i]["content"])
            types.append(TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED)
        elif i in id_to_token:
            token = id_to_token[i]
            tokens.append(token)
            if sentencepiece and _BYTE_TOKEN.fullmatch(token):
                types.append(TokenType.BYTE)
            else:
                types.append(TokenType.NORMAL)
        else:  # embedding rows past the tokenizer (padded vocabularies): llama.cpp wants a name for each
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    if len(set(tokens)) != len(tokens):
        seen: set[str] = set()
        twice = next(t for t in tokens if t in seen or seen.add(t))
        raise QloraError(f"the tokenizer spells two ids as {twice!r}; llama.cpp needs every token spelled once")

    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if sentencepiece:
        return _Vocab("llama", "default", tokens, types, merges, _merge_scores(tokens, merges),
                      _adds_space_prefix(spec)), tokenizer
    return _Vocab("gpt2", _pre_tokenizer_name(spec.get("pre_tokenizer")), tokens, types, merges, None, None), tokenizer


def _component_types(node) -> set[str]:
    """Every component `type` in a tokenizer.json section, looking inside Sequence components."""
    if isinstance(node, dict):
        return ({node["type"]} if "type" in node else set()).union(*map(_component_types, node.values()))
    if isinstance(node, list):
        return set().union(*map(_component_types, node))
    return set()


def _pre_tokenizer_name(pre: dict | None) -> str:
    """The tokenizer.ggml.pre llama.cpp splits text with: recognised from the split regex, else "default"."""
    parts = [pre] if pre is None or pre.get("type") != "Sequence" else pre["pretokenizers"]
    for part in parts:
        if part and part.get("type") == "Split" and part.get("pattern", {}).get("Regex") in _SPLIT_NAMES:
            return _SPLIT_NAMES[part["pattern"]["Regex"]]
    if len(parts) == 1 and parts[0] and parts[0].get("type") == "ByteLevel" and parts[0].get("use_regex", True):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    log.warning(
        "GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp has built in (Llama 3, Qwen2, GPT-2); "
        "writing tokenizer.ggml.pre=default, so llama.cpp may split some text differently from transformers"
    )
    return "default"


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores for llama.cpp, which merges the highest-scoring pair first: minus the rank of the
    merge that makes each token (0 for tokens no merge makes: characters, bytes, special tokens)."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    return [-float(rank.get(token, 0)) for token in tokens]


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (Metaspace prepend, or a normalizer Prepend)."""
    pre = json.dumps(spec.get("pre_tokenizer"))
    normalizer = json.dumps(spec.get("normalizer"), ensure_ascii=False)
    return '"prepend_scheme": "always"' in pre or '"prepend_scheme": "first"' in pre or '"Prepend"' in normalizer


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, vocab: _Vocab, tokenizer) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None and token_id < len(vocab.tokens):  # one left out above has no id here
            add(token_id)
    # what the tokenizer does, not what its config claims: its post-processor decides
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    added = len(full) - len(plain)
    writer.add_add_bos_token(added > 0 and full[0] == tokenizer.bos_token_id and full[1:1 + len(plain)] == plain)
    writer.add_add_eos_token(added > 0 and full[-1] == tokenizer.eos_token_id and full[-1 - len(plain):-1] == plain)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)


def _shards(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return [hf_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    shards = sorted(hf_dir.glob("*.safetensors"))
    if not shards:
        raise QloraError(f"{hf_dir} has no *.safetensors weights; GGUF export reads what save_pretrained writes")
    return shards


def _plan_tensors(hf_dir: Path, config, arch: gguf.MODEL_ARCH, file_type: str) -> list[_Tensor]:
    """Every output tensor with its GGUF name, shape and storage type, read from the shard headers only."""
    from safetensors import safe_open

    gguf_name = _name_map(config, arch)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads = {gguf.MODEL_TENSOR.ATTN_Q: config.num_attention_heads,
             gguf.MODEL_TENSOR.ATTN_K: config.num_key_value_heads or config.num_attention_heads}
    tensors, unknown = [], []
    for shard in _shards(hf_dir):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                found = gguf_name(key)
                if found is _UNKNOWN:
                    unknown.append(key)
                    continue
                if found is None:
                    continue
                kind, name = found
                shape = tuple(f.get_slice(key).get_shape())
                qtype = tensor_type(file_type, name, shape, config.num_hidden_layers, tied)
                tensors.append(_Tensor(name, shape, qtype, key, shard,
                                       heads.get(kind) if arch == gguf.MODEL_ARCH.LLAMA else None))
    if unknown:
        raise QloraError(
            f"checkpoint tensor(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} have no GGUF name "
            f"for model_type {config.model_type}; set export.format=hf to export a Hugging Face folder instead"
        )
    if not tied and not any(t.name == "output.weight" for t in tensors):
        raise QloraError(f"{hf_dir} has no lm_head.weight and config.json says the embeddings are not tied")
    _, rope = _rope(config)
    if rope["rope_type"] == "llama3":
        tensors.append(_Tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                               (_head_dim(config) // 2,), QType.F32))
    elif rope["rope_type"] not in ("default", "linear", "yarn"):
        raise QloraError(
            f"rope type {rope['rope_type']!r} has no GGUF export here (supported: default, linear, yarn, llama3); "
            "set export.format=hf to export a Hugging Face folder instead"
        )
    return sorted(tensors, key=_file_order)


_UNKNOWN = object()


def _name_map(config, arch: gguf.MODEL_ARCH):
    """checkpoint name -> (tensor kind, GGUF name); None for a tensor the file leaves out, _UNKNOWN for one
    GGUF has no name for."""
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    skipped = set(gguf.MODEL_TENSOR_SKIP.get(arch, []))
    tied = bool(getattr(config, "tie_word_embeddings", False))

    def gguf_name(key: str):
        # rotary tables some old checkpoints carry are recomputed by every runtime
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            return None
        found = names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            return _UNKNOWN
        return None if found[0] in skipped else found

    return gguf_name


def stored_types(gguf_path: Path, hf_dir: Path) -> dict[str, QType]:
    """The storage type of each checkpoint tensor of `hf_dir` in the GGUF file at `gguf_path`, read from the file
    itself and keyed by the checkpoint's name; a tied lm_head.weight gets its embedding's type. Tensors the file
    does not hold are left out."""
    from safetensors import safe_open

    config = _read_config(hf_dir)
    gguf_name = _name_map(config, _ARCHS[config.model_type])
    in_file = {t.name: QType(t.tensor_type) for t in gguf.GGUFReader(gguf_path).tensors}

    types = {}
    for shard in _shards(hf_dir):
        with safe_open(shard, framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            found = gguf_name(key)
            if isinstance(found, tuple) and found[1] in in_file:
                types[key] = in_file[found[1]]
    if getattr(config, "tie_word_embeddings", False) and "model.embed_tokens.weight" in types:
        types["lm_head.weight"] = types["model.embed_tokens.weight"]
    return types


def _file_order(tensor: _Tensor) -> tuple[int, str]:
    """Global tensors first, then block by block in numeric order (blk.2 before blk.10)."""
    match = re.match(r"blk\.(\d+)\.", tensor.name)
    return (int(match.group(1)) if match else -1, tensor.name)


def _source_data(tensor: _Tensor, config, shards: dict, stack: ExitStack) -> torch.Tensor:
    """The tensor's values in the layout llama.cpp expects, before conversion to its storage type."""
    if tensor.source is None:
        return _llama3_rope_freqs(config)
    if tensor.shard not in shards:
        from safetensors import safe_open

        shards[tensor.shard] = stack.enter_context(safe_open(tensor.shard, framework="pt"))
    data = shards[tensor.shard].get_tensor(tensor.source)
    if tensor.heads is not None:
        data = _interleave_rotary_halves(data, tensor.heads)
    return data


def _interleave_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from transformers' rotary layout to llama.cpp's.

    Within each head transformers rotates dimension i with i + head_dim/2 (rotate_half); llama.cpp rotates 2i
    with 2i + 1. So row i of each half-head pair moves to row 2i, and row i + head_dim/2 to row 2i + 1.
    """
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(heads, 2, rows // heads // 2, *rest).transpose(1, 2).reshape(weight.shape)


def _llama3_rope_freqs(config) -> torch.Tensor:
    """Llama 3.1-style rope scaling as llama.cpp takes it: per-frequency divisors of the unscaled rotation."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, _ = _rope(config)
    dim = _head_dim(config)
    unscaled = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (unscaled / scaled.to(torch.float64)).to(torch.float32)
