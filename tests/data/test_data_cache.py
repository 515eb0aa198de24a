"""The tokenization cache: a second run reads it; any change to data, tokenizer, template or settings misses it."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from qlora import data as qdata
from qlora.config import DataConfig, DataFormat
from qlora.data.encode import encode_source
from qlora.demo import build_demo_tokenizer, demo_records


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_records()[:40]))
    return path


def run(path, cfg, tokenizer, cache, caplog, seq_len=96, template=None):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qlora.data.encode"):
        examples, stats = encode_source(str(path), cfg, tokenizer, template, seq_len, cache)
    return examples, stats, "from cache" in caplog.text


def test_a_second_encoding_comes_from_the_cache_and_is_identical(data_file, tokenizer, tmp_path, caplog):
    cfg = DataConfig(path=str(data_file))
    first, stats, hit = run(data_file, cfg, tokenizer, tmp_path / "cache", caplog)
    assert not hit
    again, stats_again, hit = run(data_file, cfg, tokenizer, tmp_path / "cache", caplog)
    assert hit and stats_again == stats
    assert [(e.input_ids.tolist(), e.labels.tolist(), e.record) for e in again] == \
           [(e.input_ids.tolist(), e.labels.tolist(), e.record) for e in first]


@pytest.mark.parametrize("change", ["data", "seq_len", "train_on_prompt", "tokenizer", "template"])
def test_any_change_that_alters_the_tokens_misses_the_cache(data_file, tokenizer, tmp_path, caplog, change):
    cfg = DataConfig(path=str(data_file))
    cache = tmp_path / "cache"
    run(data_file, cfg, tokenizer, cache, caplog)
    seq_len, template = 96, None
    if change == "data":
        data_file.write_text(data_file.read_text().replace("moo", "MOO"))
    elif change == "seq_len":
        seq_len = 64
    elif change == "train_on_prompt":
        cfg = replace(cfg, train_on_prompt=True)
    elif change == "tokenizer":
        tokenizer = build_demo_tokenizer()
        tokenizer.add_tokens(["zebra"])
    else:  # the same chat data under another template
        chat = [{"messages": [{"role": "user", "content": r["instruction"]},
                              {"role": "assistant", "content": r["output"]}]} for r in demo_records()[:5]]
        data_file.write_text("".join(json.dumps(r) + "\n" for r in chat))
        cfg = DataConfig(path=str(data_file), format=DataFormat.chat)
        run(data_file, cfg, tokenizer, cache, caplog, template=qdata.CHAT_TEMPLATES["chatml"])
        template = qdata.CHAT_TEMPLATES["llama3"]
    _, _, hit = run(data_file, cfg, tokenizer, cache, caplog, seq_len=seq_len, template=template)
    assert not hit


@pytest.mark.parametrize("damaged", ["stats.json", "examples.arrow"])
def test_an_unreadable_cache_is_rebuilt(data_file, tokenizer, tmp_path, caplog, damaged):
    cfg = DataConfig(path=str(data_file))
    cache = tmp_path / "cache"
    first, _, _ = run(data_file, cfg, tokenizer, cache, caplog)
    [folder] = cache.iterdir()
    (folder / damaged).write_bytes((folder / damaged).read_bytes()[:40])  # cut short, as by a full disk
    again, _, hit = run(data_file, cfg, tokenizer, cache, caplog)
    assert not hit and "unreadable" in caplog.text
    assert [e.input_ids.tolist() for e in again] == [e.input_ids.tolist() for e in first]
    assert run(data_file, cfg, tokenizer, cache, caplog)[2]  # and replaced
