"""`qlora export` and `qlora generate` on tiny trained runs of two architectures (Llama with Alpaca data, Qwen2
with chat data): the merged export computes what was trained, loads with plain transformers, survives GGUF, and
bad inputs fail cleanly."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora import data as qdata
from qlora import demo
from qlora.composition import compose_command, compose_config
from qlora.config import ExportCommand, GenerateCommand
from qlora.errors import QloraError
from qlora.export import export
from qlora.generate import generate
from qlora.model import load_trained_model
from qlora.runfolder import read_trained
from qlora.train import run
from tests.runs import TINY, qlora_cli

pytestmark = pytest.mark.slow  # trained runs exported and generated from

PROMPT = "What sound does a cow make?"
SETUPS = {
    "llama": ["data.format=alpaca"],
    "qwen2": ["data.format=chat", "data.chat_template=chatml", "data.path={chat}"],
}


def _chat_records(records: list[dict]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
            for r in records]


@pytest.fixture(scope="module", params=list(SETUPS))
def trained(request, tmp_path_factory):
    """A finished 30-step run on a tiny model of the architecture, with a byte-level BPE tokenizer (GGUF needs
    one), and the loaded model it trained."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"export-{arch}")
    cache = root / "cache"
    alpaca = cache / "data" / "animal-facts.jsonl"
    demo.write_demo_dataset(alpaca)
    chat = cache / "data" / "animal-chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in _chat_records(demo.demo_records())))
    corpus = cache / "data" / "corpus.jsonl"  # rendered prompts, so the BPE learns the Alpaca header too
    corpus.write_text("".join(json.dumps({"text": qdata.alpaca_prompt(r["instruction"]) + r["output"]}) + "\n"
                              for r in demo.demo_records()))
    overrides = [o.format(chat=chat) for o in SETUPS[arch]]
    config = compose_config([
        f"cache_dir={cache}", *TINY, f"output_dir={root / 'run'}", f"model.scratch.path={cache}/models/{arch}",
        f"model.scratch.architecture={arch}", "model.scratch.tokenizer=bpe", f"model.scratch.tokenizer_corpus={corpus}",
        "model.scratch.tokenizer_vocab_size=600", f"data.path={alpaca}", "train.max_steps=30",
        "train.eval_every_steps=30", f"train.sample_prompts=[{PROMPT}]", *overrides,
    ])
    result = run(config)
    return root, result


def _export(trained, name: str, *options: str):
    root, result = trained
    cmd = compose_command(ExportCommand, [f"run_dir={result.output_dir}", f"output_dir={root / name}", *options])
    return export(cmd)


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("Where does a duck live? A duck lives in a pond.")["input_ids"]])


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(model.device)).logits.float().cpu()


def test_float32_merge_gives_the_trained_models_logits(trained):
    root, result = trained
    exported = _export(trained, "hf32", "export.dtype=float32")
    check = exported.verification.checks["merged_vs_rounded_trained"]
    assert check.mean_kl < 1e-12 and check.max_abs_logit_diff < 1e-5
    # float32 rounds nothing, so the reference is the trained model itself: the hooks reproduce its forward pass
    rounding = exported.verification.drift["rounding_vs_trained"]
    assert rounding.mean_kl < 1e-12 and rounding.max_abs_logit_diff < 1e-5

    # Independently of the export's own verification: plain transformers vs the run's base + adapter.
    merged = AutoModelForCausalLM.from_pretrained(exported.output_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(exported.output_dir)
    trained_model = load_trained_model(read_trained(str(result.output_dir)).config, result.output_dir / "adapter",
                                       torch.device("cpu"))
    ids = _ids(tokenizer)
    torch.testing.assert_close(_logits(merged, ids), _logits(trained_model, ids), atol=1e-4, rtol=1e-4)


def test_bfloat16_merge_equals_the_rounded_trained_model_and_original_drifts_further(trained):
    exported = _export(trained, "hf16")
    check = exported.verification.checks["merged_vs_rounded_trained"]
    rounding = exported.verification.drift["rounding_vs_trained"]
    drift = exported.verification.drift["original_merge_vs_trained"]
    assert check.mean_kl < 1e-12  # operation order alone
    assert 3e-8 < rounding.mean_kl < 1e-5  # what bf16 storage costs (measured 1.3e-7, 1.9e-7), reported only
    assert drift.mean_kl > 20 * rounding.mean_kl  # why dequantized is the default
    saved = json.loads((exported.output_dir / "verification.json").read_text())
    assert saved["passed"] and saved["max_kl"] == 1e-8 and "rounded as the export stores it" in saved["rule"]
    assert saved["drift"]["rounding_vs_trained"]["mean_kl"] == pytest.approx(rounding.mean_kl, 1e-5)
    assert "rounded to bfloat16" in saved["compared"]["merged_vs_rounded_trained"]
    config = json.loads((exported.output_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(exported.output_dir)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_export_loads_with_plain_transformers_and_prompts_as_trained(trained):
    root, result = trained
    out = _export(trained, "plain", "export.dtype=float32", "export.compare_original=false").output_dir
    run_tokenizer = AutoTokenizer.from_pretrained(result.output_dir / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = read_trained(str(result.output_dir)).config
    # The export's chat template renders a user message exactly as training did (Alpaca runs get one).
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                             tokenize=False)
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == qdata.prompt_ids(PROMPT, config.data,
                                                                                        run_tokenizer)
    generation = json.loads((out / "generation_config.json").read_text())
    stops = generation["eos_token_id"]
    assert run_tokenizer.eos_token_id in stops
    if config.data.format.value == "chat":
        assert run_tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    # Greedy answers agree: the export (plain transformers), the run (qlora generate) and the run's own sample.
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([qdata.prompt_ids(PROMPT, config.data, run_tokenizer)])
    answer = plain.generate(input_ids=ids, max_new_tokens=config.train.max_new_tokens, do_sample=False)
    text = tokenizer.decode(answer[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert text == result.samples[0]["after"]
    for source in (f"model={out}", f"run_dir={result.output_dir}"):
        cmd = compose_command(GenerateCommand, [source, f"prompt={PROMPT}", "temperature=0", "stream=false",
                                                f"max_new_tokens={config.train.max_new_tokens}"])
        assert generate(cmd, out=_Sink()).strip() == text


def test_model_card_records_the_run_and_its_snippet_runs(trained):
    root, result = trained
    out = _export(trained, "card", "export.compare_original=false").output_dir
    card = (out / "README.md").read_text()
    config = read_trained(str(result.output_dir)).config
    for fact in (config.model.name_or_path, f"r={config.lora.r}", "nf4+double-quant", f"{result.final_eval_loss:.4f}",
                 "merged vs rounded trained", "rounding vs trained", config.data.path, "30 of 30"):
        assert fact in card, fact
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("max_new_tokens=128", "max_new_tokens=4")
    exec(compile(snippet, "README.md", "exec"), {"print": lambda *a: None})


def test_original_merge_is_checked_against_its_own_claim(trained):
    exported = _export(trained, "orig", "export.merge=original", "export.dtype=float32")
    v = exported.verification
    assert v.checks["merged_vs_rounded_original_unmerged"].mean_kl < 1e-12
    assert v.drift["rounding_vs_original_unmerged"].mean_kl < 1e-12  # float32 rounds nothing
    assert v.drift["merged_vs_trained"].mean_kl > 1e-6  # it is not the model that was trained
    assert "adapter never saw" in (exported.output_dir / "README.md").read_text()


def test_sharded_export_holds_the_same_tensors(trained):
    from safetensors.torch import load_file

    single = _export(trained, "one", "export.compare_original=false").output_dir
    sharded = _export(trained, "many", "export.compare_original=false", "export.max_shard_size=200KB").output_dir
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((sharded / f).stat().st_size < 200_000 + 50_000 for f in files)
    joined = {k: v for f in files for k, v in load_file(sharded / f).items()}
    whole = load_file(single / "model.safetensors")
    assert joined.keys() == whole.keys()
    for key in whole:
        assert torch.equal(joined[key], whole[key]), key


@pytest.mark.parametrize("tensor_type", ["f32", "q8_0", "q4_k_m"])
def test_gguf_export_reads_back_like_the_hf_export(trained, tensor_type):
    from qlora.export.gguf_file import load_gguf_model

    dtype = "float32" if tensor_type == "f32" else "bfloat16"
    # q4_k_m calibrated on a data file given by path (here the run's own): ffn_down's rows of 256 are K-quants
    data = read_trained(trained[1].output_dir).config.data.path
    calibration = [f"export.calibration={data}"] if tensor_type == "q4_k_m" else []
    exported = _export(trained, f"gguf-{tensor_type}", "export.format=gguf", f"export.dtype={dtype}",
                       f"export.gguf_type={tensor_type}", "export.compare_original=false", *calibration)
    file = exported.verification.file
    assert file["type"] == tensor_type and file["bytes"] == (exported.output_dir / file["file"]).stat().st_size
    if tensor_type == "q4_k_m":
        assert {"Q4_K", "Q6_K"} <= file["tensor_types"].keys()
        assert file["calibration"].endswith(f"of the calibration file ({data})")
    gguf_files = list(exported.output_dir.glob("*.gguf"))
    assert [f.name for f in gguf_files] == [f"gguf-{tensor_type}-{tensor_type}.gguf"]
    assert not (exported.output_dir / ".hf").exists()
    check = exported.verification.checks["gguf_vs_rounded_merged"]
    assert check.mean_kl < 1e-12  # the read-back equals the HF export rounded tensor by tensor as the file stores it
    if tensor_type != "f32":
        assert exported.verification.drift["gguf_vs_trained"].mean_kl > 1e-8  # q8_0 and q4_k_m do round
    if tensor_type == "f32":  # independently: transformers' GGUF loader against a float32 HF export
        hf = _export(trained, "hf-for-gguf", "export.dtype=float32", "export.compare_original=false").output_dir
        model, tokenizer = load_gguf_model(gguf_files[0])
        ids = _ids(AutoTokenizer.from_pretrained(hf))
        expected = _logits(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32), ids)
        torch.testing.assert_close(_logits(model, ids), expected, atol=1e-4, rtol=1e-4)


def test_adapter_export_is_the_trained_adapter_for_the_named_base(trained):
    from peft import PeftModel
    from safetensors.torch import load_file

    root, result = trained
    out = _export(trained, "adapter", "export.format=adapter").output_dir
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    config = read_trained(str(result.output_dir)).config
    assert adapter_config["base_model_name_or_path"] == config.model.name_or_path
    saved, trained_weights = load_file(out / "adapter_model.safetensors"), \
        load_file(result.output_dir / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == trained_weights.keys() and all(torch.equal(saved[k], trained_weights[k]) for k in saved)
    base = AutoModelForCausalLM.from_pretrained(config.model.name_or_path, dtype=torch.float32)
    assert isinstance(PeftModel.from_pretrained(base, str(out)), PeftModel)
    assert "drift" in (out / "README.md").read_text()


def test_failed_verification_keeps_the_export_as_unverified_and_the_old_one_intact(trained, monkeypatch):
    root, _ = trained
    good = _export(trained, "kept", "export.compare_original=false").output_dir
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    _scale_updates(monkeypatch, 0.9)
    with pytest.raises(QloraError, match=r"does not compute what it should.*merged_vs_rounded.*kept\.unverified"):
        _export(trained, "kept", "export.compare_original=false", "overwrite=true")
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    unverified = good.with_name("kept.unverified")
    saved = json.loads((unverified / "verification.json").read_text())
    # the adapter x0.9 (every dtype, on the real model: tests/export/test_export_smollm2.py): measured KL 1.1e-4 and
    # 2.5e-4 on the two tiny runs, where bf16 storage alone costs 1.3e-7 and 1.9e-7 and a right merge 0
    assert saved["passed"] is False and saved["checks"]["merged_vs_rounded_trained"]["mean_kl"] > 1e-6
    assert not list(root.glob(".kept*"))


def _scale_updates(monkeypatch, factor: float) -> None:
    """A wrong merge: merge.py adds every LoRA update times `factor`."""
    from qlora.export import merge

    real_merged, real_base = merge._merged, merge._base_weight_fn

    def scaled(lora_module, name, mode, dtype, original):
        base = real_base(lora_module.get_base_layer(), name, mode, torch.float32, original)
        full = real_merged(lora_module, name, mode, torch.float32, original)
        return lambda: (base() + factor * (full() - base())).to(dtype)

    monkeypatch.setattr(merge, "_merged", scaled)


@pytest.mark.parametrize("tensor_type", ["q8_0", "q4_k_m"])
def test_a_wrong_gguf_fails(trained, monkeypatch, tensor_type):
    """A writer fault fails the file's own check, for an 8-bit and a calibrated 4-bit file alike; a wrong merge
    fails before any file is written (the merged folder's check)."""
    import dataclasses

    from qlora.export import gguf_file

    real_source, real_interleave = gguf_file._source_data, gguf_file._interleave_rotary_halves

    def swapped(tensor, config, shards, stack):  # layer 1's down projection written as layer 0's
        if tensor.source == "model.layers.0.mlp.down_proj.weight":
            tensor = dataclasses.replace(tensor, source="model.layers.1.mlp.down_proj.weight")
        return real_source(tensor, config, shards, stack)

    faults = {"layer": ("_source_data", swapped),
              "rotary": ("_interleave_rotary_halves", lambda weight, heads: weight)}  # only Llama permutes q/k
    root, result = trained
    if read_trained(str(result.output_dir)).config.model.scratch.architecture.value != "llama":
        del faults["rotary"]
    for fault, (attribute, replacement) in faults.items():
        with monkeypatch.context() as patch:
            patch.setattr(gguf_file, attribute, replacement)
            with pytest.raises(QloraError, match="gguf_vs_rounded_merged"):
                _export(trained, f"wrong-gguf-{tensor_type}-{fault}", "export.format=gguf",
                        f"export.gguf_type={tensor_type}", "export.compare_original=false")
        saved = json.loads((root / f"wrong-gguf-{tensor_type}-{fault}.unverified" / "verification.json").read_text())
        assert saved["checks"]["gguf_vs_rounded_merged"]["mean_kl"] > 10 * saved["max_kl"], fault
    assert real_interleave is gguf_file._interleave_rotary_halves
    _scale_updates(monkeypatch, 0.9)
    with pytest.raises(QloraError, match="merged_vs_rounded_trained"):
        _export(trained, f"wrong-gguf-{tensor_type}-merge", "export.format=gguf", f"export.gguf_type={tensor_type}",
                "export.compare_original=false")
    saved = json.loads((root / f"wrong-gguf-{tensor_type}-merge.unverified" / "verification.json").read_text())
    assert "gguf_vs_rounded_merged" not in saved["checks"] and not list(
        (root / f"wrong-gguf-{tensor_type}-merge.unverified").glob("*.gguf"))


def test_cli_export_and_generate(trained, tmp_path):
    root, result = trained
    out = tmp_path / "cli-export"
    done = qlora_cli("export", f"run_dir={result.output_dir}", f"output_dir={out}", "export.compare_original=false",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "merged_vs_rounded_trained" in done.stderr and (out / "model.safetensors").is_file()
    again = qlora_cli("export", f"run_dir={result.output_dir}", f"output_dir={out}", cwd=tmp_path)
    assert again.returncode == 2 and "already holds files" in again.stderr
    sampled = [qlora_cli("generate", f"model={out}", f"prompt={PROMPT}", "temperature=1.0", "seed=7",
                         "max_new_tokens=8", cwd=tmp_path) for _ in range(2)]
    assert sampled[0].returncode == 0, sampled[0].stderr
    assert sampled[0].stdout == sampled[1].stdout and sampled[0].stdout.strip()


def test_bad_inputs_fail_with_one_line_and_write_nothing(trained, tmp_path):
    root, result = trained
    run_copy = tmp_path / "run-copy"
    shutil.copytree(result.output_dir, run_copy)
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a corrupted adapter
    unfinished = tmp_path / "unfinished"
    shutil.copytree(result.output_dir, unfinished)
    shutil.rmtree(unfinished / "adapter")
    cases = [
        ([f"run_dir={run_copy}"], "is damaged or does not fit"),
        ([f"run_dir={tmp_path / 'nope'}"], "no such folder"),
        ([f"run_dir={unfinished}"], "no finished run (no adapter/); its newest checkpoint is"),
        ([f"run_dir={result.output_dir}", "export.dtype=auto"], "export.dtype must be"),
        ([f"run_dir={result.output_dir}", "export.format=zip"], "expected one of [hf, gguf, adapter]"),
        ([f"run_dir={result.output_dir}", "export.gguf_type=q8_0"], "applies to export.format=gguf"),
        ([f"run_dir={result.output_dir}", "export.max_shard_size=lots"], "is not a size"),
        ([f"run_dir={result.output_dir}", "export.format=gguf", f"export.calibration={tmp_path / 'none.jsonl'}"],
         "export.calibration=" + str(tmp_path / "none.jsonl") + ": no such file"),
        ([f"run_dir={result.output_dir}", "export.calibration_samples=0"], "export.calibration_samples must be > 0"),
        ([f"run_dir={result.output_dir}", "export.format=gguf", "export.gguf_type=q4_km"],
         "expected one of [auto, f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s]"),
        ([f"run_dir={result.output_dir}", "export.colour=red"], "unknown config key 'export.colour'"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        with pytest.raises(QloraError) as e:
            export(compose_command(ExportCommand, [*args, f"output_dir={out}"]))
        assert message in str(e.value) and "\n" not in str(e.value), (args, str(e.value))
        assert not out.exists() and not list(tmp_path.glob(".out*")), args


def test_an_adapter_from_another_model_is_refused(trained, tmp_path):
    root, result = trained
    other = tmp_path / "other"
    shutil.copytree(result.output_dir, other)
    adapter = other / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter)
    save_file({k: torch.cat([v, v], dim=0) if "lora_B" in k else v for k, v in tensors.items()}, str(adapter))
    with pytest.raises(QloraError, match="is damaged or does not fit"):
        export(compose_command(ExportCommand, [f"run_dir={other}", f"output_dir={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()


class _Sink:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("variant", [["quant=int8"], ["quant=fp4"], ["quant=none"], ["lora.dora=true"],
                                     ["lora.target_modules=[q_proj,v_proj]", "lora.rslora=true"]])
def test_every_quant_mode_and_lora_variant_merges_exactly(tiny_config, tmp_path, variant):
    result = run(tiny_config("train.max_steps=8", "train.eval_every_steps=0", *variant))
    cmd = compose_command(ExportCommand, [f"run_dir={result.output_dir}", f"output_dir={tmp_path / 'export'}",
                                          "export.dtype=float32", "export.compare_original=false"])
    verification = export(cmd).verification
    check, rounding = verification.checks["merged_vs_rounded_trained"], verification.drift["rounding_vs_trained"]
    assert check.mean_kl < 1e-12 and check.max_abs_logit_diff < 1e-5, check
    if variant == ["quant=int8"]:  # LLM.int8 rounds the activations to 8 bits too; no weight matrix does that
        assert 1e-9 < rounding.mean_kl < 1e-4 and rounding.top1_agreement > 0.95, rounding
    else:
        assert rounding.mean_kl < 1e-12 and rounding.max_abs_logit_diff < 1e-5, rounding


def test_the_last_checkpoint_exports_the_same_bytes_as_the_finished_run(trained):
    root, result = trained
    last = sorted((result.output_dir / "checkpoints").iterdir())[-1]
    from_run = _export(trained, "from-run", "export.compare_original=false").output_dir
    from_checkpoint = export(compose_command(ExportCommand, [
        f"run_dir={last}", f"output_dir={root / 'from-checkpoint'}", "export.compare_original=false"])).output_dir
    assert (from_run / "model.safetensors").read_bytes() == (from_checkpoint / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_loftq_run_with_lora_plus_and_neftune_merges_exactly(tmp_path):
    """The merge of a LoftQ-initialised adapter is the trained model (its correction lives in the adapter, merged into
    the dequantized base); NEFTune leaves nothing in the export; the card lists the options."""
    cache = tmp_path / "cache"
    config = compose_config([f"cache_dir={cache}", *TINY, f"model.scratch.path={cache}/tiny128",
                             f"output_dir={tmp_path / 'run'}", "train.max_steps=6", "train.eval_every_steps=6",
                             "train.report=false", "lora.init=loftq", "optim.lora_plus_ratio=16",
                             "train.neftune_alpha=5"])
    result = run(config)
    cmd = compose_command(ExportCommand, [f"run_dir={result.output_dir}", f"output_dir={tmp_path / 'hf32'}",
                                          "export.dtype=float32", "export.compare_original=false"])
    exported = export(cmd)
    check = exported.verification.checks["merged_vs_rounded_trained"]
    assert check.mean_kl < 1e-12 and check.max_abs_logit_diff < 1e-5
    merged = AutoModelForCausalLM.from_pretrained(exported.output_dir, dtype=torch.float32)
    trained_model = load_trained_model(read_trained(str(result.output_dir)).config, result.output_dir / "adapter",
                                       torch.device("cpu"))
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    torch.testing.assert_close(_logits(merged, ids), _logits(trained_model, ids), atol=1e-4, rtol=1e-4)
    card = (exported.output_dir / "README.md").read_text()
    for fact in ("| adapter init | loftq: B @ A started as the rank-r SVD", "LoRA+ (B matrices at lr x 16)",
                 "NEFTune (alpha 5, training forwards only)"):
        assert fact in card, fact
