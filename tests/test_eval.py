"""`qlora eval`: perplexity and mean token loss of a run, its base and a merged export, checked against the run's
own eval loss and against transformers' loss computed independently; bad inputs fail in one line."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora import data as qdata
from qlora.composition import compose_command
from qlora.config import EvalCommand, ExportCommand
from qlora.errors import QloraError
from qlora.evaluation import command_defaults, evaluate
from qlora.export import export
from qlora.runfolder import read_trained
from qlora.train import run
from tests.runs import qlora_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 30-step run of the default recipe on the tiny model, its eval split scored whole at the end."""
    from qlora.composition import compose_config
    from tests.runs import TINY

    root = tmp_path_factory.mktemp("eval")
    cache = root / "cache"
    config = compose_config([f"cache_dir={cache}", f"model.scratch.path={cache}/tiny128", *TINY,
                             f"output_dir={root / 'run'}", "train.max_steps=30", "train.eval_every_steps=30",
                             "train.eval_max_sequences=100000", "data.eval_fraction=0.1"])
    result = run(config)
    return root, result, config


def _eval(*args: str):
    args = list(args)
    return evaluate(compose_command(EvalCommand, args, command_defaults(args)), out=io.StringIO())


@pytest.mark.slow
def test_a_run_scores_its_own_eval_loss(trained, tmp_path):
    root, result, _ = trained
    report = _eval(f"run_dir={result.output_dir}", f"output={tmp_path / 'e.json'}")
    row = report.results[0]
    assert report.data["subset"] == "eval"
    assert row.score.mean_loss == pytest.approx(result.final_eval_loss, rel=1e-5)
    assert row.score.perplexity == pytest.approx(math.exp(result.final_eval_loss), rel=1e-5)
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["results"][0]["mean_loss"] == pytest.approx(row.score.mean_loss, rel=1e-12)
    assert saved["results"][0]["tokens"] == row.score.tokens > 0


@pytest.mark.slow
def test_the_score_does_not_depend_on_batching(trained, tmp_path):
    root, result, _ = trained
    one = _eval(f"run_dir={result.output_dir}", "batch_size=1", f"output={tmp_path / 'a.json'}").results[0].score
    many = _eval(f"run_dir={result.output_dir}", "batch_size=16", f"output={tmp_path / 'b.json'}").results[0].score
    assert (one.tokens, one.sequences) == (many.tokens, many.sequences)
    assert one.mean_loss == pytest.approx(many.mean_loss, rel=1e-5)


@pytest.mark.slow
def test_perplexity_is_exp_of_the_masked_loss_computed_independently(trained, tmp_path):
    """The base model scored by `qlora eval model=` against transformers' own loss, with the prompt masked by
    hand: every Alpaca record tokenized as prompt (not scored) + response + EOS (scored)."""
    root, result, config = trained
    base = config.model.name_or_path
    report = _eval(f"model={base}", f"data.path={config.data.path}", "max_sequences=40", "batch_size=5",
                   f"output={tmp_path / 'e.json'}")
    row = report.results[0]
    assert report.data["subset"] == "all" and row.score.sequences == 40

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    records = [json.loads(line) for line in open(config.data.path)][:40]  # the first 40, as max_sequences takes
    nll = tokens = 0.0
    with torch.no_grad():
        for r in records:
            prompt = tokenizer(qdata.alpaca_prompt(r["instruction"], r.get("input", "")))["input_ids"]
            answer = tokenizer(r["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + answer])
            labels = torch.tensor([[-100] * len(prompt) + answer])
            loss = model(input_ids=ids, labels=labels).loss.item()  # mean over the answer's tokens
            nll += loss * len(answer)
            tokens += len(answer)
    assert row.score.tokens == tokens
    assert row.score.mean_loss == pytest.approx(nll / tokens, rel=1e-5)
    assert row.score.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)


@pytest.mark.slow
def test_base_row_is_the_quantized_base_without_the_adapter(trained, tmp_path):
    root, result, config = trained
    report = _eval(f"run_dir={result.output_dir}", "base=true", f"output={tmp_path / 'a.json'}")
    tuned, base = (r.score for r in report.results)
    assert report.results[1].adapter is None and report.results[1].quant == "nf4-dq"
    split = [f"data.path={config.data.path}", "data.eval_fraction=0.1", "subset=eval"]  # the run's eval split
    alone = _eval(f"model={config.model.name_or_path}", "quant=nf4-dq", *split,
                  f"output={tmp_path / 'b.json'}").results[0].score
    assert base.mean_loss == pytest.approx(alone.mean_loss, rel=1e-5)
    assert tuned.mean_loss < base.mean_loss - 0.5  # 30 steps on the demo facts teach a lot
    unquantized = _eval(f"model={config.model.name_or_path}", *split, f"output={tmp_path / 'c.json'}").results[0].score
    assert unquantized.mean_loss != alone.mean_loss  # quant= really loads the base quantized


@pytest.mark.slow
def test_a_merged_export_scores_like_the_run(trained, tmp_path):
    root, result, config = trained
    export(compose_command(ExportCommand, [f"run_dir={result.output_dir}", f"output_dir={tmp_path / 'x'}",
                                           "export.dtype=float32", "export.compare_original=false"]))
    merged = _eval(f"model={tmp_path / 'x'}", f"data.path={config.data.path}", "data.eval_fraction=0.1",
                   "subset=eval", f"output={tmp_path / 'a.json'}").results[0].score
    assert merged.mean_loss == pytest.approx(result.final_eval_loss, rel=1e-4)


@pytest.mark.slow
def test_subsets_and_limits(trained, tmp_path):
    root, result, config = trained
    run_dir = f"run_dir={result.output_dir}"
    everything = _eval(run_dir, "subset=all", f"output={tmp_path / 'a.json'}")
    held_out = _eval(run_dir, "subset=eval", f"output={tmp_path / 'b.json'}")
    train = _eval(run_dir, "subset=train", f"output={tmp_path / 'c.json'}")
    assert everything.results[0].score.sequences == held_out.results[0].score.sequences + \
        train.results[0].score.sequences
    assert everything.results[0].score.tokens == held_out.results[0].score.tokens + train.results[0].score.tokens
    other_data = _eval(run_dir, "data.eval_fraction=0.5", f"output={tmp_path / 'd.json'}")
    assert other_data.data["subset"] == "all"  # not the run's own data: every sequence
    limited = _eval(run_dir, "max_sequences=3", f"output={tmp_path / 'e.json'}")
    assert limited.results[0].score.sequences == 3


@pytest.mark.slow
def test_text_data_scores_every_token_in_seq_len_windows(trained, tmp_path):
    root, result, config = trained
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(["a cow says moo ."] * 30)}) + "\n" for _ in range(2)))
    report = _eval(f"model={config.model.name_or_path}", f"data.path={text}", "data.format=text", "seq_len=32",
                   f"output={tmp_path / 'a.json'}")
    score = report.results[0].score
    tokenizer = AutoTokenizer.from_pretrained(config.model.name_or_path)
    per_doc = len(tokenizer(" ".join(["a cow says moo ."] * 30))["input_ids"]) + 1  # + EOS
    windows = math.ceil(per_doc / 32)
    assert score.sequences == 2 * windows
    assert score.tokens == 2 * (per_doc - windows)  # each window's first token is predicted from nothing


@pytest.mark.slow
def test_cli_prints_a_table_and_writes_json(trained, tmp_path):
    root, result, _ = trained
    out = tmp_path / "eval.json"
    done = qlora_cli("eval", f"run_dir={result.output_dir}", "base=true", f"output={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "perplexity" in done.stdout and "base (no adapter)" in done.stdout
    rows = json.loads(out.read_text())["results"]
    assert [r["name"] for r in rows][1] == "base (no adapter)"
    for r in rows:
        assert f"{r['perplexity']:.3f}" in done.stdout


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of run_dir"),
    (["model=M", "run_dir=R"], "give exactly one of run_dir"),
    (["model={base}", "data.path={data}", "base=true"], "base=true compares a run with its base"),
    (["run_dir={run}", "quant=nf5"], "quant=nf5 is not a quant option; choose one of: fp4, fp4-dq"),
    (["model={base}"], "data.path: value is required"),
    (["model={base}", "data.path=missing.json"], "data.path: missing.json does not exist"),
    (["model={base}", "data.path={data}", "output={tmp}"], "is a folder"),
    (["model={base}", "data.path={data}", "subset=eval", "data.eval_fraction=0"], "has no eval split"),
    (["model={tmp}", "data.path={data}"], "is not a model folder"),
    (["run_dir={tmp}"], "holds no finished run"),
    (["run_dir={run}", "batch_size=0"], "batch_size must be > 0"),
    (["model={base}", "data.path={data}", "seq_len=100000"], "is longer than"),
    (["run_dir={run}", "bogus=1"], "unknown config key 'bogus'"),
])
@pytest.mark.slow
def test_bad_inputs_fail_in_one_line_and_write_nothing(trained, tmp_path, args, message):
    root, result, config = trained
    args = [a.format(base=config.model.name_or_path, data=config.data.path, run=result.output_dir, tmp=tmp_path)
            for a in args]
    if not any(a.startswith("output=") for a in args):
        args.append(f"output={tmp_path / 'out.json'}")
    with pytest.raises(QloraError, match=message):
        _eval(*args)
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_cli_error_is_one_line_with_exit_status_2(tmp_path):
    done = qlora_cli("eval", "model=nowhere/none", "data.path=missing.json", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.slow
def test_the_eval_command_reads_the_runs_data_settings(trained):
    root, result, config = trained
    cmd = compose_command(EvalCommand, [f"run_dir={result.output_dir}"],
                          command_defaults([f"run_dir={result.output_dir}"]))
    assert cmd.data == read_trained(str(result.output_dir)).config.data == config.data
