"""Preference records in each layout become (chosen, rejected) pairs that share the prompt's tokens; only the
answers are scored; every bad pair is named."""

from __future__ import annotations

import pytest

from qlora import data as qdata
from qlora.config import ColumnsConfig, DataFormat, OnInvalid, Overlong
from qlora.errors import QloraError
from tests.data.conftest import CHAT
from tests.data.test_data import encode, ids, trained_text

IGNORE = qdata.IGNORE_INDEX
PROMPT = "What sound does a cow make?"
USER = {"role": "user", "content": PROMPT}


def pairs(rows, tokenizer, seq_len=256, **settings):
    examples, stats = encode(rows, tokenizer, seq_len, format=DataFormat.preference, **settings)
    return qdata.pairs(examples), stats


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


def check_pair(pair, tokenizer, chosen: str, rejected: str) -> None:
    """Both sequences hold the same prompt tokens, then their answer (trained, with EOS when it has none)."""
    c, r = pair
    shared = (c.labels == IGNORE).sum()
    assert shared == (r.labels == IGNORE).sum() > 0
    assert c.input_ids[:shared].tolist() == r.input_ids[:shared].tolist()
    assert (c.labels[shared:] != IGNORE).all() and (r.labels[shared:] != IGNORE).all()
    assert [t.removesuffix(tokenizer.eos_token) for t in trained_text(c, tokenizer)] == [chosen]
    assert [t.removesuffix(tokenizer.eos_token) for t in trained_text(r, tokenizer)] == [rejected]


def test_text_pairs_share_the_prompt_and_train_each_answer_and_eos(bpe):
    record = {"prompt": PROMPT + "\n", "chosen": "A cow says moo.", "rejected": "A cow says woof."}
    (pair,), stats = pairs([record], bpe)
    check_pair(pair, bpe, "A cow says moo.", "A cow says woof.")
    assert pair[0].input_ids[-1] == bpe.eos_token_id == pair[1].input_ids[-1]
    # The prompt tokenized alone (after BOS): the boundary falls between two tokens whatever the answer
    prompt = qdata.special_prefix(bpe) + ids(bpe, PROMPT + "\n")
    assert pair[0].input_ids[:len(prompt)].tolist() == prompt
    assert stats.examples == 2 and stats.kept == 1


def test_message_lists_render_with_the_chat_template_as_chat_sft_does(bpe):
    record = {"chosen": [*CHAT[:4], answer("A duck says quack.")], "rejected": [*CHAT[:4], answer("A duck says moo.")]}
    (pair,), _ = pairs([record], bpe)
    check_pair(pair, bpe, "A duck says quack.<|im_end|>\n", "A duck says moo.<|im_end|>\n")
    # The prompt is what chat SFT puts before the last answer; the earlier answer is not scored
    sft, _ = encode([{"messages": record["chosen"]}], bpe, format=DataFormat.chat)
    assert pair[0].input_ids.tolist() == sft[0].input_ids.tolist()


def test_prompt_given_apart_as_messages_or_text_equals_the_full_conversations(bpe):
    full = {"chosen": [USER, answer("A cow says moo.")], "rejected": [USER, answer("A cow says woof.")]}
    as_list = {"prompt": [USER], "chosen": [answer("A cow says moo.")], "rejected": [answer("A cow says woof.")]}
    as_text = {"prompt": PROMPT, "chosen": [answer("A cow says moo.")], "rejected": [answer("A cow says woof.")]}
    ultrafeedback = {"prompt": PROMPT, **full}  # the string prompt repeats the lists' user turn
    encoded = [pairs([r], bpe)[0][0] for r in (full, as_list, as_text, ultrafeedback)]
    for pair in encoded[1:]:
        assert [e.input_ids.tolist() for e in pair] == [e.input_ids.tolist() for e in encoded[0]]


def test_anthropic_hh_transcripts_split_at_the_last_assistant_turn(bpe):
    history = "\n\nHuman: What sound does a cow make?\n\nAssistant: A cow says moo.\n\nHuman: And a duck?\n\nAssistant:"
    (pair,), _ = pairs([{"chosen": history + " A duck says quack.", "rejected": history + " A duck says woof."}], bpe)
    check_pair(pair, bpe, " A duck says quack.", " A duck says woof.")


def test_column_names_are_mapped(bpe):
    columns = ColumnsConfig(prompt="question", chosen="good", rejected="bad")
    (pair,), _ = pairs([{"question": PROMPT, "good": "A cow says moo.", "bad": "A cow says woof."}], bpe,
                       columns=columns)
    check_pair(pair, bpe, "A cow says moo.", "A cow says woof.")


def test_truncation_keeps_the_whole_prompt_and_cuts_the_answers(bpe):
    prompt = PROMPT + "\n"
    n = len(qdata.special_prefix(bpe) + ids(bpe, prompt))
    record = {"prompt": prompt, "chosen": "A cow says moo. " * 10, "rejected": "A cow says woof."}
    short = len(ids(bpe, "A cow says woof.")) + 1  # with its EOS
    (pair,), stats = pairs([record], bpe, seq_len=n + short + 2)
    assert stats.truncated == 1
    assert [len(e) for e in pair] == [n + short + 2, n + short]
    assert pair[0].input_ids[:n].tolist() == qdata.special_prefix(bpe) + ids(bpe, prompt)
    assert pairs([GOOD, record], bpe, seq_len=n + short + 2, overlong=Overlong.drop)[1].dropped == 1
    with pytest.raises(QloraError, match="line 1: is .* tokens \\(prompt and longer answer\\), longer than "
                                         "train.seq_len"):
        pairs([record], bpe, seq_len=n + short + 2, overlong=Overlong.error)


GOOD = {"prompt": PROMPT, "chosen": "A cow says moo.", "rejected": "A cow says woof."}


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": PROMPT, "chosen": "  ", "rejected": "A cow says woof."}, "'chosen' is empty"),
    ({"prompt": PROMPT, "chosen": "A cow says moo."}, "'rejected' is missing"),
    ({"prompt": PROMPT, "chosen": "A cow says moo.", "rejected": "A cow says moo."},
     "'chosen' and 'rejected' are the same answer, so there is nothing to prefer"),
    ({"chosen": [USER, answer("moo")], "rejected": [{"role": "user", "content": "Hi"}, answer("woof")]},
     "'chosen' and 'rejected' diverge before their last assistant turn \\(message 0\\)"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
     "'chosen' and 'rejected' diverge before their last assistant turn, so they answer different prompts"),
    ({"chosen": "A cow says moo.", "rejected": "A cow says woof."}, "no 'prompt' field, and 'chosen' / 'rejected' "
                                                                   "are not Human / Assistant transcripts"),
    ({"chosen": [USER, answer("moo")], "rejected": "woof"},
     "'chosen' and 'rejected' must both be text or both be message lists \\(got list and str\\)"),
    ({"chosen": [USER], "rejected": [USER]}, "'chosen' has no assistant turn"),
    ({"prompt": "cow " * 300, "chosen": "moo", "rejected": "woof"}, "its prompt alone is .* tokens, filling "
                                                                     "train.seq_len=256"),
])
def test_bad_pairs_are_named_with_file_line_and_field(bpe, row, message):
    with pytest.raises(QloraError, match=f"^d.jsonl line 2: {message}.*; fix or remove those records"):
        pairs([GOOD, row], bpe, on_invalid=OnInvalid.error)


def test_message_lists_without_a_chat_template_are_refused(bpe):
    plain = bpe.__class__.from_pretrained(bpe.name_or_path) if bpe.name_or_path else None
    tokenizer = plain if plain is not None else bpe
    tokenizer.chat_template = None
    record = {"chosen": [USER, answer("moo")], "rejected": [USER, answer("woof")]}
    with pytest.raises(QloraError, match="message lists, and the tokenizer has no chat template.*data.chat_template"):
        pairs([GOOD, record], tokenizer, on_invalid=OnInvalid.error)


def test_pairs_batch_chosen_rows_first_with_their_reference_scores(bpe):
    rows = [GOOD, {"prompt": PROMPT, "chosen": "A cow says moo!", "rejected": "A dog says woof."}]
    examples, _ = encode(rows, bpe, format=DataFormat.preference)
    batch = qdata.PairCollator(bpe.pad_token_id, reference={0: (-1.0, -2.0), 1: (-3.0, -4.0)})(qdata.pairs(examples))
    assert batch["input_ids"].shape[0] == 4
    assert [batch["input_ids"][i, :len(e)].tolist() for i, e in enumerate(examples[0::2] + examples[1::2])] == \
        [e.input_ids.tolist() for e in examples[0::2] + examples[1::2]]
    assert batch["reference_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]
