"""The data tests' tokenizer: a byte-level BPE trained on the demo records and a chat."""

from __future__ import annotations

import json

import pytest

from qlora.demo import build_bpe_tokenizer, demo_records

CHAT = [
    {"role": "system", "content": "You are a farmer."},
    {"role": "user", "content": "What sound does a cow make?"},
    {"role": "assistant", "content": "A cow says moo."},
    {"role": "user", "content": "And a duck?"},
    {"role": "assistant", "content": "A duck says quack."},
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer (ChatML template, pad distinct from EOS) trained on demo and chat text."""
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    rows = demo_records() + [{"messages": CHAT}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_bpe_tokenizer(str(corpus), 400)
