"""`qlora data preview`: what the model will be trained on, before any weights load.

Shows a few samples as the model sees them with the trained tokens marked, the length histogram, what became
of every record, and how much of each batch would be padding with and without packing.
"""

from __future__ import annotations

import os
import sys

from qlora.config import Config, DataFormat
from qlora.data import IGNORE_INDEX, Example, LengthGroupedBatches, pack, padding_fraction, unpacked

GREEN, RESET = "\033[32m", "\033[0m"


def preview(config: Config, tokenizer, data, samples: int, *, out=None) -> None:
    """Print the preview of `data` (a qlora.data.TokenizedData) encoded with `tokenizer` under `config`."""
    out = out or sys.stdout
    colour = out.isatty() and not os.environ.get("NO_COLOR")
    seq_len = config.train.seq_len
    print(f"data {config.data.path} ({config.data.format.value}), tokenizer {tokenizer.name_or_path}, "
          f"seq_len {seq_len}", file=out)
    print(data.stats.describe(seq_len), file=out)
    print(f"split: {len(data.train)} train / {len(data.eval)} eval sequences", file=out)
    legend = f"{GREEN}green{RESET}" if colour else "between [[ and ]]"
    print(f"\ntrained tokens (the loss is taken on them) are {legend}", file=out)

    pairs = config.data.format == DataFormat.preference  # (chosen, rejected) of each record, shown together
    shown = sorted(data.train + data.eval, key=lambda e: e.record)[:samples * (2 if pairs else 1)]
    for n, example in enumerate(shown):
        trained = int((example.labels[1:] != IGNORE_INDEX).sum())
        which = f" ({'rejected' if n % 2 else 'chosen'})" if pairs else ""
        print(f"\n--- sample {n // 2 + 1 if pairs else n + 1}{which}: record {example.record + 1}, {len(example)} "
              f"tokens, {trained} trained ---", file=out)
        print(render_marked(example, tokenizer, colour), file=out)

    print(f"\nlength histogram (tokens per sequence, {len(data.train)} train sequences):", file=out)
    print(histogram([len(e) for e in data.train], seq_len), file=out)

    batch = config.train.micro_batch_size
    rows = unpacked(data.train)
    lengths = [len(e) for e in data.train]
    packed = pack(data.train, seq_len)
    packed_lengths = [sum(len(e) for e in row) for row in packed]
    print(f"\npadding at micro_batch_size {batch} (share of batch tokens that are padding):", file=out)
    for label, table, row_lengths, group in (
        ("random batches", rows, lengths, False),
        ("length-grouped batches", rows, lengths, True),
        *([] if pairs else [(f"packed into {seq_len}-token rows", packed, packed_lengths, True)]),
    ):
        batches = LengthGroupedBatches(row_lengths, batch, config.seed, group).batches(0)
        print(f"  {label:<32} {padding_fraction(table, batches):6.1%}  ({len(table)} rows)", file=out)
    setting = "packing" if config.data.packing else ("length-grouped" if config.data.group_by_length else "random")
    print(f"  (this config: {setting})", file=out)


def render_marked(example: Example, tokenizer, colour: bool) -> str:
    """The example's text, with every run of trained tokens marked."""
    targets = [False, *(example.labels[1:] != IGNORE_INDEX).tolist()]
    ids = example.input_ids.tolist()
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or targets[end] != targets[start]:
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
            if targets[start]:
                text = f"{GREEN}{text}{RESET}" if colour else f"[[{text}]]"
            pieces.append(text)
            start = end
    return "".join(pieces)


def histogram(lengths: list[int], seq_len: int, buckets: int = 8, width: int = 40) -> str:
    """Counts of lengths in `buckets` equal ranges up to seq_len, as text bars."""
    size = -(-seq_len // buckets)
    counts = [0] * buckets
    for n in lengths:
        counts[min((n - 1) // size, buckets - 1)] += 1
    top = max(counts) or 1
    lines = []
    for b, count in enumerate(counts):
        low, high = b * size + 1, min((b + 1) * size, seq_len)
        lines.append(f"  {low:>6}-{high:<6} {'#' * round(width * count / top):<{width}} {count}")
    return "\n".join(lines)
