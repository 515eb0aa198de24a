"""End to end on a tiny model: it learns, only LoRA trains, and the saved run is what the contract says."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from omegaconf import OmegaConf

from qlora.metrics import read_metrics
from qlora.model import load_base_model, load_tokenizer
from qlora.train import run
from tests.runs import TINY, compose, qlora_cli

pytestmark = pytest.mark.slow  # every test trains the tiny model end to end

STEPS = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    config = compose(root / "cache", root / "run", f"train.max_steps={STEPS}", "train.eval_every_steps=20",
                     "train.log_every_steps=5", "train.micro_batch_size=8", "train.grad_accum_steps=2")
    return config, run(config)


def test_loss_falls(trained):
    _, result = trained
    rows = read_metrics(result.output_dir)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 3  # step 0, 20, 40
    assert losses[-1] < 0.75 * losses[0], losses
    assert evals[-1] < 0.75 * evals[0], evals
    assert result.first_eval_loss == evals[0] and result.final_eval_loss == evals[-1]


def test_run_folder_contract(trained):
    config, result = trained
    out = result.output_dir
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.lora.r == config.lora.r and saved.output_dir == str(out)
    assert "${" not in (out / "config.yaml").read_text()  # fully resolved
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    for r in train_rows:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(r) and r["tokens_per_s"] > 0
    assert all(set(r) == {"step", "eval_loss"} for r in rows if "eval_loss" in r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["tokens_trained"] > 0


def test_only_lora_trains_and_base_stays_bit_identical(trained):
    config, result = trained
    fresh = load_base_model(config.model, config.quant, torch.device("cpu"))
    trained_base = result.model.get_base_model()
    fresh_linears = {n: m for n, m in fresh.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    checked = 0
    for name, module in trained_base.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            ref = fresh_linears[name.replace(".base_layer", "")]
            assert torch.equal(module.weight.data, ref.weight.data)
            assert torch.equal(module.weight.quant_state.absmax, ref.weight.quant_state.absmax)
            assert torch.equal(module.weight.quant_state.state2.absmax, ref.weight.quant_state.state2.absmax)
            checked += 1
    assert checked == len(fresh_linears) > 0
    fresh_params = dict(fresh.named_parameters())
    for name, p in trained_base.named_parameters():
        if "lora_" not in name:
            assert not p.requires_grad
            ref = fresh_params[name.replace(".base_layer", "")]
            assert torch.equal(p.data, ref.data), name
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: nonzero means it trained


def test_optimizer_is_paged_adamw_8bit_with_8bit_state(trained):
    _, result = trained
    assert type(result.optimizer) is bnb.optim.PagedAdamW8bit
    states = list(result.optimizer.state.values())
    assert states and all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in states)


def test_adapter_loads_with_plain_peft_and_gives_the_same_logits(trained):
    from peft import PeftModel

    config, result = trained
    tokenizer = load_tokenizer(config.model)
    base = load_base_model(config.model, config.quant, torch.device("cpu"))
    reloaded = PeftModel.from_pretrained(base, str(result.output_dir / "adapter")).eval()
    batch = tokenizer(["What sound does a cow make?", "Where does a duck live?"], return_tensors="pt", padding=True)
    result.model.eval()
    with torch.no_grad():
        expected = result.model(**batch).logits
        actual = reloaded(**batch).logits
    assert torch.equal(actual, expected)
    with torch.no_grad():
        without_adapter = load_base_model(config.model, config.quant, torch.device("cpu"))(**batch).logits
    assert (without_adapter - expected).abs().max() > 1.0  # and the adapter is what makes the difference


def test_seeded_runs_are_identical(tmp_path, trained):
    config, result = trained
    again = compose(tmp_path / "cache", tmp_path / "run", f"train.max_steps={STEPS}", "train.eval_every_steps=20",
                    "train.log_every_steps=5", "train.micro_batch_size=8", "train.grad_accum_steps=2")
    run(again)

    def losses(d):
        return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(d)]

    assert losses(tmp_path / "run") == losses(result.output_dir)


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    # Loss is weighted by trained tokens across the micro batches of a step, so 2 x 4 == 1 x 8 (ungrouped
    # batches, so that both see the same samples in each step).
    runs = {}
    for micro, accum in ((8, 1), (4, 2)):
        out = tmp_path / f"{micro}x{accum}"
        run(compose(tmp_path / "cache", out, "train.max_steps=3", "train.eval_every_steps=0", "train.log_every_steps=1",
                    f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}", "train.sample_prompts=[]",
                    "data.group_by_length=false"))
        runs[micro] = [r["loss"] for r in read_metrics(out)]
    assert runs[8] == pytest.approx(runs[4], rel=1e-4)


@pytest.mark.parametrize("quant", ["nf4", "fp4-dq", "int8", "none"])
def test_every_quant_mode_trains(tmp_path, quant):
    out = tmp_path / "run"
    result = run(compose(tmp_path / "cache", out, f"quant={quant}", "train.max_steps=4", "train.eval_every_steps=0",
                         "train.log_every_steps=1", "train.sample_prompts=[]", "optim=adamw_8bit"))
    losses = [r["loss"] for r in read_metrics(out)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)


def test_cli_default_recipe_end_to_end(tmp_path):
    out = tmp_path / "runs" / "a"
    result = qlora_cli("train", *TINY, f"cache_dir={tmp_path}/cache", f"model.scratch.path={tmp_path}/cache/m",
                       "train.max_steps=8", "train.eval_every_steps=4", f"output_dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval loss" in result.stdout and "sample: What sound does a cow make?" in result.stdout
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "adapter", "tokenizer", "metrics.jsonl", "train.log", "samples.json"} <= names
    assert "Traceback" not in result.stderr


def test_cli_multirun_gives_each_run_its_own_folder(tmp_path):
    out = tmp_path / "sweep"
    result = qlora_cli("train", "-m", "lora.r=4,8", *TINY, f"cache_dir={tmp_path}/cache",
                       f"model.scratch.path={tmp_path}/cache/m", "train.max_steps=2", "train.eval_every_steps=0",
                       "train.sample_prompts=[]", f"output_dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name.split(",")[0] for p in runs] == ["0_lora.r=4", "1_lora.r=8"]
    for p, r in zip(runs, (4, 8), strict=True):
        assert json.loads((p / "adapter" / "adapter_config.json").read_text())["r"] == r
        assert OmegaConf.load(p / "config.yaml").output_dir == str(p)


def write_chat_data(path: Path) -> None:
    """Two-turn conversations about the demo animals (ShareGPT layout)."""
    from qlora.demo import demo_records

    records = demo_records()
    rows = [{"conversations": [{"from": "human", "value": a["instruction"]}, {"from": "gpt", "value": a["output"]},
                               {"from": "human", "value": b["instruction"]}, {"from": "gpt", "value": b["output"]}]}
            for a, b in zip(records[0::2], records[1::2], strict=True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_packed_chat_run_learns_and_saves_its_template(tmp_path):
    chat = tmp_path / "chat.jsonl"
    write_chat_data(chat)
    out = tmp_path / "run"
    result = run(compose(tmp_path / "cache", out, "model=tiny-llama-bpe", f"model.scratch.path={tmp_path}/cache/bpe",
                         "model.scratch.tokenizer_vocab_size=512", f"data.path={chat}", "data.format=chat",
                         "data.generate_demo=false", "data.packing=true", "train.seq_len=256",
                         "train.micro_batch_size=2", "train.max_steps=12", "train.eval_every_steps=12",
                         "train.log_every_steps=1", "train.sample_prompts=[What sound does a cow make?]",
                         "train.max_new_tokens=4"))
    assert result.final_eval_loss < 0.9 * result.first_eval_loss
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert all(r["tokens_seen"] > 0 for r in rows)
    saved = (out / "tokenizer" / "tokenizer_config.json").read_text() + \
        "".join(p.read_text() for p in (out / "tokenizer").glob("*.jinja"))
    assert "<|im_start|>" in saved  # the chat template it was trained with travels with the run
    assert result.samples[0]["prompt"] == "What sound does a cow make?"


def test_tiny_alpaca_recipe_trains_on_the_shared_sample(tmp_path):
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_5000.json"
    if not shared.is_file():
        pytest.skip("../shared/data/alpaca_5000.json is not beside this checkout")
    subset = tmp_path / "alpaca_400.json"
    subset.write_text(json.dumps(json.loads(shared.read_text())[:400]))
    out = tmp_path / "run"
    result = run(compose(tmp_path / "cache", out, "recipe=tiny-alpaca", f"model.scratch.path={tmp_path}/cache/bpe",
                         f"data.path={subset}", "data.eval_fraction=0.05", "train.max_steps=15",
                         "train.eval_every_steps=15", "train.sample_prompts=[]"))
    assert result.final_eval_loss < 0.95 * result.first_eval_loss
