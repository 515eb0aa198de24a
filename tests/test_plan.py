"""`qlora plan`: the exact quantities (base, LoRA, optimizer state) equal the bytes of the tensors a run allocates;
the activation estimate is within 10% of the bytes autograd saves; the check refuses runs that cannot fit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qlora import demo
from qlora.composition import compose_config
from qlora.errors import QloraError
from qlora.lora import attach_lora
from qlora.loss import CausalLMLoss
from qlora.model import enable_checkpointing, load_base_model, prepare_kbit, quant_report
from qlora.optim import build_optimizer
from qlora.plan import (
    AUTO_SHARE,
    CUDA_RESERVE,
    GIB,
    PeakBytes,
    check_fits,
    measured_saved_bytes,
    measured_state_bytes,
    plan,
)
from tests.runs import REPO, qlora_cli

CPU = torch.device("cpu")


def _prepared_base(config):
    demo.prepare_assets(config)
    model = load_base_model(config.model, config.quant, CPU)
    if config.quant.method.value != "none" and config.train.prepare_kbit:
        model = prepare_kbit(model, config.train.float32_embeddings, config.lora.modules_to_save)
    return model


@pytest.mark.parametrize("overrides", [
    ["quant=nf4-dq", "optim=paged_adamw_8bit"],
    ["quant=nf4", "optim=adamw", "lora.r=8"],
    # A tiny base loaded per case: the fast tier keeps the default and a plain AdamW one.
    pytest.param(["quant=fp4-dq", "optim=paged_lion_8bit", "optim.min_8bit_size=4096"], marks=pytest.mark.slow),
    pytest.param(["quant=int8", "optim=paged_adamw_32bit"], marks=pytest.mark.slow),
    pytest.param(["quant=nf4-dq", "optim=adamw", "lora.dora=true"], marks=pytest.mark.slow),
    pytest.param(["quant=none", "optim=adamw_8bit", "lora.modules_to_save=[lm_head]",
                  "lora.target_modules=[q_proj,v_proj]"], marks=pytest.mark.slow),
])
def test_exact_bytes_equal_the_tensors_of_a_run(tiny_config, overrides):
    config = tiny_config(*overrides)
    model = _prepared_base(config)
    if config.quant.method.value == "int8":
        model(input_ids=torch.tensor([[1, 2, 3]]))  # bitsandbytes moves int8 row scales on the first forward
    measured_base = quant_report(model).total_bytes
    model = attach_lora(model, config.lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, config.optim, CPU)
    model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.float().sum().backward()
    optimizer.step()

    estimate = plan(config, "cpu")
    assert estimate.base_bytes == measured_base
    assert estimate.trainable_parameters == sum(p.numel() for p in trainable)
    assert estimate.trainable_bytes == sum(p.numel() * p.element_size() for p in trainable)
    assert estimate.gradient_bytes == sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    assert estimate.optimizer_bytes == measured_state_bytes(optimizer)


@pytest.mark.slow
def test_quantized_parameter_count_and_storage_match_the_loaded_model(tiny_config):
    config = tiny_config("quant=nf4-dq")
    report = quant_report(_prepared_base(config))
    estimate = plan(config, "cpu")
    assert estimate.quantized_parameters == report.quantized_params
    assert estimate.parameters == sum(p.numel() for p in _prepared_base(tiny_config("quant=none")).parameters())


# A shape unlike the one the coefficients were measured on: other widths, head count, GQA ratio and rank.
OTHER_SHAPE = ["model.scratch.hidden_size=192", "model.scratch.intermediate_size=512",
               "model.scratch.num_attention_heads=3", "model.scratch.num_key_value_heads=1",
               "model.scratch.num_hidden_layers=3", "lora.r=8"]


@pytest.mark.parametrize("overrides", [
    ["lora.dropout=0.0", "train.gradient_checkpointing=false"],
    ["lora.dropout=0.1", "train.gradient_checkpointing=false"],
    ["lora.dropout=0.0", "train.gradient_checkpointing=false", "quant.compute_dtype=bfloat16",
     "train.mixed_precision=bf16"],
    ["lora.dropout=0.1", "train.gradient_checkpointing=false", "quant.compute_dtype=bfloat16",
     "train.mixed_precision=bf16"],
])
@pytest.mark.slow
def test_activation_estimate_is_within_10_percent_of_what_autograd_saves(tiny_config, cache_dir, overrides):
    config = tiny_config(*OTHER_SHAPE, f"model.scratch.path={cache_dir}/tiny192", "train.micro_batch_size=3",
                         "train.seq_len=80", *overrides)
    model = attach_lora(_prepared_base(config), config.lora)
    model.train()
    batch = torch.randint(0, model.config.vocab_size, (config.train.micro_batch_size, config.train.seq_len))
    measured = measured_saved_bytes(model, batch, config.train.mixed_precision.value == "bf16")
    estimate = plan(config, "cpu")
    saved_logits = estimate.tokens * model.config.vocab_size * 4  # the float32 log-softmax the loss keeps
    assert estimate.activation_bytes + saved_logits == pytest.approx(measured, rel=0.10)


@pytest.mark.slow
def test_gradient_checkpointing_plans_for_layer_inputs_plus_one_layer(tiny_config):
    on = plan(tiny_config("train.gradient_checkpointing=true"), "cpu")
    off = plan(tiny_config("train.gradient_checkpointing=false"), "cpu")
    layers, hidden = 2, 128
    outside = 3 * 4 * hidden * on.tokens  # embeddings, final norm, head input (float32 residual stream)
    assert on.activation_bytes < off.activation_bytes
    assert on.activation_bytes - outside - layers * 4 * hidden * on.tokens == pytest.approx(
        (off.activation_bytes - outside) / layers, abs=2)


@pytest.mark.slow
def test_peak_with_some_layers_recomputed_is_within_10_percent_of_the_plan(tiny_config, cache_dir):
    """Every tensor a training step creates, counted until it is freed, against the plan's per-step part."""
    config = tiny_config(*OTHER_SHAPE, f"model.scratch.path={cache_dir}/tiny192", "train.micro_batch_size=2",
                         "train.seq_len=256", "lora.dropout=0.1")
    peaks = []
    for checkpointed in range(4):  # none, the first one, two (auto's most for three layers), all three
        base = _prepared_base(config)
        enable_checkpointing(base, checkpointed)
        loss = CausalLMLoss(attach_lora(base, config.lora), config.train.loss_chunk_tokens).train()
        batch = torch.randint(0, base.config.vocab_size, (config.train.micro_batch_size, config.train.seq_len))
        loss(input_ids=batch, labels=batch).backward()  # the gradients exist from here on: measure a later step
        with PeakBytes() as peak:
            loss(input_ids=batch, labels=batch).backward()
        estimate = plan(config, "cpu", checkpointed)
        planned = estimate.activation_bytes + estimate.logits_bytes + estimate.workspace_bytes
        assert planned == pytest.approx(peak.bytes, rel=0.10), checkpointed
        peaks.append(peak.bytes)
    assert peaks[0] > peaks[1] > peaks[2]
    assert peaks[3] >= peaks[2]  # recomputing the last layer too saves nothing


@pytest.mark.slow
def test_auto_recomputes_the_fewest_layers_that_fit(tiny_config, cache_dir):
    shape = [*OTHER_SHAPE, f"model.scratch.path={cache_dir}/tiny192", "train.micro_batch_size=8",
             "train.seq_len=512"]
    demo.prepare_assets(tiny_config(*shape))
    each = [plan(tiny_config(*shape), "cuda", k) for k in range(3)]
    assert each[0].total_bytes > each[1].total_bytes > each[2].total_bytes
    for k, fitting in enumerate(each):
        limit = (fitting.total_bytes / AUTO_SHARE + CUDA_RESERVE) / GIB + 1e-6
        chosen = plan(tiny_config(*shape, f"train.memory_limit_gb={limit!r}"), "cuda")
        assert (chosen.checkpointed_layers, chosen.fits) == (k, True)
        assert chosen.total_bytes == fitting.total_bytes
    assert plan(tiny_config(*shape, "train.memory_limit_gb=1000"), "cuda").checkpointed_layers == 0
    too_small = plan(tiny_config(*shape, "train.memory_limit_gb=1.0"), "cuda")
    assert (too_small.checkpointed_layers, too_small.fits) == (2, False)
    assert plan(tiny_config(*shape, "train.gradient_checkpointing=true"), "cuda").checkpointed_layers == 3


@pytest.mark.slow
def test_largest_micro_batch_and_seq_len_fit_and_one_more_does_not(tiny_config):
    config = tiny_config("train.memory_limit_gb=1.05", "train.micro_batch_size=4", "train.seq_len=128")
    estimate = plan(config, "cuda")
    batch = estimate.largest_micro_batch(128)
    assert batch and batch >= 1
    fitting = plan(tiny_config("train.memory_limit_gb=1.05", f"train.micro_batch_size={batch}",
                               "train.seq_len=128"), "cuda")
    too_big = plan(tiny_config("train.memory_limit_gb=1.05", f"train.micro_batch_size={batch + 1}",
                               "train.seq_len=128"), "cuda")
    assert fitting.fits and not too_big.fits


def test_check_refuses_a_run_that_cannot_fit_and_names_the_setting(tiny_config):
    config = tiny_config("train.memory_limit_gb=1.02", "train.micro_batch_size=64", "train.seq_len=256")
    with pytest.raises(QloraError, match=r"train\.micro_batch_size=\d+ .*train\.check_memory=false"):
        check_fits(config, "cuda")
    assert check_fits(tiny_config("train.memory_limit_gb=1.02", "train.check_memory=false",
                                  "train.micro_batch_size=64"), "cuda") is None
    on_cpu = check_fits(config, "cpu")  # planned (and written to summary.json), never refused
    assert on_cpu.device == "cpu" and on_cpu.host_bytes > 0 and on_cpu.total_bytes > on_cpu.host_bytes


def test_a_hub_model_is_planned_from_model_architecture_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data.json"  # recipe=custom (a hub model, no recipe) needs the user's data; plan reads none
    data.write_text('[{"instruction": "a", "output": "b"}]')
    config = compose_config([f"output_dir={tmp_path}/run", "model=llama3.1-8b", "train.memory_limit_gb=80",
                             "lora.r=64", "train.micro_batch_size=1", "train.seq_len=2048", f"data.path={data}"])
    estimate = plan(config, "cuda")
    assert estimate.parameters == 8_030_261_248  # Llama 3.1 8B
    # 4-bit with double quantization: 4.127 bits per quantized weight (the QLoRA paper's figure), to 0.1%
    from qlora.plan import quantized_weight_bytes
    q = estimate.quantized_parameters
    assert 8 * quantized_weight_bytes(q, 1, config) / q == pytest.approx(4.127, rel=1e-3)
    assert estimate.fits


@pytest.mark.slow
def test_qlora_plan_cli(tmp_path, cache_dir):
    result = qlora_cli("plan", f"cache_dir={cache_dir}", f"model.scratch.path={cache_dir}/tiny128",
                       "model.scratch.hidden_size=128", "model.scratch.intermediate_size=256",
                       "model.scratch.num_hidden_layers=2", "train.memory_limit_gb=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "LoRA weights" in result.stdout and "fits in 8.00 GiB" in result.stdout
    bad = qlora_cli("plan", "lora.rr=8", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown config key 'lora.rr'" in bad.stderr


@pytest.mark.slow
def test_recipe_headers_state_what_qlora_plan_says(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "recipe_headers.py"), "--check"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr


def test_qlora_malloc_compact_restarts_the_command_with_its_malloc_settings(monkeypatch):
    """QLORA_MALLOC=compact: `qlora ...` re-executes as `python -m qlora ...` with COMPACT_MALLOC set, once, and the
    plan then counts no allocator share; without it nothing restarts."""
    import platform

    from qlora import cli, memory

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc settings apply on Linux with glibc only")
    calls = []

    def execv(path, args):
        calls.append((path, args, {k: os.environ.get(k) for k in memory.COMPACT_MALLOC}))
        raise SystemExit(0)  # what follows execv is the new process

    monkeypatch.setattr(os, "execv", execv)
    for key in memory.COMPACT_MALLOC:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("QLORA_MALLOC", raising=False)
    assert memory.exec_with_compact_malloc(["plan"]) is None and not calls and not memory.compact_malloc()
    monkeypatch.setenv("QLORA_MALLOC", "compact")
    monkeypatch.setattr(sys, "argv", ["/venv/bin/qlora", "plan", "recipe=tiny-alpaca"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == [(sys.executable, [sys.executable, "-m", "qlora", "plan", "recipe=tiny-alpaca"],
                      {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_ARENA_MAX": "1"})]
    assert memory.compact_malloc()  # as in the restarted process: no second restart
    assert memory.exec_with_compact_malloc(["plan"]) is None and len(calls) == 1


def test_loftq_init_plan_bounds_what_it_allocates_and_lora_plus_changes_no_state(tiny_config):
    from qlora.lora import init_adapter
    from qlora.optim import param_groups

    config = tiny_config("lora.init=loftq", "optim.lora_plus_ratio=16", "train.neftune_alpha=5")
    model = attach_lora(_prepared_base(config), config.lora)
    with PeakBytes() as peak:
        init_adapter(model, config.lora, config.model)
    estimate = plan(config, "cpu")
    largest = 4 * config.model.scratch.hidden_size * config.model.scratch.intermediate_size  # float32 MLP weight
    assert estimate.init_bytes == 6 * largest
    assert 3 * largest < peak.bytes <= estimate.init_bytes  # the tensors safetensors reads are not seen by PeakBytes
    optimizer = build_optimizer(param_groups(model, config.optim), config.optim, CPU)
    model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.float().sum().backward()
    optimizer.step()
    assert estimate.optimizer_bytes == measured_state_bytes(optimizer)
    plain = plan(tiny_config(), "cpu")  # the init's copies sit under the training peak; the process's own bytes vary
    assert estimate.total_bytes - estimate.host_bytes == plain.total_bytes - plain.host_bytes


def test_a_users_model_is_planned_without_data_at_its_context_or_the_stated_seq_len(tmp_path, capsys):
    """recipe=custom sizes sequences from the data, but memory needs none: with no data.path, `qlora plan` plans at
    the model's context (seq_len=auto) or at the stated train.seq_len, and says which; a given data.path is still
    checked."""
    from transformers import LlamaConfig

    from qlora import cli

    folder = tmp_path / "model"  # a config, no weights
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024).save_pretrained(folder)
    assert cli.main(["plan", f"model.name_or_path={folder}"]) == 0
    out, err = capsys.readouterr()
    assert err == ("qlora: planning at the model's context, 1024 tokens (train.seq_len=auto, no data.path); "
                   "data.path=FILE plans the sequence length the data needs\n")
    assert "micro batch 4 x seq_len 1024" in out  # recipe=custom's micro batch
    assert cli.main(["plan", f"model.name_or_path={folder}", "train.seq_len=256"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("qlora: planning at train.seq_len=256 (no data.path);") and "x seq_len 256" in out
    assert cli.main(["plan", f"model.name_or_path={folder}", f"data.path={tmp_path}/none.jsonl"]) == 2
    assert capsys.readouterr().err == (f"qlora: config error: data.path: {tmp_path}/none.jsonl does not exist; give a "
                                       "json/jsonl/csv/parquet file or a hub dataset id\n")
