"""Training data: read records, render them per format, tokenize with a loss mask, split, pack, batch.

    records.py   files and hub datasets -> rows, with where each row came from
    formats.py   a row -> text segments marked trained or not (alpaca, chat templates, text)
    encode.py    segments -> input_ids / labels, validation, the tokenization cache
    batches.py   split, packing, length-grouped batches, collation
    preview.py   `qlora data preview`
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from qlora.config import AUTO, Config, DataConfig, DataFormat
from qlora.data.batches import (
    Collator,
    LengthGroupedBatches,
    PairCollator,
    eval_batches,
    model_inputs,
    pack,
    padding_fraction,
    pairs,
    split_by_record,
    unpacked,
)
from qlora.data.encode import IGNORE_INDEX, DataStats, Example, encode, encode_source, special_prefix
from qlora.data.formats import (
    CHAT_TEMPLATES,
    alpaca_chat_template,
    alpaca_prompt,
    resolve_chat_template,
    sample_texts,
)
from qlora.data.records import Source, read_source

__all__ = [
    "CHAT_TEMPLATES", "IGNORE_INDEX", "Collator", "DataStats", "Example", "HeldOutSample", "LengthGroupedBatches",
    "PairCollator", "Source", "TokenizedData", "alpaca_chat_template", "alpaca_prompt", "batches_from", "bounded_eval",
    "chat_rendered", "encode", "eval_batches", "first_batch", "held_out_samples", "load", "loaders", "model_inputs",
    "pack", "padding_fraction", "pairs", "prompt_ids", "read_source", "stop_token_ids", "unpacked", "use_chat_template",
    "with_seq_len",
]

log = logging.getLogger(__name__)


@dataclass
class TokenizedData:
    train: list[Example]
    eval: list[Example]
    stats: DataStats
    """Of data.path (the eval file, when separate, is validated the same way)."""
    skipped: list[str] = field(default_factory=list)
    """Every invalid record left out (data.on_invalid=skip), as 'FILE line 18: why', of both files."""


def use_chat_template(cfg: DataConfig, tokenizer) -> None:
    """Install the chat template data.chat_template selects on the tokenizer (chat data only), so the run's
    saved tokenizer carries the template it was trained with."""
    template = resolve_chat_template(cfg, tokenizer)
    if template is not None:
        tokenizer.chat_template = template


def load(cfg: DataConfig, tokenizer, *, seq_len: int, seed: int, cache_dir: Path | None) -> TokenizedData:
    """Tokenized train and eval examples, validated; from the cache when the same encoding was made before."""
    template = resolve_chat_template(cfg, tokenizer)
    cache = cache_dir / "tokenized" if cfg.cache and cache_dir is not None else None
    examples, stats = encode_source(cfg.path, cfg, tokenizer, template, seq_len, cache)
    _report(cfg.path, stats)
    skipped = [f"{cfg.path} {why}" for why in stats.skipped_why]
    if cfg.eval_path is not None:
        held_out, eval_stats = encode_source(cfg.eval_path, cfg, tokenizer, template, seq_len, cache)
        _report(cfg.eval_path, eval_stats)
        skipped += [f"{cfg.eval_path} {why}" for why in eval_stats.skipped_why]
        train = examples
    else:
        train, held_out = split_by_record(examples, stats.records, cfg.eval_fraction, seed)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        log.info("pad token is the EOS token; padding is masked by position, so every EOS stays trained")
    return TokenizedData(train, held_out, stats, skipped)


AUTO_SEQ_LEN_SHARE = 0.99
"""train.seq_len=auto holds this share of the training samples whole; longer ones follow data.overlong."""
AUTO_SEQ_LEN_MAX = 4096
"""The longest train.seq_len=auto chooses (a longer one is a memory decision to make explicitly)."""


def with_seq_len(config: Config, tokenizer, positions: int | None) -> Config:
    """`config` with train.seq_len=auto replaced by the length its data needs: the shortest multiple of 64 that holds
    AUTO_SEQ_LEN_SHARE of the samples of data.path whole, at most the model's `positions` and AUTO_SEQ_LEN_MAX. The
    choice is logged; a config with a number is returned as it is."""
    if config.train.seq_len != AUTO:
        return config
    cap = min(positions or AUTO_SEQ_LEN_MAX, AUTO_SEQ_LEN_MAX)
    cache = Path(config.cache_dir).expanduser() / "tokenized" if config.data.cache else None
    examples, _ = encode_source(config.data.path, config.data, tokenizer, resolve_chat_template(config.data, tokenizer),
                                cap, cache)
    lengths = np.sort([len(e) for e in examples])
    covering = int(lengths[min(len(lengths) - 1, math.ceil(AUTO_SEQ_LEN_SHARE * len(lengths)) - 1)])
    seq_len = min(cap, -(-covering // 64) * 64)
    longer = int((lengths > seq_len).sum())
    log.info("train.seq_len=auto: %d (holds %.1f%% of %d samples whole; longest %d tokens; limit %d%s)", seq_len,
             100 * (1 - longer / len(lengths)), len(lengths), int(lengths[-1]), cap,
             " = the model's positions" if positions is not None and cap == positions else "")
    return replace(config, train=replace(config.train, seq_len=seq_len))


@dataclass
class HeldOutSample:
    """A held-out record to answer before and after training: its prompt as trained, and its own answer."""

    prompt: str
    """What the user asked, for people (the Alpaca instruction and input; the chat's last user turn)."""
    ids: list[int]
    """The prompt's tokens exactly as the training sample has them, up to where the answer starts."""
    reference: str
    """The record's answer (the first assistant turn, for chat data)."""


def held_out_samples(data: TokenizedData, cfg: DataConfig, count: int) -> list[HeldOutSample]:
    """The prompts of the first `count` records of the eval split (alpaca and chat data; text has no prompts)."""
    if count == 0 or not data.eval or cfg.format == DataFormat.text:
        return []
    source = read_source(cfg.eval_path or cfg.path, cfg.split)
    chosen, seen = [], set()
    for example in data.eval:
        if example.record in seen:
            continue
        seen.add(example.record)
        trained = np.flatnonzero(example.labels != IGNORE_INDEX)
        prompt, reference = sample_texts(source.rows[example.record], cfg)
        chosen.append(HeldOutSample(prompt, example.input_ids[:trained[0]].tolist(), reference))
        if len(chosen) == count:
            break
    return chosen


def _report(path: str, stats: DataStats) -> None:
    # Said on every run, cached or not: skipped records are never silent.
    if stats.unknown_tokens > 0.01 * stats.tokens:
        log.warning("data %s: %.0f%% of tokens are the tokenizer's unknown token; is this the right tokenizer "
                    "for this data?", path, 100 * stats.unknown_tokens / stats.tokens)
    if stats.skipped:
        log.warning("data %s: skipped %d invalid record%s of %d (data.on_invalid=skip): %s", path, stats.skipped,
                    "s" if stats.skipped > 1 else "", stats.records, "; ".join(stats.skipped_why))


def loaders(data: TokenizedData, cfg: DataConfig, *, micro_batch_size: int, seq_len: int, pad_id: int, seed: int,
            num_workers: int, rank: int = 0,
            world: int = 1) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader | None]:
    """The train loader (packed or length-grouped, reshuffled every epoch; process `rank` of `world` gets its
    share of the batches) and the eval loader (unpacked, whole on every process). Preference data is batched by pair
    (micro_batch_size pairs, 2 x micro_batch_size sequences), each loader's collate_fn a PairCollator."""
    preference = cfg.format == DataFormat.preference
    rows = pairs(data.train) if preference else pack(data.train, seq_len) if cfg.packing else unpacked(data.train)

    def lengths(rows: list) -> list[int]:
        return [max(len(e) for e in row) if preference else sum(len(e) for e in row) for row in rows]

    def collator(packed: bool):
        return PairCollator(pad_id) if preference else Collator(pad_id, packed)

    sampler = LengthGroupedBatches(lengths(rows), micro_batch_size, seed, group=cfg.group_by_length or cfg.packing,
                                   rank=rank, world=world)
    # Each loader draws its workers' base seed from its own generator: from the global one, every new epoch
    # (and a resume) would shift the dropout masks that follow.
    train = torch.utils.data.DataLoader(rows, batch_sampler=sampler, collate_fn=collator(cfg.packing),
                                        num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    if not data.eval:
        return train, None
    eval_rows = pairs(data.eval) if preference else unpacked(data.eval)
    evaluation = torch.utils.data.DataLoader(eval_rows, batch_sampler=eval_batches(lengths(eval_rows),
                                             micro_batch_size), collate_fn=collator(False),
                                             generator=torch.Generator().manual_seed(seed))
    return train, evaluation


def bounded_eval(data: TokenizedData, cfg: DataConfig, sequences: int) -> TokenizedData:
    """`data` with its eval split cut to its first `sequences` sequences (whole pairs of preference data, at least
    one)."""
    if cfg.format == DataFormat.preference:
        sequences = max(2, sequences - sequences % 2)
    return replace(data, eval=data.eval[:sequences])


def first_batch(loader: torch.utils.data.DataLoader) -> dict[str, torch.Tensor]:
    """The loader's first training batch, without advancing its epoch."""
    first = loader.batch_sampler.batches(loader.batch_sampler.epoch)[0]
    return loader.collate_fn([loader.dataset[i] for i in first])


def batches_from(loader: torch.utils.data.DataLoader, sampler: LengthGroupedBatches, position) -> Iterator[dict]:
    """Batches forever from a data position (`position.epoch`, `position.batch`: a run's TrainState), advancing it
    with each batch drawn."""
    while True:
        sampler.start_at(position.epoch, position.batch)
        for batch in loader:
            position.batch += 1
            yield batch
        position.epoch += 1
        position.batch = 0


def prompt_ids(text: str, cfg: DataConfig, tokenizer) -> list[int]:
    """Token ids of a user prompt as the data format presents it, ending where the model's answer starts."""
    if chat_rendered(cfg, tokenizer):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    rendered = alpaca_prompt(text) if cfg.format == DataFormat.alpaca else text
    return special_prefix(tokenizer) + tokenizer(rendered, add_special_tokens=False)["input_ids"]



def chat_rendered(cfg: DataConfig, tokenizer) -> bool:
    """Whether prompts are put to the model through its chat template: chat data, and preference data when the
    tokenizer has a template (as use_chat_template installed it)."""
    if cfg.format == DataFormat.chat:
        return True
    return cfg.format == DataFormat.preference and isinstance(tokenizer.chat_template, str) \
        and bool(tokenizer.chat_template)


def stop_token_ids(cfg: DataConfig, tokenizer) -> list[int]:
    """The tokens the trained model ends an answer with: EOS, and for chat data the special token that closes
    an assistant turn in the template (such as <|im_end|> or <|eot_id|>)."""
    ids = [tokenizer.eos_token_id]
    if not chat_rendered(cfg, tokenizer):
        return ids
    mark = "qlora-answer-end"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
                                         tokenize=False)
    after = text[text.rindex(mark) + len(mark):]
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    first = next((t for t in tokenizer(after, add_special_tokens=False)["input_ids"] if t in special), None)
    if first is not None and first not in ids:
        ids.append(first)
    return ids
