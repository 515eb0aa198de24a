"""Each data format renders and masks right on token ids; EOS is trained; every bad record is named."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qlora import data as qdata
from qlora.config import ColumnsConfig, DataConfig, DataFormat, OnInvalid, Overlong, RolesConfig
from qlora.data.formats import resolve_chat_template
from qlora.demo import build_demo_tokenizer
from qlora.errors import QloraError
from tests.data.conftest import CHAT

IGNORE = qdata.IGNORE_INDEX

def encode(rows, tokenizer, seq_len=256, **settings):
    cfg = DataConfig(path="d.jsonl", **settings)
    source = qdata.Source("d.jsonl", rows, lines=list(range(1, len(rows) + 1)))
    return qdata.encode(source, cfg, tokenizer, resolve_chat_template(cfg, tokenizer), seq_len)


def trained_text(example, tokenizer) -> list[str]:
    """The decoded runs of trained tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids.tolist(), [IGNORE, *example.labels[1:].tolist()], strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- alpaca -------------------------------------------------------------------------------------------------


def test_alpaca_trains_only_the_response_and_its_eos(bpe):
    record = {"instruction": "What sound does a cow make?", "input": "", "output": "A cow says moo."}
    [example], stats = encode([record], bpe)
    prompt = [bpe.bos_token_id] + ids(bpe, qdata.alpaca_prompt(record["instruction"]))
    response = ids(bpe, record["output"])
    assert example.input_ids.tolist() == prompt + response + [bpe.eos_token_id]
    assert example.labels.tolist() == [IGNORE] * len(prompt) + response + [bpe.eos_token_id]
    assert trained_text(example, bpe) == ["A cow says moo.</s>"]
    assert (stats.kept, stats.truncated, stats.dropped, stats.skipped) == (1, 0, 0, 0)


def test_alpaca_with_input_puts_it_in_the_prompt(bpe):
    record = {"instruction": "Say what the animal says.", "input": "a duck", "output": "quack"}
    [example], _ = encode([record], bpe)
    text = bpe.decode(example.input_ids.tolist())
    assert "### Input:\na duck\n\n### Response:\nquack</s>" in text
    assert trained_text(example, bpe) == ["quack</s>"]


def test_train_on_prompt_trains_everything(bpe):
    [example], _ = encode([{"instruction": "What does a cow eat?", "output": "A cow eats grass."}], bpe,
                          train_on_prompt=True)
    assert example.labels[1:].tolist() == example.input_ids[1:].tolist()


def test_column_mapping_reads_other_field_names(bpe):
    plain = {"instruction": "What does a cow eat?", "output": "A cow eats grass."}
    renamed = {"question": plain["instruction"], "answer": plain["output"]}
    [a], _ = encode([plain], bpe)
    [b], _ = encode([renamed], bpe, columns=ColumnsConfig(instruction="question", output="answer"))
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()


# --- chat ---------------------------------------------------------------------------------------------------


def test_chat_trains_every_assistant_turn_and_no_user_turn(bpe):
    [example], _ = encode([{"messages": CHAT}], bpe, format=DataFormat.chat)
    rendered = bpe.apply_chat_template(CHAT, tokenize=False)
    assert bpe.decode(example.input_ids.tolist()) == rendered + "</s>"
    # ChatML's end-of-turn marker is trained with each answer; EOS follows the last one.
    assert trained_text(example, bpe) == ["A cow says moo.<|im_end|>\n", "A duck says quack.<|im_end|>\n</s>"]


def test_sharegpt_layout_equals_openai_layout(bpe):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]
    [a], _ = encode([{"messages": CHAT}], bpe, format=DataFormat.chat)
    [b], _ = encode([{"conversations": sharegpt}], bpe, format=DataFormat.chat)
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()


def test_chat_field_and_role_names_are_configurable(bpe):
    dialog = [{"speaker": {"system": "narrator", "user": "farmer", "assistant": "bot"}[m["role"]],
               "text": m["content"]} for m in CHAT]
    [a], _ = encode([{"messages": CHAT}], bpe, format=DataFormat.chat)
    [b], _ = encode([{"dialog": dialog}], bpe, format=DataFormat.chat,
                    columns=ColumnsConfig(messages="dialog", role="speaker", content="text"),
                    roles=RolesConfig(system=["narrator"], user=["farmer"], assistant=["bot"]))
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()


def test_named_template_when_the_tokenizer_has_none(bpe):
    tokenizer = build_demo_tokenizer()  # no chat template
    with pytest.raises(QloraError, match="has no chat template; set data.chat_template"):
        encode([{"messages": CHAT}], tokenizer, format=DataFormat.chat)
    # (this small vocabulary spells the Llama 3 markers out in many tokens, hence the long seq_len)
    [example], _ = encode([{"messages": CHAT}], bpe, seq_len=1024, format=DataFormat.chat, chat_template="llama3")
    assert trained_text(example, bpe) == ["A cow says moo.<|eot_id|>", "A duck says quack.<|eot_id|></s>"]


def test_chat_template_set_on_the_tokenizer_is_saved_with_it(bpe, tmp_path):
    bpe.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    qdata.use_chat_template(DataConfig(path="d", format=DataFormat.chat, chat_template="llama3"), reloaded)
    reloaded.save_pretrained(tmp_path / "saved")
    assert "<|eot_id|>" in AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template


def test_a_template_that_renders_no_assistant_turn_is_refused(bpe):
    users_only = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    with pytest.raises(QloraError, match="line 1: the chat template renders no assistant turn"):
        encode([{"messages": CHAT}], bpe, format=DataFormat.chat, chat_template=users_only)


def test_a_template_that_rewrites_earlier_turns_is_refused(bpe):
    last_only = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(QloraError, match="renders earlier turns differently"):
        encode([{"messages": CHAT}], bpe, format=DataFormat.chat, chat_template=last_only)


def test_messages_after_the_last_answer_are_left_out(bpe):
    [a], _ = encode([{"messages": CHAT}], bpe, format=DataFormat.chat)
    [b], _ = encode([{"messages": [*CHAT, {"role": "user", "content": "Thanks!"}]}], bpe, format=DataFormat.chat)
    assert a.input_ids.tolist() == b.input_ids.tolist()


# --- text ---------------------------------------------------------------------------------------------------


def test_text_format_trains_every_token_in_windows(bpe):
    text = " ".join(["A cow says moo."] * 20)
    examples, stats = encode([{"text": text}], bpe, seq_len=32, format=DataFormat.text)
    expected = [bpe.bos_token_id] + ids(bpe, text) + [bpe.eos_token_id]
    assert sum((e.input_ids.tolist() for e in examples), []) == expected
    assert [len(e) for e in examples[:-1]] == [32] * (len(examples) - 1)
    assert all(e.labels.tolist() == e.input_ids.tolist() for e in examples[1:])
    assert examples[0].labels[0] == IGNORE and stats.examples == len(examples) > 1


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("row", "settings", "message"), [
    ({"instruction": "a"}, {}, "line 2: 'output' is missing"),
    ({"instruction": "a", "output": "  "}, {}, "line 2: 'output' is empty"),
    ({"instruction": "a", "output": 3}, {}, "line 2: 'output' is a int, expected text"),
    ({"instruction": "a", "input": ["x"], "output": "b"}, {}, "line 2: 'input' is a list, expected text"),
    ({"body": "x"}, {"format": DataFormat.text}, "line 2: 'text' is missing"),
    ({"messages": [{"role": "user", "content": "hi"}]}, {"format": DataFormat.chat}, "line 2: 'messages' has no "
                                                                                      "assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, {"format": DataFormat.chat}, "line 2: 'messages'\\[0\\]"
                                                                                      ".role is 'robot'"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
     {"format": DataFormat.chat}, r"line 2: 'messages'\[0\].content is missing or empty"),
    ({"messages": []}, {"format": DataFormat.chat}, "line 2: 'messages' must be a non-empty list"),
    ({"chat": []}, {"format": DataFormat.chat}, "line 2: no 'messages' \\(or 'conversations'\\) field"),
])
def test_bad_records_are_named_with_file_line_and_field(bpe, row, settings, message):
    good = ({"messages": CHAT} if settings.get("format") == DataFormat.chat
            else {"text": "A cow says moo."} if settings.get("format") == DataFormat.text
            else {"instruction": "a", "output": "b"})
    with pytest.raises(QloraError, match=f"^d.jsonl {message}.*; fix or remove those records"):
        encode([good, row], bpe, on_invalid=OnInvalid.error, **settings)


def test_every_bad_record_is_counted_and_a_few_are_skipped(bpe):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a"}, {"instruction": "c", "output": "d"},
            {"instruction": "a", "output": ""}]
    with pytest.raises(QloraError, match=r"line 2: 'output' is missing \(and 1 more: line 4\).*on_invalid=skip"):
        encode(rows, bpe, on_invalid=OnInvalid.error)
    # Half the records bad is a wrong format or mapping, not a few typos: the default refuses it too.
    with pytest.raises(QloraError, match=r"line 2: 'output' is missing \(and 1 more: line 4\); that is 50.0% of "
                                         r"its records, more than data.max_invalid_fraction=0.01"):
        encode(rows, bpe)
    examples, stats = encode(rows, bpe, max_invalid_fraction=0.5)
    assert [e.record for e in examples] == [0, 2]
    assert stats.skipped == 2 and stats.skipped_why == ["line 2: 'output' is missing", "line 4: 'output' is empty"]
    many = [{"instruction": f"q{i}", "output": "a"} for i in range(200)] + rows[1:2] + rows[3:]
    examples, stats = encode(many, bpe)  # 2 of 202 is 0.99%: skipped by default, each one named
    assert len(examples) == 200
    assert stats.skipped_why == ["line 201: 'output' is missing", "line 202: 'output' is empty"]


def test_overlong_samples_are_truncated_dropped_or_refused_and_counted(bpe):
    rows = [{"instruction": "What does a cow eat?", "output": "A cow eats grass. " * 20},
            {"instruction": "What does a cow eat?", "output": "Grass."}]
    short = len(encode(rows[1:], bpe)[0][0])
    examples, stats = encode(rows, bpe, seq_len=short + 4)
    assert stats.truncated == 1 and [len(e) for e in examples] == [short + 4, short]
    assert examples[0].labels[-1] != bpe.eos_token_id  # cut short: no EOS to learn
    examples, stats = encode(rows, bpe, seq_len=short + 4, overlong=Overlong.drop)
    assert stats.dropped == 1 and [e.record for e in examples] == [1]
    with pytest.raises(QloraError, match=r"line 1: is \d+ tokens, longer than train.seq_len=\d+; raise"):
        encode(rows, bpe, seq_len=short + 4, overlong=Overlong.error)


def test_a_prompt_that_fills_seq_len_leaves_nothing_to_train_and_is_dropped(bpe):
    rows = [{"instruction": "What does a cow eat? " * 30, "output": "Grass."},
            {"instruction": "Cow?", "output": "Moo."}]
    seq_len = len(encode(rows[1:], bpe)[0][0])
    examples, stats = encode(rows, bpe, seq_len=seq_len)
    assert stats.dropped == 1 and [e.record for e in examples] == [1]
    with pytest.raises(QloraError, match="no trainable samples"):
        encode(rows[:1], bpe, seq_len=seq_len)


def test_eos_stays_trained_when_pad_is_eos(bpe):
    rows = [{"instruction": "Cow?", "output": "A cow says moo."}, {"instruction": "Duck?", "output": "Quack."}]
    examples, _ = encode(rows, bpe)
    batch = qdata.Collator(pad_id=bpe.eos_token_id, packed=False)(qdata.unpacked(examples))
    for row, example in enumerate(examples):
        n = len(example)
        assert batch["labels"][row, n - 1] == bpe.eos_token_id  # the real EOS: trained
        assert (batch["labels"][row, n:] == IGNORE).all()  # padding with the same id: not trained
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)


# --- reading ------------------------------------------------------------------------------------------------


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": \n')
    with pytest.raises(QloraError, match=r"d.jsonl: line 3 is not valid JSON"):
        qdata.read_source(str(path), "train")


def test_jsonl_rows_are_named_by_line_even_after_blank_lines(tmp_path, bpe):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n')
    source = qdata.read_source(str(path), "train")
    with pytest.raises(QloraError, match=r"d.jsonl line 3: 'output' is missing"):
        qdata.encode(source, DataConfig(path=str(path), on_invalid=OnInvalid.error), bpe, None, 64)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_csv_and_parquet_give_the_same_samples_as_json(tmp_path, bpe, suffix):
    from datasets import Dataset

    rows = [{"messages": json.dumps(CHAT)}, {"messages": json.dumps(CHAT[:3])}]
    path = tmp_path / f"d.{suffix}"
    getattr(Dataset.from_list(rows), f"to_{suffix}")(str(path))
    cfg = DataConfig(path=str(path), format=DataFormat.chat)
    examples, _ = qdata.encode(qdata.read_source(str(path), "train"), cfg, bpe, bpe.chat_template, 256)
    expected, _ = encode([{"messages": CHAT}, {"messages": CHAT[:3]}], bpe, format=DataFormat.chat)
    assert [e.input_ids.tolist() for e in examples] == [e.input_ids.tolist() for e in expected]


@pytest.mark.slow
def test_reads_the_shared_alpaca_sample(bpe):
    from tests.runs import ALPACA_5000

    path = ALPACA_5000
    if not path.is_file():
        pytest.skip("../shared/data/alpaca_5000.json is not beside this checkout")
    source = qdata.read_source(str(path), "train")
    assert len(source.rows) == 5000 and {"instruction", "input", "output"} <= set(source.rows[0])
    with pytest.raises(QloraError, match="record 2336: 'output' is empty \\(and 1 more: record 4659\\)"):
        qdata.encode(source, DataConfig(path=str(path), on_invalid=OnInvalid.error), bpe, None, 512)
    with_input = sum(bool(r["input"]) for r in source.rows)
    examples, stats = qdata.encode(source, DataConfig(path=str(path)), bpe, None, 512)  # the default skips the two
    assert stats.skipped_why == ["record 2336: 'output' is empty", "record 4659: 'output' is empty"]
    assert stats.kept == 4998 - stats.dropped and 0 < with_input < 5000
    assert all(np.any(e.labels != IGNORE) for e in examples)


def _alpaca_file(tmp_path, lengths: list[int]) -> str:
    """An Alpaca file whose records' outputs are `n` words long, for each n in `lengths`."""
    path = tmp_path / "lengths.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {n} words.", "output": " ".join(["moo"] * n)}) + "\n"
                            for n in lengths))
    return str(path)


@pytest.mark.slow
def test_seq_len_auto_holds_99_percent_of_the_samples_capped_by_the_model(tmp_path, bpe, tiny_config):
    lengths = [8] * 297 + [150, 160, 1000]  # 3 long outliers of 300: 1% may be cut
    config = tiny_config("train.seq_len=auto", f"data.path={_alpaca_file(tmp_path, lengths)}", "data.cache=false")
    tokenized = sorted(len(e) for e in qdata.encode(qdata.read_source(config.data.path, "train"), config.data, bpe,
                                                    None, 100_000)[0])
    covering = tokenized[math.ceil(0.99 * len(tokenized)) - 1]  # the 297th shortest
    chosen = qdata.with_seq_len(config, bpe, positions=4096).train.seq_len
    assert chosen % 64 == 0 and chosen - 64 < covering <= chosen
    positions = tokenized[0] + 3  # never past the model's positions, even when that cuts most samples
    assert qdata.with_seq_len(config, bpe, positions=positions).train.seq_len == positions
    fixed = tiny_config("train.seq_len=96")
    assert qdata.with_seq_len(fixed, bpe, positions=4096) is fixed  # a number is kept as given


def test_held_out_samples_are_prompts_as_trained_with_their_answers(tmp_path, bpe):
    rows = [{"instruction": f"What does animal {i} say?", "input": "In one word." if i % 2 else "",
             "output": f"Sound {i}."} for i in range(40)]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(path=str(path), eval_fraction=0.25, cache=False)
    data = qdata.load(cfg, bpe, seq_len=256, seed=42, cache_dir=None)
    samples = qdata.held_out_samples(data, cfg, 3)
    assert len(samples) == 3
    for sample, example in zip(samples, data.eval, strict=False):
        record = rows[example.record]
        assert sample.prompt == record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        assert sample.reference == record["output"]
        start = int(np.flatnonzero(example.labels != IGNORE)[0])  # the prompt is everything before the answer
        assert sample.ids == example.input_ids[:start].tolist()
        assert bpe.decode(example.input_ids[start:]).startswith(record["output"])
    assert qdata.held_out_samples(data, DataConfig(path=str(path), format=DataFormat.text), 3) == []  # no prompts
