"""Loss masking on token ids, EOS trained, padding masked, bad rows named."""

from __future__ import annotations

import json

import pytest

from qlora import data as qdata
from qlora.config import DataConfig, DataFormat
from qlora.demo import build_demo_tokenizer, demo_records
from qlora.errors import QloraError


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def alpaca(**kw) -> DataConfig:
    return DataConfig(path="x.jsonl", format=DataFormat.alpaca, **kw)


def test_only_the_response_and_its_eos_carry_loss(tokenizer):
    record = {"instruction": "What sound does a cow make?", "input": "", "output": "A cow says moo."}
    [example], stats = qdata.encode([record], alpaca(), tokenizer, 96, "t")
    prompt = tokenizer(qdata.alpaca_prompt(record["instruction"]))["input_ids"]
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt + response + [tokenizer.eos_token_id]
    assert example.labels == [qdata.IGNORE_INDEX] * len(prompt) + response + [tokenizer.eos_token_id]
    trained = [t for t in example.labels if t != qdata.IGNORE_INDEX]
    assert tokenizer.decode(trained, skip_special_tokens=True) == "A cow says moo."
    assert trained[-1] == tokenizer.eos_token_id
    assert (stats.kept, stats.truncated, stats.dropped) == (1, 0, 0)


def test_train_on_prompt_trains_everything(tokenizer):
    record = {"instruction": "What does a cow eat?", "output": "A cow eats grass."}
    [example], _ = qdata.encode([record], alpaca(train_on_prompt=True), tokenizer, 96, "t")
    assert example.labels == example.input_ids


def test_truncation_and_dropping_are_counted(tokenizer):
    records = demo_records()[:3]
    prompt_len = len(tokenizer(qdata.alpaca_prompt(records[0]["instruction"]))["input_ids"])
    examples, stats = qdata.encode(records, alpaca(), tokenizer, prompt_len + 2, "t")
    assert stats.truncated == 3 and all(len(e.input_ids) == prompt_len + 2 for e in examples)
    with pytest.raises(QloraError, match="no trainable examples"):
        qdata.encode(records, alpaca(), tokenizer, prompt_len - 5, "t")


def test_text_format_windows_long_documents(tokenizer):
    text = " ".join(["A cow says moo."] * 20)  # 100 tokens + EOS
    cfg = DataConfig(path="x.jsonl", format=DataFormat.text)
    examples, _ = qdata.encode([{"text": text}], cfg, tokenizer, 32, "t")
    assert [len(e.input_ids) for e in examples] == [32, 32, 32, 6]
    assert sum((e.input_ids for e in examples), []) == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert examples[0].labels[0] == qdata.IGNORE_INDEX  # BOS is never a target
    assert examples[0].labels[1:] == examples[0].input_ids[1:]
    assert all(e.labels == e.input_ids for e in examples[1:])


def test_collator_masks_padding_by_position_even_when_pad_is_eos(tokenizer):
    a = qdata.Example([5, 6, 7, 3], [-100, 6, 7, 3])
    b = qdata.Example([5, 6], [-100, 6])
    batch = qdata.Collator(pad_id=3)([a, b])  # pad id == the EOS id used above
    assert batch["input_ids"].tolist() == [[5, 6, 7, 3], [5, 6, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7, 3], [-100, 6, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_split_is_seeded_and_disjoint(tokenizer):
    examples, _ = qdata.encode(demo_records(), alpaca(), tokenizer, 96, "t")
    train, held = qdata.split(examples, 0.1, seed=1)
    again, held_again = qdata.split(examples, 0.1, seed=1)
    assert len(held) == 18 and len(train) == 162
    assert [e.input_ids for e in held] == [e.input_ids for e in held_again]
    assert not {id(e) for e in train} & {id(e) for e in held}


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(QloraError, match=r"d.jsonl: line 2 is not valid JSON"):
        qdata.read_records(DataConfig(path=str(path)))


def test_missing_field_names_the_record(tmp_path, tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ""}]))
    records = qdata.read_records(DataConfig(path=str(path)))
    with pytest.raises(QloraError, match="record 1 has no 'output' text"):
        qdata.encode(records, alpaca(), tokenizer, 96, str(path))


def test_reads_the_shared_alpaca_sample():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_5000.json"
    if not path.is_file():
        pytest.skip("../shared/data/alpaca_5000.json is not beside this checkout")
    records = qdata.read_records(DataConfig(path=str(path)))
    assert len(records) == 5000 and {"instruction", "input", "output"} <= set(records[0])
