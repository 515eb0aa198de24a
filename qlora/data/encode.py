"""Tokenizing rendered samples into (input_ids, labels), validating them, and caching the result.

Every record either becomes a training sample or is reported: a missing or empty field, a conversation
without an assistant turn, a response that tokenizes to nothing, or (with data.overlong=error) a sample
longer than train.seq_len stops the run with the file and row named. Truncated and dropped samples are counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qlora.config import DataConfig, DataFormat, OnInvalid, Overlong
from qlora.data.formats import RecordError, render, render_pair
from qlora.data.records import Source, fingerprint, read_source
from qlora.errors import QloraError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ENCODING_VERSION = "4"  # bump when the encoding below changes, so cached tokens are never reused across versions


@dataclass
class Example:
    """One tokenized sample; labels are IGNORE_INDEX where no loss is taken."""

    input_ids: np.ndarray
    labels: np.ndarray
    record: int
    """Index of the record it came from (text documents may give several examples)."""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    """What became of a data file's records."""

    records: int
    kept: int
    """Records that gave at least one example."""
    skipped: int
    """Invalid records left out (data.on_invalid=skip)."""
    skipped_why: list[str]
    """Where and why, for each of them ('line 18: 'output' is empty')."""
    truncated: int
    """Samples cut to seq_len (data.overlong=truncate)."""
    dropped: int
    """Samples left out: longer than seq_len with data.overlong=drop, or whose prompt alone fills seq_len."""
    examples: int
    """Sequences produced (text documents longer than seq_len give several)."""
    tokens: int
    trained_tokens: int
    unknown_tokens: int
    """Tokens that are the tokenizer's unknown token (a wrong tokenizer for the data shows here)."""

    def describe(self, seq_len: int) -> str:
        skipped = f"{self.skipped} invalid skipped, " if self.skipped else ""
        share = self.trained_tokens / max(self.tokens, 1)
        return (f"{self.records} records -> {self.kept} kept, {skipped}{self.truncated} truncated to {seq_len} "
                f"tokens, {self.dropped} dropped (longer than seq_len); {self.examples} sequences, "
                f"{self.tokens:,} tokens, {self.trained_tokens:,} trained ({share:.0%})")


def encode_source(path: str, cfg: DataConfig, tokenizer, template: str | None, seq_len: int,
                  cache_dir: Path | None) -> tuple[list[Example], DataStats]:
    """The examples of the data at `path`, from the tokenization cache when an identical encoding is there."""
    if cache_dir is None:
        return encode(read_source(path, cfg.split), cfg, tokenizer, template, seq_len)
    key = cache_key(fingerprint(path, cfg.split), cfg, tokenizer, template, seq_len)
    folder = cache_dir / key
    if (folder / "stats.json").is_file():
        try:
            examples, stats = _load(folder)
            log.info("data %s: tokenized samples from cache %s", path, folder)
            return examples, check_invalid(path, stats, cfg)
        except Exception as e:  # unreadable or from an incompatible version: tokenize again and replace it
            if isinstance(e, QloraError):
                raise
            log.warning("tokenization cache %s is unreadable (%s: %s); tokenizing again", folder, type(e).__name__, e)
    examples, stats = encode(read_source(path, cfg.split), cfg, tokenizer, template, seq_len)
    _store(folder, examples, stats)
    return examples, stats


def check_invalid(path: str, stats: DataStats, cfg: DataConfig) -> DataStats:
    """`stats` when its invalid records may be left out; QloraError naming them when data.on_invalid=error, or when
    they are more than data.max_invalid_fraction of the file (a wrong format or column mapping, not a few bad
    records). Checked on cached encodings too: the cache key leaves these settings out."""
    _refuse_invalid(path, stats.skipped_why, stats.records, cfg)
    return stats


def _refuse_invalid(path: str, why: list[str], records: int, cfg: DataConfig) -> None:
    if not why:
        return
    share = len(why) / max(records, 1)
    if cfg.on_invalid == OnInvalid.skip and share <= cfg.max_invalid_fraction:
        return
    first, others = why[0], [w.split(":", 1)[0] for w in why[1:]]
    more = f" (and {len(others)} more: {', '.join(others[:5])}{', ...' if len(others) > 5 else ''})" if others else ""
    if cfg.on_invalid == OnInvalid.error:
        fix = "fix or remove those records, map field names with data.columns, or set data.on_invalid=skip"
    else:
        fix = (f"that is {share:.1%} of its records, more than data.max_invalid_fraction={cfg.max_invalid_fraction}; "
               "check data.format and data.columns, or raise data.max_invalid_fraction")
    raise QloraError(f"{path} {first}{more}; {fix}")


def encode(source: Source, cfg: DataConfig, tokenizer, template: str | None,
           seq_len: int) -> tuple[list[Example], DataStats]:
    """Tokenize every record of `source`; raises QloraError naming the bad rows if there are any."""
    if cfg.format == DataFormat.preference:
        return encode_pairs(source, cfg, tokenizer, template, seq_len)
    samples, problems = [], []
    for i, row in enumerate(source.rows):
        try:
            samples.append(render(row, cfg, tokenizer, template))
        except RecordError as e:
            problems.append((i, str(e)))
            samples.append([])

    # One tokenizer call for every segment of every sample: fast tokenizers batch this in Rust.
    texts = [text for segments in samples for text, _ in segments]
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    prefix = [] if cfg.format == DataFormat.chat else special_prefix(tokenizer)  # chat templates write their own
    eos = tokenizer.eos_token_id
    examples, overlong = [], []
    truncated = dropped = 0
    for i, segments in enumerate(samples):
        if not segments:
            continue  # invalid, reported below
        input_ids, trained = list(prefix), [cfg.train_on_prompt] * len(prefix)
        response, n_response = [], 0
        for _, is_response in segments:
            piece = next(ids)
            input_ids += piece
            trained += [is_response or cfg.train_on_prompt] * len(piece)
            if is_response:
                response, n_response = piece, n_response + len(piece)
        if n_response == 0:
            problems.append((i, "its response tokenizes to nothing, so no token would be trained"))
            continue
        if eos not in response:  # the template wrote no EOS after the last answer: the model must learn to stop
            input_ids.append(eos)
            trained.append(True)
        labels = [t if m else IGNORE_INDEX for t, m in zip(input_ids, trained, strict=True)]
        if cfg.format == DataFormat.text:
            # Continued pretraining: a long document becomes several windows; nothing is thrown away.
            for start in range(0, len(input_ids), seq_len):
                examples.append(_example(input_ids[start:start + seq_len], labels[start:start + seq_len], i))
            continue
        if len(input_ids) > seq_len:
            if cfg.overlong == Overlong.error:
                overlong.append((i, f"is {len(input_ids)} tokens, longer than train.seq_len={seq_len}"))
                continue
            if cfg.overlong == Overlong.drop or all(x == IGNORE_INDEX for x in labels[1:seq_len]):
                dropped += 1  # dropped by request, or the prompt alone fills seq_len
                continue
            input_ids, labels = input_ids[:seq_len], labels[:seq_len]
            truncated += 1
        examples.append(_example(input_ids, labels, i))
    return _checked(source, cfg, tokenizer, examples, problems, overlong, seq_len=seq_len, truncated=truncated,
                    dropped=dropped)


def encode_pairs(source: Source, cfg: DataConfig, tokenizer, template: str | None,
                 seq_len: int) -> tuple[list[Example], DataStats]:
    """Tokenize preference records into two examples each, chosen then rejected, sharing the prompt's tokens (the
    prompt is tokenized once); only the answers (and the EOS appended where an answer has none) are trained.

    A pair longer than seq_len keeps its whole prompt and cuts the answers (data.overlong=truncate), or is dropped or
    refused per data.overlong; a prompt that alone fills seq_len is an invalid record.
    """
    pairs, problems = [], []
    for i, row in enumerate(source.rows):
        try:
            pairs.append(render_pair(row, cfg, tokenizer, template))
        except RecordError as e:
            problems.append((i, str(e)))
            pairs.append(None)
    texts = [t for pair in pairs if pair is not None for t in (*pair.prompt, pair.chosen, pair.rejected)]
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    prefix, eos = special_prefix(tokenizer), tokenizer.eos_token_id
    examples, overlong = [], []
    truncated = dropped = 0
    for i, pair in enumerate(pairs):
        if pair is None:
            continue
        prompt = ([] if pair.templated else list(prefix)) + [t for _ in pair.prompt for t in next(ids)]
        answers = [next(ids), next(ids)]
        if not all(answers):
            problems.append((i, "an answer tokenizes to nothing, so it has no log-probability to compare"))
            continue
        answers = [a if eos in a else [*a, eos] for a in answers]
        longest = len(prompt) + max(len(a) for a in answers)
        if len(prompt) >= seq_len:
            problems.append((i, f"its prompt alone is {len(prompt)} tokens, filling train.seq_len={seq_len}, so no "
                                "answer token would be scored; raise train.seq_len or shorten the prompt"))
            continue
        if longest > seq_len:
            if cfg.overlong == Overlong.error:
                overlong.append((i, f"is {longest} tokens (prompt and longer answer), longer than "
                                    f"train.seq_len={seq_len}"))
                continue
            if cfg.overlong == Overlong.drop:
                dropped += 1
                continue
            answers = [a[:seq_len - len(prompt)] for a in answers]
            truncated += 1
        for answer in answers:
            examples.append(_example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, i))
    return _checked(source, cfg, tokenizer, examples, problems, overlong, seq_len=seq_len, truncated=truncated,
                    dropped=dropped)


def _checked(source: Source, cfg: DataConfig, tokenizer, examples: list[Example], problems: list[tuple[int, str]],
             overlong: list[tuple[int, str]], *, seq_len: int, truncated: int,
             dropped: int) -> tuple[list[Example], DataStats]:
    """The examples and their stats, once the records' problems are allowed (or raised, naming them)."""
    problems.sort()
    why = [f"{source.where(i)}: {message}" for i, message in problems]
    _refuse_invalid(source.name, why, len(source.rows), cfg)
    _raise_problems(source, overlong, "raise train.seq_len, or set data.overlong=truncate or drop")
    if not examples:
        raise QloraError(f"{source.name}: no trainable samples (all {len(source.rows)} prompts are longer than "
                         f"train.seq_len={seq_len}); raise train.seq_len")
    kept = len({e.record for e in examples})
    tokens = sum(len(e) for e in examples)
    trained_tokens = sum(int((e.labels[1:] != IGNORE_INDEX).sum()) for e in examples)
    unk = tokenizer.unk_token_id
    unknown = sum(int((e.input_ids == unk).sum()) for e in examples) if unk is not None else 0
    stats = DataStats(len(source.rows), kept, len(problems), why, truncated, dropped, len(examples), tokens,
                      trained_tokens, unknown)
    return examples, stats


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text by default (typically BOS)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def cache_key(data_fingerprint: str, cfg: DataConfig, tokenizer, template: str | None, seq_len: int) -> str:
    """A digest of everything the encoding depends on: data, tokenizer, template, settings, code version."""
    settings = {k: v for k, v in asdict(cfg).items()
                if k in ("format", "columns", "roles", "train_on_prompt", "overlong")}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256()
    for part in (ENCODING_VERSION, data_fingerprint, vocabulary, template or "",
                 json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]),
                 json.dumps(settings, default=str, sort_keys=True), str(seq_len)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def _example(input_ids: list[int], labels: list[int], record: int) -> Example:
    return Example(np.asarray(input_ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), record)


def _raise_problems(source: Source, problems: list[tuple[int, str]], fix: str) -> None:
    if not problems:
        return
    i, message = problems[0]
    more = ""
    if len(problems) > 1:
        others = ", ".join(source.where(j) for j, _ in problems[1:6])
        more = f" (and {len(problems) - 1} more: {others}{', ...' if len(problems) > 6 else ''})"
    raise QloraError(f"{source.name} {source.where(i)}: {message}{more}; {fix}")


def _store(folder: Path, examples: list[Example], stats: DataStats) -> None:
    """Save as one Arrow file (examples.arrow: token ids, labels and record of each example) plus stats.json,
    atomically (stats.json last marks it complete). pyarrow alone reads it back: no `datasets` import."""
    import pyarrow as pa

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        offsets = pa.array(np.cumsum([0, *(len(e) for e in examples)]), type=pa.int64())

        def tokens(field: str) -> pa.Array:
            values = np.concatenate([getattr(e, field) for e in examples]) if examples else np.zeros(0, np.int64)
            return pa.LargeListArray.from_arrays(offsets, pa.array(values, type=pa.int64()))

        table = pa.table({"input_ids": tokens("input_ids"), "labels": tokens("labels"),
                          "record": pa.array([e.record for e in examples], type=pa.int64())})
        with pa.OSFile(str(staging / "examples.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        (staging / "stats.json").write_text(json.dumps(asdict(stats)))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    except OSError as e:  # a cache that cannot be written costs speed, not correctness
        log.warning("could not cache tokenized data in %s (%s); continuing without the cache", folder, e)
        shutil.rmtree(staging, ignore_errors=True)


def _load(folder: Path) -> tuple[list[Example], DataStats]:
    import pyarrow as pa

    with pa.OSFile(str(folder / "examples.arrow")) as source:
        table = pa.ipc.open_file(source).read_all()  # read into memory: nothing refers to the file afterwards
    columns = {}
    for name in ("input_ids", "labels"):
        array = table.column(name).combine_chunks()
        offsets = array.offsets.to_numpy()
        values = array.values.to_numpy()
        columns[name] = [values[offsets[n]:offsets[n + 1]] for n in range(len(array))]
    records = table.column("record").to_pylist()
    examples = [Example(ids, labels, record)
                for ids, labels, record in zip(columns["input_ids"], columns["labels"], records, strict=True)]
    return examples, DataStats(**json.loads((folder / "stats.json").read_text()))
