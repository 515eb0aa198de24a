"""Preference objectives on the 4-bit base: each loss equals its closed form from per-token log-probs, DPO starts at
ln 2 with every reward 0, its reference is the base itself, and runs accumulate, precompute and resume exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qlora import data as qdata
from qlora import demo
from qlora.config import validate
from qlora.data.formats import resolve_chat_template
from qlora.errors import ConfigError
from qlora.loss import CausalLMLoss, loss_inputs
from qlora.metrics import read_metrics
from qlora.model import load_base_model, load_tokenizer
from qlora.objective import PreferenceLoss
from qlora.plan import plan
from qlora.report import read_run, summary_rows
from qlora.train import _setup_model, run
from tests.runs import preference, qlora_cli, run_differences, write_demo_pairs

CPU = torch.device("cpu")
LN2 = math.log(2)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_demo_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


@pytest.fixture
def pair_setup(tiny_config, pairs):
    """The tiny 4-bit model with LoRA attached, its B matrices random (so policy and reference differ), and the first
    training batch of 4 pairs."""

    def make(*overrides: str):
        config = tiny_config(*preference(pairs), "train.micro_batch_size=4", *overrides)
        demo.prepare_assets(config)
        tokenizer = load_tokenizer(config.model)
        data = qdata.load(config.data, tokenizer, seq_len=96, seed=0, cache_dir=None)
        loader, _ = qdata.loaders(data, config.data, micro_batch_size=4, seq_len=96, pad_id=tokenizer.pad_token_id,
                                  seed=0, num_workers=0)
        model, _, _ = _setup_model(config, CPU, memory_plan=None, fresh=True)
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        return config, model.train(), qdata.first_batch(loader)

    return make


def row_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its labelled tokens, from the model's full logits, and their count."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    trained = targets != qdata.IGNORE_INDEX
    per_token = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (per_token * trained).sum(-1), trained.sum(-1)


def closed_form(objective, c, r, nc, nr, c_ref, r_ref) -> tuple[float, float, float]:
    """One pair's loss and rewards, written out from the papers' definitions."""
    beta = objective.beta

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    name = objective.name.value
    if name == "dpo":
        h = (c - c_ref) - (r - r_ref)
        eps = objective.label_smoothing
        loss = {"sigmoid": -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h),
                "ipo": (h - 1 / (2 * beta)) ** 2, "hinge": max(0.0, 1 - beta * h)}[objective.loss_type.value]
        return loss, beta * (c - c_ref), beta * (r - r_ref)
    a, b = c / nc, r / nr
    if name == "orpo":
        odds = (a - math.log(1 - math.exp(a))) - (b - math.log(1 - math.exp(b)))
        return -a - beta * log_sigmoid(odds), beta * a, beta * b
    return -log_sigmoid(beta * (a - b) - objective.gamma), beta * a, beta * b


@pytest.mark.parametrize("overrides", [
    ["objective.loss_type=sigmoid"], ["objective.loss_type=sigmoid", "objective.label_smoothing=0.2"],
    ["objective.loss_type=ipo"], ["objective.loss_type=hinge", "objective.beta=0.5"],
    ["objective=orpo"], ["objective=simpo"],
], ids=["dpo-sigmoid", "dpo-smoothed", "dpo-ipo", "dpo-hinge", "orpo", "simpo"])
def test_each_objective_equals_its_closed_form(pair_setup, overrides):
    config, model, batch = pair_setup(*overrides)
    objective = config.objective
    with torch.no_grad():
        logps, counts = row_logps(model, batch)
        with model.disable_adapter():
            reference, _ = row_logps(model, batch)
    pairs = len(logps) // 2
    expected = [closed_form(objective, logps[i].item(), logps[pairs + i].item(), counts[i].item(),
                            counts[pairs + i].item(), reference[i].item(), reference[pairs + i].item())
                for i in range(pairs)]
    loss, reward_chosen, reward_rejected, accuracy, logps_chosen, logps_rejected = \
        PreferenceLoss(model, objective, chunk_tokens=0)(**loss_inputs(batch, CPU)).tolist()
    assert loss == pytest.approx(sum(e[0] for e in expected), rel=1e-6)
    assert reward_chosen == pytest.approx(sum(e[1] for e in expected), rel=1e-6, abs=1e-7)
    assert reward_rejected == pytest.approx(sum(e[2] for e in expected), rel=1e-6, abs=1e-7)
    assert accuracy == sum(1.0 if e[1] > e[2] else 0.5 if e[1] == e[2] else 0.0 for e in expected)
    assert logps_chosen == pytest.approx(logps[:pairs].sum().item(), rel=1e-6)
    assert logps_rejected == pytest.approx(logps[pairs:].sum().item(), rel=1e-6)
    assert all(e[1] != 0 and e[2] != 0 for e in expected), "the random adapter should move every reward off 0"


def test_chunked_scores_equal_the_full_logits_ones(pair_setup):
    config, model, batch = pair_setup()
    inputs = loss_inputs(batch, CPU)
    full = PreferenceLoss(model, config.objective, chunk_tokens=0)(**inputs)
    chunked = PreferenceLoss(model, config.objective, chunk_tokens=16)(**inputs)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    full[0].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    chunked[0].backward()
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_the_reference_is_the_base_with_the_adapter_disabled(pair_setup):
    """Exactly the log-probs of the same checkpoint loaded again on its own: no second copy is needed."""
    config, model, batch = pair_setup()
    inputs = loss_inputs(batch, CPU)
    reference = PreferenceLoss(model, config.objective, chunk_tokens=0).reference_logps(**inputs)
    base = load_base_model(config.model, config.quant, CPU).train()
    with torch.no_grad():
        separate, _ = CausalLMLoss(base, 0).sequence_logps(**inputs)
    assert torch.equal(reference, separate)


@pytest.mark.slow  # a training run
def test_dpo_starts_at_ln2_with_every_reward_zero(tiny_config, pairs, tmp_path):
    result = run(tiny_config(*preference(pairs), "train.max_steps=2", "train.eval_every_steps=2"))
    rows = read_metrics(result.output_dir)
    first_eval, first_step = rows[0], rows[1]
    assert first_eval["step"] == 0 and first_step["step"] == 1
    for row, prefix in ((first_eval, "eval_"), (first_step, "")):
        assert row[f"{prefix}loss"] == pytest.approx(LN2, abs=1e-6)
        assert row[f"{prefix}reward_chosen"] == row[f"{prefix}reward_rejected"] == row[f"{prefix}reward_margin"] == 0
        assert row[f"{prefix}reward_accuracy"] == 0.5  # every pair a tie
        assert row[f"{prefix}logps_chosen"] < 0 and row[f"{prefix}logps_rejected"] < 0
    # The report draws the reward panels and names the objective; the summary has the reward accuracy
    report = read_run(result.output_dir)
    assert ("eval reward accuracy", f"0.500 \u2192 {rows[-1]['eval_reward_accuracy']:.3f}") in summary_rows(report)
    assert (result.output_dir / "report.png").stat().st_size > 0


@pytest.mark.slow
def test_gradient_accumulation_equals_the_bigger_batch(tiny_config, pairs, tmp_path):
    # torch AdamW: an 8-bit state's quantization would turn last-bit differences into different updates
    common = [*preference(pairs), "train.max_steps=4", "train.eval_every_steps=0", "data.group_by_length=false",
              "train.report=false", "optim=adamw"]
    small = run(tiny_config(*common, "train.micro_batch_size=2", "train.grad_accum_steps=2",
                            output_dir=tmp_path / "small"))
    big = run(tiny_config(*common, "train.micro_batch_size=4", "train.grad_accum_steps=1", output_dir=tmp_path / "big"))
    for a, b in zip(read_metrics(small.output_dir), read_metrics(big.output_dir), strict=True):
        for key in ("loss", "logps_chosen", "logps_rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
        # A reward is beta x a difference of two float32 log-probs of about -30: good to beta x their last bits
        for key in ("reward_chosen", "reward_rejected"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    assert read_metrics(big.output_dir)[-1]["loss"] < LN2  # it trained


@pytest.mark.slow
def test_precomputed_and_in_step_references_give_the_same_losses(tiny_config, pairs, tmp_path, cache_dir):
    common = [*preference(pairs), "train.max_steps=4", "train.eval_every_steps=2", "train.report=false"]
    in_step = run(tiny_config(*common, output_dir=tmp_path / "in-step"))
    cached = set((cache_dir / "reference").glob("*.json")) if (cache_dir / "reference").is_dir() else set()
    pre = run(tiny_config(*common, "objective.precompute_reference=true", output_dir=tmp_path / "pre"))
    for a, b in zip(read_metrics(in_step.output_dir), read_metrics(pre.output_dir), strict=True):
        for key in ("loss", "eval_loss", "reward_margin", "eval_reward_margin"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    written = set((cache_dir / "reference").glob("*.json")) - cached
    assert len(written) == 2  # the train and the eval pairs, kept beside the token cache
    stored = json.loads(sorted(written)[0].read_text())
    assert all(c < 0 and r < 0 for c, r in stored.values())
    again = run(tiny_config(*common, "objective.precompute_reference=true", output_dir=tmp_path / "again"))
    assert run_differences(pre.output_dir, again.output_dir) == []


def test_a_preference_objective_needs_pairs_and_checks_its_keys(tiny_config, pairs):
    def problems(*overrides: str) -> str:
        with pytest.raises(ConfigError) as caught:
            validate(tiny_config(*overrides))
        return str(caught.value)

    assert "objective=dpo trains on preference pairs, but data.format=alpaca; set data.format=preference" in \
        problems("objective=dpo")
    assert "data.format=preference holds pairs" in problems("data.format=preference", f"data.path={pairs}")
    found = problems(*preference(pairs), "objective.beta=0", "data.packing=true", "train.neftune_alpha=5",
                     "objective.label_smoothing=0.6")
    for message in ("objective.beta must be > 0", "data.packing with objective=dpo",
                    "train.neftune_alpha with objective=dpo", "objective.label_smoothing must be in [0, 0.5)"):
        assert message in found
    assert "objective.precompute_reference applies to objective=dpo" in problems(
        *preference(pairs, "orpo"), "objective.precompute_reference=true")


def test_the_plan_counts_two_sequences_per_pair_and_the_reference_pass(tiny_config, pairs):
    sft = plan(tiny_config("train.micro_batch_size=4", "train.seq_len=96"), "cpu", checkpointed=0)
    dpo = plan(tiny_config(*preference(pairs), "train.micro_batch_size=4", "train.seq_len=96"), "cpu", checkpointed=0)
    pre = plan(tiny_config(*preference(pairs), "train.micro_batch_size=4", "train.seq_len=96",
                           "objective.precompute_reference=true"), "cpu", checkpointed=0)
    orpo = plan(tiny_config(*preference(pairs, "orpo"), "train.micro_batch_size=4", "train.seq_len=96"), "cpu",
                checkpointed=0)
    assert dpo.tokens == 2 * sft.tokens and dpo.activation_bytes == 2 * sft.activation_bytes
    assert dpo.reference_bytes > 0 and pre.reference_bytes == orpo.reference_bytes == 0
    assert dpo.total_bytes > pre.total_bytes
    assert dpo.largest_micro_batch(96) * 2 <= sft.largest_micro_batch(96) if sft.capacity_bytes else True


def test_cfg_job_shows_the_objective(tiny_config, pairs):
    config = tiny_config("objective=simpo", "data.format=preference", f"data.path={pairs}")
    assert (config.objective.name.value, config.objective.beta, config.objective.gamma) == ("simpo", 2.0, 1.0)
    demo.prepare_assets(config)  # the test's own cache, not a user's ~/.cache/qlora that `make demo` filled
    assert resolve_chat_template(config.data, load_tokenizer(config.model)) is None  # text pairs, no template


@pytest.mark.slow
def test_a_dpo_run_exports_generates_and_evaluates_like_any_run(tiny_config, pairs, tmp_path):
    result = run(tiny_config(*preference(pairs), "train.max_steps=3", "train.eval_every_steps=0",
                             "train.report=false"))
    export = qlora_cli("export", f"run_dir={result.output_dir}", f"output_dir={tmp_path / 'merged'}", cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "| objective | dpo (sigmoid, beta=0.1, label smoothing 0; reference: the base with the adapter disabled, " \
           "in each step) |" in card
    generated = qlora_cli("generate", f"run_dir={result.output_dir}", "prompt=What does a duck eat?",
                          "max_new_tokens=4", cwd=tmp_path)
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr
    scored = qlora_cli("eval", f"run_dir={result.output_dir}", f"output={tmp_path / 'eval.json'}", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["data"]["which"] == "eval split, chosen answers"
    assert report["data"]["sequences"] == 18  # the chosen answers of the held-out pairs (10% of 180 records)
    assert math.isfinite(report["results"][0]["perplexity"])
