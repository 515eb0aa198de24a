"""GGUF storage types: which type each tensor of a file gets, and the bytes of a tensor in that type.

`export.gguf_type` names a file type as llama.cpp's `llama-quantize` does. The float types and q8_0 store every
weight matrix in that one type. The 4- and 5-bit types are mixes, with llama.cpp's per-tensor choices:

- the output head (or, with tied embeddings, the token embedding that serves as it) is kept at 6 bits (Q6_K),
  or Q8_0 where its rows are not a multiple of 256 long; in the q4_0 / q4_1 / q5_0 / q5_1 files it is always
  Q8_0, since the `gguf` package, which quantizes those types, has no Q6_K (llama-quantize would write Q6_K);
- q4_k_m and q5_k_m give Q6_K to attn_v and ffn_down in the first and last eighth of the layers and every third
  layer between (llama.cpp's `use_more_bits`); q4_k_s gives Q5_K to attn_v in the first 4 layers and to ffn_down
  in the first eighth;
- a K-quant needs rows that are a multiple of 256 long; other rows fall back as llama.cpp's do (Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0), and rows no 32-block divides are stored as f16. Vectors (norms, biases) stay f32.

Quantizers: the `gguf` package for Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1; auto-round's GGUF packer (the optional
`quantize` extra) for the K-quants, which takes an importance matrix (llama.cpp's imatrix: the mean squared
input of each weight column over calibration text) and weighs each column's rounding error by it.
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType

from qlora.errors import QloraError

# export.gguf_type -> (the type of most weight matrices, general.file_type)
FILE_TYPES = {
    "f32": (QType.F32, LlamaFileType.ALL_F32),
    "f16": (QType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (QType.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (QType.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (QType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (QType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q6_k": (QType.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "q5_k_m": (QType.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q5_k_s": (QType.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    "q4_k_m": (QType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q4_k_s": (QType.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
}
GGUF_TYPES = tuple(FILE_TYPES)
K_QUANT_TYPES = ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s")
"""The file types that need auto-round (pip install 'qlora[quantize]')."""

_FLOATS = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}
_GGUF_PACKAGE = (QType.Q8_0, QType.Q5_1, QType.Q5_0, QType.Q4_1, QType.Q4_0)
_AUTO_ROUND = {QType.Q6_K: "q6_k", QType.Q5_K: "q5_k", QType.Q4_K: "q4_k"}
_K_FALLBACK = {QType.Q4_K: QType.Q5_0, QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0}
_ROWS_PER_CHUNK = 4096  # bounds the float32 copy quantization needs to a few hundred MB
_LAYER = re.compile(r"blk\.(\d+)\.")


def has_k_quants() -> bool:
    """Whether auto-round, which packs the K-quants, is installed."""
    return importlib.util.find_spec("auto_round") is not None


def tensor_type(file_type: str, name: str, shape: tuple[int, ...], layers: int, tied: bool) -> QType:
    """The storage type of GGUF tensor `name` (of `shape`, in torch's order) in a file of `file_type`, for a model
    of `layers` blocks; `tied`: the token embedding is also the output head."""
    if len(shape) < 2:
        return QType.F32
    base, _ = FILE_TYPES[file_type]
    if base in _FLOATS:
        return base
    cols = shape[-1]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        # llama.cpp: Q8_0 where the file's own type cannot hold the row, else 6 bits unless the file is 8-bit
        if cols % gguf.GGML_QUANT_SIZES[base][0] or base == QType.Q8_0 or base in _GGUF_PACKAGE:
            return _fitting(QType.Q8_0, cols)
        return _fitting(QType.Q6_K, cols)
    chosen = base
    match = _LAYER.match(name)
    layer = int(match.group(1)) if match else 0
    if name.endswith(("attn_v.weight", "ffn_down.weight")):
        if file_type in ("q4_k_m", "q5_k_m") and _more_bits(layer, layers):
            chosen = QType.Q6_K
        elif file_type == "q4_k_s" and (layer < 4 if "attn_v" in name else layer < layers // 8):
            chosen = QType.Q5_K
    return _fitting(chosen, cols)


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _fitting(qtype: QType, cols: int) -> QType:
    """`qtype`, or llama.cpp's fallback where rows of `cols` values do not fill its blocks."""
    if cols % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = _K_FALLBACK.get(qtype, QType.F16)
        if cols % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = QType.F16
    return qtype


def describe(types: list[QType]) -> str:
    """How many tensors of each type, most first: '182 Q5_0, 61 F32, 18 Q6_K'."""
    return ", ".join(f"{n} {t.name}" for t, n in Counter(types).most_common())


def encode(data: torch.Tensor, qtype: QType, importance: torch.Tensor | None = None) -> np.ndarray:
    """The bytes of `data` in storage type `qtype`, as the array GGUFWriter writes. `importance` (one weight per
    column) steers the K-quants' rounding; the other types take none."""
    if qtype in _FLOATS:
        cast = data.to(_FLOATS[qtype])
        # numpy has no bfloat16: its (round-to-nearest-even) bits travel as int16
        return cast.view(torch.int16).numpy() if qtype == QType.BF16 else cast.numpy()
    rows = data.reshape(-1, data.shape[-1])
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(rows.shape, qtype), dtype=np.uint8)
    for start in range(0, rows.shape[0], _ROWS_PER_CHUNK):
        chunk = rows[start:start + _ROWS_PER_CHUNK]
        out[start:start + _ROWS_PER_CHUNK] = _quantize(chunk, qtype, importance)
    return out.reshape(*data.shape[:-1], out.shape[-1])


def _quantize(rows: torch.Tensor, qtype: QType, importance: torch.Tensor | None) -> np.ndarray:
    if qtype in _GGUF_PACKAGE:
        return gguf.quants.quantize(rows.to(torch.float32).numpy(), qtype)
    if qtype not in _AUTO_ROUND:
        raise QloraError(f"GGUF tensor type {qtype.name} is not one this export writes")
    if not has_k_quants():
        raise QloraError(f"GGUF type {qtype.name} is packed by auto-round, which is not installed; "
                         "pip install 'qlora[quantize]'")
    from auto_round.export.export_to_gguf.packing import ggml_quant

    # auto-round rounds its float32 input in place: hand it a copy
    weights = None if importance is None else importance.to(torch.float32)
    return np.asarray(ggml_quant(rows.to(torch.float32, copy=True), _AUTO_ROUND[qtype], imatrix=weights,
                                 device="cpu"))


def stored_values(data: torch.Tensor, qtype: QType, importance: torch.Tensor | None = None) -> torch.Tensor:
    """`data` as a reader gets it back, in float32, from a GGUF tensor of type `qtype` written by `encode`.

    Blocks run along rows, so rounding rows in the checkpoint's order equals rounding them in llama.cpp's
    permuted q/k order and permuting back."""
    if qtype in _FLOATS:
        return data.to(_FLOATS[qtype]).to(torch.float32)
    rows = data.reshape(-1, data.shape[-1])
    out = torch.empty(rows.shape, dtype=torch.float32)
    for start in range(0, rows.shape[0], _ROWS_PER_CHUNK):
        packed = _quantize(rows[start:start + _ROWS_PER_CHUNK], qtype, importance)
        out[start:start + _ROWS_PER_CHUNK] = torch.from_numpy(gguf.quants.dequantize(packed, qtype))
    return out.reshape(data.shape)


def bytes_per_weight(file_type: str) -> float:
    """At most what a file of `file_type` stores per weight (a mix's fallbacks reach Q8_0's 34 bytes per 32)."""
    base, _ = FILE_TYPES[file_type]
    if base in _FLOATS:
        return float(_FLOATS[base].itemsize)
    return 34 / 32
