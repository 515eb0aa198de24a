"""Packing keeps samples apart and the loss unchanged; batches are seeded, grouped and split by record."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora import data as qdata
from qlora.attention import check_packed_attention
from qlora.config import DataConfig, DataFormat
from qlora.data.batches import split_by_record
from qlora.demo import build_demo_tokenizer, demo_records
from qlora.errors import QloraError
from qlora.evaluation import token_loss_sum

IGNORE = qdata.IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    source = qdata.Source("demo", demo_records())
    examples, _ = qdata.encode(source, DataConfig(path="demo"), tokenizer, None, 96)
    return examples[:24]


def tiny_llama(vocab: int, attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def test_packing_fills_rows_with_every_example_once(examples):
    rows = qdata.pack(examples, 256)
    assert all(sum(len(e) for e in row) <= 256 for row in rows)
    assert sorted(id(e) for row in rows for e in row) == sorted(id(e) for e in examples)
    assert len(rows) <= len(examples) / 4


def test_packed_rows_restart_positions_and_never_predict_across_samples(examples):
    row = examples[:3]
    batch = qdata.Collator(pad_id=1, packed=True)([row])
    lengths = [len(e) for e in row]
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    starts = np.cumsum([0, *lengths[:-1]])
    assert all(batch["labels"][0, s] == IGNORE for s in starts)
    assert set(qdata.model_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}  # split by positions


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(examples, tokenizer, attn):
    model = tiny_llama(len(tokenizer), attn)
    packed_rows = qdata.pack(examples, 256)
    with torch.no_grad():
        packed = qdata.Collator(tokenizer.pad_token_id, packed=True)(packed_rows)
        plain = qdata.Collator(tokenizer.pad_token_id, packed=False)(qdata.unpacked(examples))
        packed_loss = token_loss_sum(model(**qdata.model_inputs(packed)).logits, packed["labels"])
        plain_loss = token_loss_sum(model(**qdata.model_inputs(plain)).logits, plain["labels"])
    count = lambda b: int((b["labels"][:, 1:] != IGNORE).sum())  # noqa: E731
    assert count(packed) == count(plain)
    assert packed_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    check_packed_attention(model, packed, torch.device("cpu"))  # passes: nothing leaks


class AttendsAcrossSamples(torch.nn.Module):
    """A model whose attention ignores position-id restarts (as a custom attention kernel might)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=None):
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids),
                          use_cache=use_cache)


def test_attention_that_leaks_across_packed_samples_is_refused(examples, tokenizer):
    model = AttendsAcrossSamples(tiny_llama(len(tokenizer), "sdpa"))
    batch = qdata.Collator(tokenizer.pad_token_id, packed=True)(qdata.pack(examples, 256))
    with pytest.raises(QloraError, match="lets packed samples attend to each other"):
        check_packed_attention(model, batch, torch.device("cpu"))


def test_batches_are_seeded_per_epoch_grouped_and_longest_first():
    lengths = np.random.default_rng(0).integers(5, 500, size=1000).tolist()
    sampler = qdata.LengthGroupedBatches(lengths, 8, seed=3, group=True)
    first, second = sampler.batches(0), sampler.batches(1)
    assert first == qdata.LengthGroupedBatches(lengths, 8, seed=3, group=True).batches(0)
    assert first != second
    assert sorted(i for b in first for i in b) == list(range(1000))
    assert max(lengths[i] for i in first[0]) == max(lengths)
    assert [list(b) for b in sampler] == first and [list(b) for b in sampler] == second  # iterating advances
    rows = [[np.zeros(n)] for n in lengths]
    grouped = qdata.padding_fraction(rows, first)
    shuffled = qdata.padding_fraction(rows, qdata.LengthGroupedBatches(lengths, 8, 3, group=False).batches(0))
    assert grouped < 0.1 < 0.3 < shuffled


def test_split_is_by_record_and_seeded(tokenizer):
    text = " ".join(["A cow says moo."] * 30)
    source = qdata.Source("t", [{"text": f"{text} {n}"} for n in range(20)])
    examples, stats = qdata.encode(source, DataConfig(path="t", format=DataFormat.text), tokenizer, None, 32)
    train, held = split_by_record(examples, stats.records, 0.2, seed=5)
    again, held_again = split_by_record(examples, stats.records, 0.2, seed=5)
    assert {e.record for e in held} == {e.record for e in held_again} and len({e.record for e in held}) == 4
    assert not {e.record for e in train} & {e.record for e in held}  # a document's windows stay together
    assert len(train) + len(held) == len(examples)
    with pytest.raises(QloraError, match="leaves no training data"):
        split_by_record(examples[:1], 1, 0.5, seed=5)
