"""Training data: read records, render prompts, tokenize with a loss mask, split, batch.

Loss masking is computed on token ids: the prompt and the response are tokenized separately and
concatenated, so the boundary is exact for any tokenizer (no searching the text for a response marker).
The EOS token after each response is always trained, so the model learns to stop. Padding is masked by
position, not by token id, so a pad token equal to EOS is harmless.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from qlora.config import DataConfig, DataFormat
from qlora.errors import QloraError

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt for an instruction (and optional input), ending where the response starts."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def render_prompt(fmt: DataFormat, text: str) -> str:
    """What the model is given for a user-supplied sample prompt in this data format."""
    return alpaca_prompt(text) if fmt == DataFormat.alpaca else text


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class DataStats:
    records: int
    kept: int
    truncated: int
    dropped: int


def read_records(cfg: DataConfig) -> list[dict]:
    """All records of the configured file or hub dataset, as dicts."""
    path = Path(cfg.path).expanduser()
    if path.suffix in (".json", ".jsonl"):
        return _read_json(path)
    from datasets import load_dataset

    builder = {".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
    try:
        if builder:
            dataset = load_dataset(builder, data_files=str(path), split="train")
        else:
            dataset = load_dataset(cfg.path, split=cfg.split)
    except Exception as e:  # datasets raises many types; the cause is what the user needs
        raise QloraError(f"data.path {cfg.path}: could not load ({type(e).__name__}: {e}); "
                         "check the path, or the hub id and your network") from e
    return [dict(row) for row in dataset]


def _read_json(path: Path) -> list[dict]:
    if not path.is_file():
        raise QloraError(f"data.path {path} does not exist; give a json/jsonl/csv/parquet file or a hub dataset id")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise QloraError(f"{path}: invalid JSON at line {e.lineno} ({e.msg}); fix the file") from e
        if not isinstance(records, list):
            raise QloraError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise QloraError(f"{path}: line {lineno} is not valid JSON ({e.msg}); fix or remove that row") from e
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise QloraError(f"{path}: record {i} is a {type(record).__name__}, expected an object with fields")
    return records


def encode(
    records: list[dict], cfg: DataConfig, tokenizer, seq_len: int, source: str
) -> tuple[list[Example], DataStats]:
    """Tokenize records into examples with labels (IGNORE_INDEX where no loss is taken)."""
    if cfg.format == DataFormat.alpaca:
        prompts, responses = [], []
        for i, r in enumerate(records):
            for key in ("instruction", "output"):
                if not isinstance(r.get(key), str) or not r[key].strip():
                    raise QloraError(f"{source}: record {i} has no '{key}' text; every alpaca record needs "
                                     "instruction and output (input is optional)")
            prompts.append(alpaca_prompt(r["instruction"], r.get("input") or ""))
            responses.append(r["output"])
    else:
        for i, r in enumerate(records):
            if not isinstance(r.get(cfg.text_field), str) or not r[cfg.text_field].strip():
                raise QloraError(f"{source}: record {i} has no '{cfg.text_field}' text; set data.text_field "
                                 "to the column holding the text")
        prompts = [""] * len(records)
        responses = [r[cfg.text_field] for r in records]

    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    examples, truncated, dropped = [], 0, 0
    for p, r in zip(prompt_ids, response_ids, strict=True):
        ids = p + r + [eos]
        labels = (list(ids) if cfg.train_on_prompt else [IGNORE_INDEX] * len(p) + r + [eos])
        if cfg.format == DataFormat.text and len(ids) > seq_len:
            # Continued pretraining: long documents become several windows, nothing is thrown away.
            for start in range(0, len(ids), seq_len):
                examples.append(Example(ids[start:start + seq_len], labels[start:start + seq_len]))
            continue
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated += 1
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1  # the prompt alone fills seq_len: nothing left to learn from
            continue
        examples.append(Example(ids, labels))
    stats = DataStats(records=len(records), kept=len(records) - dropped, truncated=truncated, dropped=dropped)
    if not examples:
        raise QloraError(f"{source}: no trainable examples (all {len(records)} prompts are longer than "
                         f"train.seq_len={seq_len}); raise train.seq_len")
    return examples, stats


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle, then the first eval_fraction (at least one example when > 0) held out."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(examples))) if eval_fraction > 0 else 0
    if n_eval >= len(examples):
        raise QloraError(f"data.eval_fraction={eval_fraction} leaves no training data from {len(examples)} "
                         "examples; lower it")
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


class Collator:
    """Right-pads a list of examples into tensors; padding is masked out of attention and loss."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[Example]) -> dict:
        import torch

        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            labels[row, :n] = torch.tensor(e.labels)
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
