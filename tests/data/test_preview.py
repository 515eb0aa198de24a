"""`qlora data preview` shows what will be trained, and data errors reach the user as one line."""

from __future__ import annotations

import json
import re

import pytest

from tests.runs import TINY, qlora_cli

pytestmark = pytest.mark.slow  # each test runs `python -m qlora data preview` (seconds of imports)


def preview(tmp_path, *overrides, env=None):
    cache = tmp_path / "cache"
    return qlora_cli("data", "preview", *TINY, f"cache_dir={cache}", f"model.scratch.path={cache}/m",
                     f"output_dir={tmp_path}/out", *overrides, cwd=tmp_path, env=env)


def test_preview_marks_trained_tokens_and_reports_lengths_counts_and_padding(tmp_path):
    result = preview(tmp_path, "samples=2", "train.seq_len=96")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("--- sample ") == 2
    # the answer and its EOS are marked, and nothing before them (the demo's word-level tokenizer drops newlines)
    assert len(re.findall(r"# Response :\[\[A [a-z]+ [a-z]+ (in a )?[a-z]+\. </s>\]\]\n", out)) == 2
    assert out.count("[[") == 1 + 2  # the legend, then one marked run per sample
    assert "180 records -> 180 kept" in out and "162 train / 18 eval" in out
    assert "length histogram" in out and "packed into 96-token rows" in out
    assert not (tmp_path / "out").exists()  # a preview writes no run


def test_data_errors_are_one_line_with_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "a"}) + "\n")
    cases = {
        f"data.path={bad}": "bad.jsonl line 2: 'output' is missing",
        f"data.path={tmp_path}/missing.jsonl": "missing.jsonl does not exist",
        "data.chat_template=nonsense": "data.chat_template=nonsense is neither a built-in template",
    }
    for override, message in cases.items():
        extra = ["data.format=chat", f"data.path={bad}"] if "chat_template" in override else []
        result = preview(tmp_path, override, "data.generate_demo=false", *extra)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qlora: ") and message in lines[0], result.stderr


def test_a_hub_dataset_without_network_is_one_line(tmp_path):
    result = preview(tmp_path, "data.path=no-such-user/no-such-dataset", "data.generate_demo=false",
                     env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 2
    assert "could not load this hub dataset" in result.stderr and "Traceback" not in result.stderr
