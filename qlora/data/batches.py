"""From examples to batches: the train / eval split, packing, length-grouped batching, collation.

A batch row holds one example, or several when packing. Packed rows carry position ids that restart at 0
for each sample and no attention mask: transformers then derives a block-diagonal causal mask from the
position ids (sdpa, eager, flex) or cuts the sequence at the restarts (flash attention), so no token attends
across a sample boundary. The first token of every sample is never a target, exactly as when it starts a row.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np
import torch

from qlora.data.encode import IGNORE_INDEX, Example
from qlora.errors import QloraError

Row = list[Example]


def split_by_record(examples: list[Example], n_records: int, eval_fraction: float,
                    seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded eval_fraction of the records (at least one when > 0), with all of their examples."""
    if eval_fraction <= 0:
        return examples, []
    n_eval = max(1, round(eval_fraction * n_records))
    held = set(np.random.default_rng(seed).permutation(n_records)[:n_eval].tolist())
    train = [e for e in examples if e.record not in held]
    held_out = [e for e in examples if e.record in held]
    if not train:
        raise QloraError(f"data.eval_fraction={eval_fraction} leaves no training data from {n_records} records; "
                         "lower it")
    return train, held_out


def pack(examples: list[Example], seq_len: int) -> list[Row]:
    """Rows of at most seq_len tokens, filled best-fit in decreasing length order (deterministic)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    rows: list[list[int]] = []
    space: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in order:
        n = len(examples[i])
        k = bisect_left(space, (n, -1))
        if k == len(space):
            rows.append([i])
            insort(space, (seq_len - n, len(rows) - 1))
        else:
            free, row = space.pop(k)
            rows[row].append(i)
            insort(space, (free - n, row))
    return [[examples[i] for i in row] for row in rows]


def unpacked(examples: list[Example]) -> list[Row]:
    return [[e] for e in examples]


class LengthGroupedBatches:
    """A batch sampler: a seeded shuffle each epoch, then (optionally) rows of similar length batched together.

    Grouping sorts windows of 64 batches by length, so batches stay random while padding shrinks; the
    longest batch comes first, so running out of memory happens at step 1, not hours in.
    """

    WINDOW = 64

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group: bool, *, rank: int = 0,
                 world: int = 1) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group = group
        self.rank, self.world = rank, world
        """This process's share of each epoch: batches rank, rank + world, ... (the same count for every rank)."""
        self.epoch = 0
        """The epoch the next iteration draws (each iteration advances it)."""
        self.skip = 0
        """Batches of that epoch the next iteration leaves out (they were trained before a resume)."""

    def start_at(self, epoch: int, batch: int) -> None:
        """Make the next iteration yield epoch `epoch` from its batch `batch` on."""
        self.epoch, self.skip = epoch, batch

    def batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        n_full = len(order) // self.batch_size * self.batch_size
        order = order[:n_full] if n_full else order  # drop the last partial batch, unless it is the only one
        if self.group:
            window = self.WINDOW * self.batch_size
            order = np.concatenate([sorted(order[s:s + window], key=lambda i: -self.lengths[i])
                                    for s in range(0, len(order), window)])
        batches = [order[s:s + self.batch_size].tolist() for s in range(0, len(order), self.batch_size)]
        if self.group:
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            rest = [batches[b] for b in rng.permutation(len(batches)) if b != longest]
            batches = [batches[longest], *rest]
        return batches

    def __iter__(self):
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        yield from self.shard(self.batches(epoch))[skip:]

    def shard(self, batches: list[list[int]]) -> list[list[int]]:
        """This process's batches of an epoch. With several processes, each step's batches are consecutive
        ones of the single-process order (rank r draws r, r + world, ...), and the epoch's last few are left
        out so that every process draws as many: a process that ran out first would hang the others."""
        if self.world == 1:
            return batches
        per_rank = len(batches) // self.world
        if per_rank == 0:
            raise QloraError(f"{len(batches)} batch(es) per epoch cannot be shared by {self.world} processes; "
                             "use more data, a smaller train.micro_batch_size, or fewer processes")
        return batches[self.rank:per_rank * self.world:self.world]

    def __len__(self) -> int:
        return max(1, len(self.lengths) // self.batch_size) // self.world


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Eval batches in a fixed order, sorted by length (the loss does not depend on the order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


class Collator:
    """Right-pads rows into tensors. Padding carries no loss, and sits after every real token of its row, so causal
    attention keeps it out of every real token's view without a mask (`model_inputs` passes none)."""

    def __init__(self, pad_id: int, packed: bool) -> None:
        self.pad_id = pad_id
        self.packed = packed

    def __call__(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        width = max(sum(len(e) for e in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for e in row:
                end = start + len(e)
                ids[r, start:end] = torch.tensor(e.input_ids)
                labels[r, start:end] = torch.tensor(e.labels)
                labels[r, start] = IGNORE_INDEX  # predicted from nothing of its own sample
                positions[r, start:end] = torch.arange(len(e))
                start = end
            mask[r, :start] = 1
            positions[r, start:] = torch.arange(width - start)  # the padding is a sample of its own
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if self.packed:
            batch["position_ids"] = positions
        return batch


def pairs(examples: list[Example]) -> list[Row]:
    """Preference examples (chosen, rejected, chosen, ...) as rows of one pair each."""
    rows = [examples[k:k + 2] for k in range(0, len(examples), 2)]
    if any(len(row) != 2 or row[0].record != row[1].record for row in rows):
        raise ValueError("preference examples must come as (chosen, rejected) pairs of one record")
    return rows


class PairCollator:
    """Right-pads pairs into one batch of 2 x pairs rows, every chosen answer first and then every rejected one, so
    that one forward scores both. Precomputed reference log-probs (`reference`: record -> (chosen, rejected)) come
    along as `reference_logps`, in the same order."""

    def __init__(self, pad_id: int, reference: dict[int, tuple[float, float]] | None = None) -> None:
        self.collate = Collator(pad_id, packed=False)
        self.reference = reference

    def __call__(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        batch = self.collate([[chosen] for chosen, _ in rows] + [[rejected] for _, rejected in rows])
        if self.reference is not None:
            logps = [self.reference[chosen.record] for chosen, _ in rows]
            batch["reference_logps"] = torch.tensor([c for c, _ in logps] + [r for _, r in logps], dtype=torch.float32)
        return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward() arguments of a batch: packed rows pass position ids, and no batch passes an attention mask.

    A right-padded row needs none: a real token's causal window ends before the padding, so the padding mask would
    hide nothing that causality has not. Without it SDPA runs its causal kernel, which keeps one number per query
    instead of the [batch, heads, tokens, tokens] score matrices a masked call keeps for backward (3.8 GiB for
    SmolLM2 at 8 x 384 tokens). transformers separates packed samples only without a KV cache, so packed forwards
    never use one.
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"]}


def padding_fraction(rows: list[Row], batches: list[list[int]]) -> float:
    """Share of the token slots in `batches` (row indices) that are padding."""
    real = slots = 0
    for batch in batches:
        lengths = [sum(len(e) for e in rows[i]) for i in batch]
        real += sum(lengths)
        slots += max(lengths) * len(lengths)
    return 1 - real / max(slots, 1)
