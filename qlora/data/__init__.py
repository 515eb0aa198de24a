"""Training data: read records, render them per format, tokenize with a loss mask, split, pack, batch.

    records.py   files and hub datasets -> rows, with where each row came from
    formats.py   a row -> text segments marked trained or not (alpaca, chat templates, text)
    encode.py    segments -> input_ids / labels, validation, the tokenization cache
    batches.py   split, packing, length-grouped batches, collation
    preview.py   `qlora data preview`
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora.config import DataConfig, DataFormat
from qlora.data.batches import (
    Collator,
    LengthGroupedBatches,
    eval_batches,
    model_inputs,
    pack,
    padding_fraction,
    split_by_record,
    unpacked,
)
from qlora.data.encode import IGNORE_INDEX, DataStats, Example, encode, encode_source, special_prefix
from qlora.data.formats import CHAT_TEMPLATES, alpaca_chat_template, alpaca_prompt, resolve_chat_template
from qlora.data.records import Source, read_source

__all__ = [
    "CHAT_TEMPLATES", "IGNORE_INDEX", "Collator", "DataStats", "Example", "LengthGroupedBatches", "Source",
    "TokenizedData", "alpaca_chat_template", "alpaca_prompt", "encode", "eval_batches", "first_batch", "load",
    "loaders", "model_inputs", "pack", "padding_fraction", "prompt_ids", "read_source", "stop_token_ids", "unpacked",
    "use_chat_template",
]

log = logging.getLogger(__name__)


@dataclass
class TokenizedData:
    train: list[Example]
    eval: list[Example]
    stats: DataStats
    """Of data.path (the eval file, when separate, is validated the same way)."""


def use_chat_template(cfg: DataConfig, tokenizer) -> None:
    """Install the chat template data.chat_template selects on the tokenizer (chat data only), so the run's
    saved tokenizer carries the template it was trained with."""
    template = resolve_chat_template(cfg, tokenizer)
    if template is not None:
        tokenizer.chat_template = template


def load(cfg: DataConfig, tokenizer, seq_len: int, seed: int, cache_dir: Path | None) -> TokenizedData:
    """Tokenized train and eval examples, validated; from the cache when the same encoding was made before."""
    template = resolve_chat_template(cfg, tokenizer)
    cache = cache_dir / "tokenized" if cfg.cache and cache_dir is not None else None
    examples, stats = encode_source(cfg.path, cfg, tokenizer, template, seq_len, cache)
    _report(cfg.path, stats)
    if cfg.eval_path is not None:
        held_out, eval_stats = encode_source(cfg.eval_path, cfg, tokenizer, template, seq_len, cache)
        _report(cfg.eval_path, eval_stats)
        train = examples
    else:
        train, held_out = split_by_record(examples, stats.records, cfg.eval_fraction, seed)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        log.info("pad token is the EOS token; padding is masked by position, so every EOS stays trained")
    return TokenizedData(train, held_out, stats)


def _report(path: str, stats: DataStats) -> None:
    # Said on every run, cached or not: skipped records are never silent.
    if stats.unknown_tokens > 0.01 * stats.tokens:
        log.warning("data %s: %.0f%% of tokens are the tokenizer's unknown token; is this the right tokenizer "
                    "for this data?", path, 100 * stats.unknown_tokens / stats.tokens)
    if stats.skipped:
        log.warning("data %s: skipped %d invalid records (data.on_invalid=skip): %s%s", path, stats.skipped,
                    "; ".join(stats.skipped_why), "; ..." if stats.skipped > len(stats.skipped_why) else "")


def loaders(data: TokenizedData, cfg: DataConfig, micro_batch_size: int, seq_len: int, pad_id: int, seed: int,
            num_workers: int, rank: int = 0,
            world: int = 1) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader | None]:
    """The train loader (packed or length-grouped, reshuffled every epoch; process `rank` of `world` gets its
    share of the batches) and the eval loader (unpacked, whole on every process)."""
    rows = pack(data.train, seq_len) if cfg.packing else unpacked(data.train)
    sampler = LengthGroupedBatches([sum(len(e) for e in row) for row in rows], micro_batch_size, seed,
                                   group=cfg.group_by_length or cfg.packing, rank=rank, world=world)
    # Each loader draws its workers' base seed from its own generator: from the global one, every new epoch
    # (and a resume) would shift the dropout masks that follow.
    train = torch.utils.data.DataLoader(rows, batch_sampler=sampler, collate_fn=Collator(pad_id, cfg.packing),
                                        num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    if not data.eval:
        return train, None
    eval_rows = unpacked(data.eval)
    evaluation = torch.utils.data.DataLoader(eval_rows, batch_sampler=eval_batches([len(e) for e in data.eval],
                                             micro_batch_size), collate_fn=Collator(pad_id, packed=False),
                                             generator=torch.Generator().manual_seed(seed))
    return train, evaluation


def first_batch(loader: torch.utils.data.DataLoader) -> dict[str, torch.Tensor]:
    """The loader's first training batch, without advancing its epoch."""
    first = loader.batch_sampler.batches(loader.batch_sampler.epoch)[0]
    return loader.collate_fn([loader.dataset[i] for i in first])


def prompt_ids(text: str, cfg: DataConfig, tokenizer) -> list[int]:
    """Token ids of a user prompt as the data format presents it, ending where the model's answer starts."""
    if cfg.format == DataFormat.chat:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    rendered = alpaca_prompt(text) if cfg.format == DataFormat.alpaca else text
    return special_prefix(tokenizer) + tokenizer(rendered, add_special_tokens=False)["input_ids"]



def stop_token_ids(cfg: DataConfig, tokenizer) -> list[int]:
    """The tokens the trained model ends an answer with: EOS, and for chat data the special token that closes
    an assistant turn in the template (such as <|im_end|> or <|eot_id|>)."""
    ids = [tokenizer.eos_token_id]
    if cfg.format != DataFormat.chat or not tokenizer.chat_template:
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
