"""A real pretrained model by default: SmolLM2-135M-Instruct (built from ../shared) fine-tuned on the shared Alpaca
sample gets real-model settings, learns on held-out data, and its adapter works in plain peft and `qlora generate`.
(Its exports are tests/export/test_export_smollm2.py's, on the same smollm2_run; runs of their own are
tests/test_smollm2_recipes.py's.)"""

from __future__ import annotations

import io
import json

import pytest
import torch
import yaml

from qlora.composition import compose_command
from qlora.config import GenerateCommand
from qlora.generate import generate
from qlora.model import load_trained_model
from qlora.runfolder import read_trained
from tests.runs import ALPACA_5000, qlora_cli

pytestmark = pytest.mark.slow


def test_a_users_model_gets_real_model_settings_not_the_demos(smollm2, tmp_path):
    """The README's command for "your model and data" composes recipe=custom, shown by --cfg job."""
    result = qlora_cli("train", f"model.name_or_path={smollm2}", f"data.path={ALPACA_5000}", "data.format=alpaca",
                       "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "recipe=custom" in result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["model"]["name_or_path"] == str(smollm2)
    assert config["optim"]["lr"] == 2e-4 and config["optim"]["warmup_steps"] > 0  # the QLoRA paper's, not 3e-3
    assert config["train"]["micro_batch_size"] * config["train"]["grad_accum_steps"] == 16
    assert config["train"]["seq_len"] == "auto"  # from the data's lengths, not the demo's 96
    assert config["train"]["sample_prompts"] == [] and config["train"]["samples_from_eval"] == 3  # no cow
    assert config["lora"]["target_modules"] == ["all-linear"] and config["lora"]["r"] == 16
    assert config["data"]["on_invalid"] == "skip" and config["data"]["generate_demo"] is False


def test_a_short_run_learns_on_held_out_data_and_names_the_records_it_skipped(smollm2_run):
    assert smollm2_run.final_eval_loss < smollm2_run.first_eval_loss - 0.05
    summary = json.loads((smollm2_run.output_dir / "summary.json").read_text())
    assert summary["skipped_records"] == [f"{ALPACA_5000} record 2336: 'output' is empty",
                                          f"{ALPACA_5000} record 4659: 'output' is empty"]
    assert 0 < summary["eval_share"] < 1 and summary["planned_memory_gb"] > 0
    assert "skipped 2 invalid records of 5000" in (smollm2_run.output_dir / "train.log").read_text()


def test_the_adapter_loads_in_plain_peft_and_computes_what_trained(smollm2, smollm2_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    plain = PeftModel.from_pretrained(base, str(smollm2_run.output_dir / "adapter")).eval()
    ours = load_trained_model(read_trained(str(smollm2_run.output_dir)).config, smollm2_run.output_dir / "adapter",
                              torch.device("cpu"))
    ids = torch.tensor([smollm2_run.tokenizer("Give three tips for staying healthy.")["input_ids"]])
    with torch.no_grad():
        theirs, mine = plain(input_ids=ids).logits, ours(input_ids=ids).logits
    # The same NF4 codes and adapter; peft's k-bit preparation upcasts norms to float32 in ours only, a float32
    # model here too, so the two differ by float32 summation order at most.
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-4)


def test_qlora_generate_answers_as_the_run_did(smollm2_run):
    sample = smollm2_run.samples[0]
    cmd = compose_command(GenerateCommand, [f"run_dir={smollm2_run.output_dir}", f"prompt={sample['prompt']}",
                                            "temperature=0", "stream=false", "max_new_tokens=16"])
    answer = generate(cmd, out=io.StringIO())
    assert answer.strip() and answer.strip() == sample["after"]
