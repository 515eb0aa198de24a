"""`qlora export`: a trained run turned into a model that runs anywhere, verified to compute what was trained.

run -> probe text -> trained model (quantized base + adapter): its logits as trained, and as its merge rounded to
export.dtype computes them (the reference) -> merged tensors written shard by shard -> (how far `original` would
drift) -> the export loaded back in float32 with plain transformers and compared with the reference -> (GGUF
written, read back and compared with the HF export rounded as the file stores each tensor) -> model card -> the
folder renamed into place.

Everything is written into a hidden sibling of output_dir first. A verified export is renamed to output_dir;
one that fails verification is kept as OUTPUT_DIR.unverified and the command exits non-zero; any other error
leaves nothing behind. An existing output_dir is only replaced (overwrite=true) by a complete, verified export.

    output_dir/                      (export.format=hf)
        config.json  generation_config.json  model*.safetensors  tokenizer files  README.md  verification.json
    output_dir/                      (export.format=gguf)
        NAME-TYPE.gguf  README.md  verification.json
    output_dir/                      (export.format=adapter)
        adapter_config.json  adapter_model.safetensors  tokenizer files  README.md  verification.json
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora import hub
from qlora.config import (
    DType,
    ExportCommand,
    ExportConfig,
    ExportFormat,
    GGUFType,
    MergeMode,
    size_bytes,
    validate_export,
)
from qlora.device import default_device
from qlora.errors import QloraError, first_line
from qlora.export.verify import Comparison, Probe, as_merged, compare, logits_of, probe
from qlora.files import disk_full, folder_bytes, fsync_dir, fsync_tree, out_of_space
from qlora.model import TORCH_DTYPES
from qlora.runfolder import TrainedRun, read_trained

log = logging.getLogger(__name__)

_GGUF_FOR_DTYPE = {DType.bfloat16: "bf16", DType.float16: "f16", DType.float32: "f32"}


@dataclass
class Verification:
    """What the export was checked against, and whether it passed."""

    probe: str
    max_kl: float
    checks: dict[str, Comparison] = field(default_factory=dict)
    """Comparisons that must pass: the export vs the model it claims to be, rounded as the export stores it."""
    drift: dict[str, Comparison] = field(default_factory=dict)
    """Comparisons reported for information: what the storage rounding costs, how far `original` would drift."""
    compared: dict[str, str] = field(default_factory=dict)
    """For each comparison, its two sides in words."""
    errors: list[str] = field(default_factory=list)
    """Checks that could not even run (the export does not load); each one fails verification."""
    file: dict = field(default_factory=dict)
    """What a GGUF file holds: its type, each tensor type's count, what it was calibrated on."""

    def check(self, name: str, comparison: Comparison, compared: str) -> None:
        self.checks[name] = comparison
        self.compared[name] = compared

    def report(self, name: str, comparison: Comparison, compared: str) -> None:
        self.drift[name] = comparison
        self.compared[name] = compared

    @property
    def failed(self) -> list[str]:
        too_far = [f"{name}: mean KL {c.mean_kl:.3g} nats, max |logit diff| {c.max_abs_logit_diff:.3g}"
                   for name, c in self.checks.items() if not c.mean_kl <= self.max_kl]
        return self.errors + too_far

    def to_json(self) -> dict:
        return {"probe": self.probe, "rule": RULE, "max_kl": self.max_kl, "passed": not self.failed,
                "failures": self.failed, "checks": {k: v.row() for k, v in self.checks.items()},
                "drift": {k: v.row() for k, v in self.drift.items()}, "compared": self.compared,
                **({"file": self.file} if self.file else {})}


RULE = ("each check compares the export with the model it claims to be, rounded as the export stores it (every "
        "weight through the export's dtype, or each GGUF tensor through the file's type for it), both computed in "
        "float32, so a right export differs by floating-point operation order alone; a check fails when its mean KL "
        "exceeds max_kl")


@dataclass
class ExportResult:
    output_dir: Path
    verification: Verification
    files: list[str]


def export(cmd: ExportCommand) -> ExportResult:
    """Export the run per `cmd`; QloraError (with the export kept as OUTPUT_DIR.unverified) if it fails to verify."""
    options = cmd.export
    validate_export(cmd)
    out = Path(cmd.output_dir).expanduser()
    run = read_trained(cmd.run_dir)
    config = run.config
    hub.prepare(hub.hub_ids(config))
    device = default_device()
    log.info("export %s (step %s) -> %s as %s, merge=%s, dtype=%s", run.folder, run.state.get("step"), out,
             options.format.value, options.merge.value, options.dtype.value)

    from qlora import demo
    from qlora.model import autocast_dtype, load_trained_model

    demo.prepare_assets(config)  # a scratch base lives in the cache and may have been cleared
    tokenizer = export_tokenizer(run)
    sample = probe(config, tokenizer, options.probe_samples, options.probe_seq_len)
    autocast = autocast_dtype(config.train.mixed_precision)
    merges = options.format != ExportFormat.adapter
    verification = Verification(sample.source, options.max_kl)

    t0 = time.perf_counter()
    trained = load_trained_model(config, run.adapter, device)
    as_trained = logits_of(trained, sample, autocast)
    reference = None  # the model the export claims to be, rounded as the export stores it, in float32
    if merges and options.merge == MergeMode.dequantized:
        reference, rounded = _rounded_logits(trained, TORCH_DTYPES[options.dtype], sample, autocast)
        verification.report("rounding_vs_trained", compare(as_trained, rounded, sample),
                            f"the trained model (quantized base + adapter, as in training) vs the same with its merged "
                            f"weights rounded to {options.dtype.value}: what storing the merge in "
                            f"{options.dtype.value} costs, {_precision(autocast)}")
    log.info("trained model loaded and probed on %s in %.1fs", sample.source, time.perf_counter() - t0)

    needed = _export_bytes(trained, run, options)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        hf_dir = staging / ".hf" if options.format == ExportFormat.gguf else staging
        if options.format == ExportFormat.adapter:
            _write_adapter(run, tokenizer, staging)
        else:
            hf_dir.mkdir(exist_ok=True)
            _write_merged(trained, run, tokenizer, options, hf_dir)
        del trained  # one model on the device at a time from here on
        _free(device)
        if options.compare_original or options.merge == MergeMode.original:
            rounded_original = _measure_original(run, options, sample, as_trained, verification, device)
            if options.merge == MergeMode.original:
                reference = rounded_original
        if merges:
            assert reference is not None
            _check_merged(hf_dir, run, options, sample, as_trained, reference, verification, device,
                          gguf=(staging, out.name) if options.format == ExportFormat.gguf else None,
                          tokenizer=tokenizer)
        _write_card(run, cmd, verification, staging, tokenizer)
        return _finish(staging, out, cmd.overwrite, verification)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, QloraError) and out_of_space(e, out.parent, needed):
            raise QloraError(f"{disk_full(out.parent, f'the export {out.name}', needed)}; nothing was left in "
                             f"{out.parent} and the run is unchanged. free disk space or choose another output_dir, "
                             "then export again") from e
        raise


def _export_bytes(trained, run: TrainedRun, options: ExportConfig) -> int:
    """About the disk the export takes while it is written: the merged folder (in export.dtype) and, for a GGUF
    export, the file beside it; the adapter folder for export.format=adapter."""
    if options.format == ExportFormat.adapter:
        return folder_bytes(run.adapter) + 2**20  # and the tokenizer
    weights = 0
    for name, param in trained.named_parameters():
        if "lora_" not in name:
            state = getattr(param, "quant_state", None)  # a 4-bit weight is stored packed, two values a byte
            weights += math.prod(state.shape) if state is not None else param.numel()
    merged = weights * TORCH_DTYPES[options.dtype].itemsize
    if options.format == ExportFormat.gguf:
        from qlora.export.gguf_types import bytes_per_weight

        merged += int(weights * bytes_per_weight(_gguf_type(options)))
    return merged + 2**20  # the tokenizer, config and card


def _measure_original(run: TrainedRun, options: ExportConfig, sample: Probe, as_trained: list[torch.Tensor],
                      verification: Verification, device: torch.device) -> list[torch.Tensor] | None:
    """How far the unquantized base with the adapter unmerged is from the trained model; for a merged
    export.merge=original export, also its logits rounded to export.dtype in float32: the reference."""
    from qlora.model import autocast_dtype

    autocast = autocast_dtype(run.config.train.mixed_precision)
    precision = _precision(autocast)
    original = _load_original_with_adapter(run, device)
    unmerged = logits_of(original, sample, autocast)
    verification.report("original_merge_vs_trained", compare(as_trained, unmerged, sample),
                        "the trained model vs the unquantized base checkpoint with the adapter unmerged: how far "
                        f"export.merge=original is from what was trained, {precision}")
    reference = None
    if options.format != ExportFormat.adapter and options.merge == MergeMode.original:
        reference, rounded = _rounded_logits(original, TORCH_DTYPES[options.dtype], sample, autocast)
        verification.report("rounding_vs_original_unmerged", compare(unmerged, rounded, sample),
                            "the unquantized base with the adapter unmerged vs the same with its merged weights "
                            f"rounded to {options.dtype.value}, {precision}")
    del original
    _free(device)
    return reference


def _rounded_logits(model, dtype: torch.dtype, sample: Probe,
                    autocast: torch.dtype | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The peft `model`'s logits as its merge stored in `dtype` computes them: in float32 (the reference the
    export is checked against), and under training's `autocast` (what the rounding costs as the model ran)."""
    with as_merged(model, dtype):
        reference = logits_of(model, sample)
        return reference, reference if autocast is None else logits_of(model, sample, autocast)


def export_tokenizer(run: TrainedRun):
    """The run's tokenizer, with a chat template that prompts the model as it was trained (Alpaca runs get an
    Alpaca template), so plain `apply_chat_template` and GGUF runtimes format prompts right."""
    from transformers import AutoTokenizer

    from qlora import data as qdata
    from qlora.config import DataFormat

    tokenizer = AutoTokenizer.from_pretrained(str(run.tokenizer))
    if run.config.data.format == DataFormat.alpaca:
        bos = qdata.special_prefix(tokenizer) == [tokenizer.bos_token_id]
        tokenizer.chat_template = qdata.alpaca_chat_template(bos)
    return tokenizer


def _write_merged(trained, run: TrainedRun, tokenizer, options: ExportConfig, folder: Path) -> None:
    """config.json, generation_config.json, tokenizer and the merged weights, written into `folder`."""
    from transformers import AutoConfig

    from qlora.export.merge import OriginalWeights, merged_tensors, write_safetensors

    dtype = TORCH_DTYPES[options.dtype]
    original = OriginalWeights(run.config.model) if options.merge == MergeMode.original else None
    t0 = time.perf_counter()
    entries = merged_tensors(trained, options.merge, dtype, original)
    total = write_safetensors(entries, folder, size_bytes(options.max_shard_size), dtype)
    log.info("merged %d tensors (%.1f MiB, %s) in %.1fs", len(entries), total / 2**20, options.dtype.value,
             time.perf_counter() - t0)
    model_config = AutoConfig.from_pretrained(run.config.model.name_or_path, revision=run.config.model.revision,
                                              trust_remote_code=run.config.model.trust_remote_code)
    if hasattr(model_config, "quantization_config"):
        del model_config.quantization_config
    model_config.dtype = dtype
    model_config.use_cache = True
    model_config.save_pretrained(str(folder))
    _generation_config(run, tokenizer).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _generation_config(run: TrainedRun, tokenizer):
    """The base model's generation defaults, stopping at the tokens the fine-tune ends its answers with."""
    from transformers import GenerationConfig

    from qlora import data as qdata

    model = run.config.model
    try:
        generation = GenerationConfig.from_pretrained(model.name_or_path, revision=model.revision)
    except (OSError, ValueError):
        generation = GenerationConfig()
    generation.eos_token_id = qdata.stop_token_ids(run.config.data, tokenizer)
    generation.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    return generation


def _load_original_with_adapter(run: TrainedRun, device: torch.device):
    """The unquantized base checkpoint with the adapter applied unmerged: what export.merge=original computes.

    Loaded in float32, an exact copy of a 16- or 32-bit checkpoint's values, as the merge reads them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = run.config.model
    try:
        base = AutoModelForCausalLM.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code,
            dtype=torch.float32, device_map=_device_map(device), attn_implementation=model.attn_implementation)
    except (OSError, ValueError) as e:
        raise QloraError(f"could not load the unquantized base {model.name_or_path} to measure the original merge "
                         f"({first_line(e)}); pass export.compare_original=false to skip it") from e
    return PeftModel.from_pretrained(base, str(run.adapter), is_trainable=False).eval()


def _check_merged(hf_dir: Path, run: TrainedRun, options: ExportConfig, sample: Probe,
                  as_trained: list[torch.Tensor], reference: list[torch.Tensor], verification: Verification,
                  device: torch.device, gguf: tuple[Path, str] | None, tokenizer=None) -> None:
    """Load the merged folder with plain transformers in float32 (an exact upcast of what it stores) and compare
    it, computing in float32, with the rounded reference; then, for `gguf=(staging, name)`, the GGUF file."""
    from transformers import AutoModelForCausalLM

    from qlora.export.gguf_file import load_gguf_model
    from qlora.model import autocast_dtype

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(hf_dir), dtype=torch.float32, device_map=_device_map(device), output_loading_info=True,
            attn_implementation=run.config.model.attn_implementation)
    except (OSError, ValueError, RuntimeError) as e:
        verification.errors.append(f"transformers cannot load the merged export ({first_line(e)})")
        return
    wrong = {k: sorted(v)[:5] for k, v in info.items()
             if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if wrong:
        verification.errors.append(f"the merged weights do not fit the architecture: {wrong}")
        return
    merged = logits_of(model, sample)
    dtype = options.dtype.value
    if options.merge == MergeMode.dequantized:
        verification.check("merged_vs_rounded_trained", compare(reference, merged, sample),
                           "the export (loaded in float32) vs the trained model with its merged weights rounded to "
                           f"{dtype}, both computed in float32")
    else:
        autocast = autocast_dtype(run.config.train.mixed_precision)
        verification.check("merged_vs_rounded_original_unmerged", compare(reference, merged, sample),
                           "the export (loaded in float32) vs the unquantized base with the adapter unmerged, its "
                           f"merged weights rounded to {dtype}, both computed in float32")
        verification.report("merged_vs_trained", compare(as_trained, logits_of(model, sample, autocast), sample),
                            f"the trained model vs the export, {_precision(autocast)}")
    if gguf is None or verification.failed:
        return
    staging, name = gguf
    importance = _importance(model, run, options, tokenizer, verification)
    path = _write_gguf(hf_dir, staging, name, options, importance, verification)
    rounded = _as_stored_in_gguf(model, path, hf_dir, sample, verification, importance)
    del model  # one model at a time: the file is read back next
    _free(device)
    if rounded is None:
        return
    gguf_model, gguf_tokenizer = load_gguf_model(path)
    read_back = logits_of(gguf_model, sample)
    del gguf_model
    _check_gguf_tokenizer(path, tokenizer, gguf_tokenizer, sample, verification)
    verification.check("gguf_vs_rounded_merged", compare(rounded, read_back, sample),
                       "the GGUF file read back by transformers vs the merged export with each tensor rounded to the "
                       f"type the file stores it in ({path.name}), both in float32")
    verification.report("gguf_vs_trained", compare(as_trained, read_back, sample),
                        "the trained model vs the GGUF file read back")
    shutil.copy2(hf_dir / "generation_config.json", staging / "generation_config.json")
    _write_modelfile(staging, path.name, tokenizer, hf_dir)
    shutil.rmtree(hf_dir)


def _gguf_type(options: ExportConfig) -> str:
    return _GGUF_FOR_DTYPE[options.dtype] if options.gguf_type == GGUFType.auto else options.gguf_type.value


def _importance(model, run: TrainedRun, options: ExportConfig, tokenizer,
                verification: Verification) -> dict[str, torch.Tensor] | None:
    """The merged model's importance matrix for a K-quant file (export.calibration), by checkpoint weight name;
    None for the types that take none, or export.calibration=none."""
    from qlora.export.calibration import calibration_text, importance_matrix

    if not options.gguf_type.k_quant:
        if options.calibration != "run_data":
            log.info("export.calibration=%s is not used: %s is rounded to nearest, without an importance matrix",
                     options.calibration, _gguf_type(options))
        verification.file["calibration"] = "none (round-to-nearest)"
        return None
    calibration = calibration_text(run.config, tokenizer, options)
    if calibration is None:
        verification.file["calibration"] = "none (export.calibration=none)"
        return None
    verification.file["calibration"] = calibration.source
    t0 = time.perf_counter()
    importance = importance_matrix(model, calibration)
    verification.file["calibration_seconds"] = round(time.perf_counter() - t0, 1)
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in importance:
        # the file stores the tied head once, as the token embedding: its input is what the head multiplies
        importance["model.embed_tokens.weight"] = importance.pop("lm_head.weight")
    return importance


def _write_gguf(hf_dir: Path, staging: Path, name: str, options: ExportConfig,
                importance: dict[str, torch.Tensor] | None, verification: Verification) -> Path:
    from collections import Counter

    from qlora.export.gguf_file import write_gguf

    file_type = _gguf_type(options)
    path = staging / f"{name}-{file_type}.gguf"
    t0 = time.perf_counter()
    types = write_gguf(hf_dir, path, file_type, name=name, importance=importance)
    weights = sum(math.prod(shape) for shape in _shapes(hf_dir).values())
    verification.file.update(type=file_type, file=path.name, bytes=path.stat().st_size,
                             bits_per_weight=round(8 * path.stat().st_size / weights, 3),
                             write_seconds=round(time.perf_counter() - t0, 1),
                             tensor_types=dict(Counter(t.name for t in types.values()).most_common()))
    log.info("wrote %s (%.1f MiB) in %.1fs", path.name, path.stat().st_size / 2**20, time.perf_counter() - t0)
    return path


def _shapes(hf_dir: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in the merged folder, read from the safetensors headers."""
    from safetensors import safe_open

    shapes = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            shapes |= {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    return shapes


def _write_modelfile(staging: Path, gguf_name: str, tokenizer, hf_dir: Path) -> None:
    """An Ollama Modelfile beside the GGUF file (qlora/export/modelfile.py)."""
    from transformers import GenerationConfig

    from qlora.export.modelfile import modelfile

    text = modelfile(gguf_name, tokenizer, GenerationConfig.from_pretrained(str(hf_dir)))
    (staging / "Modelfile").write_text(text)


def _as_stored_in_gguf(model, path: Path, hf_dir: Path, sample: Probe, verification: Verification,
                       importance: dict[str, torch.Tensor] | None) -> list[torch.Tensor] | None:
    """The logits, in float32, of the merged HF `model` with each tensor rounded to the type the GGUF file at
    `path` stores it in (read from the file itself), by the importance matrix it was written with; None, with an
    error recorded, if the file lacks a tensor."""
    from qlora.export.gguf_file import stored_types
    from qlora.export.gguf_types import stored_values

    types = stored_types(path, hf_dir)
    missing = [key for key, _ in model.named_parameters() if key not in types]
    if missing:
        verification.errors.append(f"the GGUF file holds no tensor for {', '.join(missing[:5])}")
        return None
    importance = importance or {}
    with torch.no_grad():
        for key, param in model.named_parameters():
            param.data = stored_values(param.data.cpu(), types[key], importance.get(key)).to(param.device)
    return logits_of(model, sample)


def _check_gguf_tokenizer(path: Path, tokenizer, read_back, sample: Probe, verification: Verification) -> None:
    """The file prompts and stops as the HF tokenizer does: the same chat template, special-token ids and
    spellings, and the tokenizer transformers builds from the file encodes the probe text to the same ids."""
    import gguf

    keys = gguf.Keys.Tokenizer
    fields = gguf.GGUFReader(path).fields
    tokens = fields[keys.LIST]

    def scalar(key: str):
        return fields[key].contents() if key in fields else None

    wrong = []
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if template is not None and scalar(keys.CHAT_TEMPLATE) != template:
        wrong.append("its chat template differs from the tokenizer's")
    for role, key in (("bos", keys.BOS_ID), ("eos", keys.EOS_ID), ("pad", keys.PAD_ID)):
        token_id, token = getattr(tokenizer, f"{role}_token_id"), getattr(tokenizer, f"{role}_token")
        stored = scalar(key)
        if token_id is not None and (stored != token_id or tokens.contents(token_id) != token):
            wrong.append(f"its {role} token is id {stored}, not {token_id} ({token!r})")
    for ids in sample.sequences:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if read_back(text, add_special_tokens=False)["input_ids"] != tokenizer(text, add_special_tokens=False)[
                "input_ids"]:
            wrong.append("the tokenizer read from it encodes the probe text to other ids")
            break
    if wrong:
        verification.errors.append(f"the GGUF file's tokenizer is not the run's: {'; '.join(wrong)}")


def _write_adapter(run: TrainedRun, tokenizer, folder: Path) -> None:
    """The adapter as trained (peft format, base model named), with the tokenizer."""
    for file in run.adapter.iterdir():
        if file.is_file() and file.name != "README.md":
            shutil.copy2(file, folder / file.name)
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = run.config.model.name_or_path
    adapter_config["revision"] = run.config.model.revision
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    tokenizer.save_pretrained(str(folder))


def _write_card(run: TrainedRun, cmd: ExportCommand, verification: Verification, folder: Path, tokenizer) -> None:
    from qlora.export.card import model_card

    (folder / "verification.json").write_text(json.dumps(verification.to_json(), indent=2) + "\n")
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    (folder / "README.md").write_text(model_card(run, cmd, verification, files=files, tokenizer=tokenizer))


def _finish(staging: Path, out: Path, overwrite: bool, verification: Verification) -> ExportResult:
    """Rename the staged export into place: output_dir when verified, OUTPUT_DIR.unverified when not."""
    fsync_tree(staging)
    files = sorted(p.name for p in staging.iterdir())
    if verification.failed:
        kept = out.with_name(out.name + ".unverified")
        shutil.rmtree(kept, ignore_errors=True)
        staging.replace(kept)
        fsync_dir(kept.parent)
        raise QloraError(f"the export does not compute what it should ({'; '.join(verification.failed)}; limit "
                         f"export.max_kl={verification.max_kl:g}, against the trained model rounded as the export "
                         f"stores it); kept for inspection as {kept}, see its verification.json")
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        assert overwrite or not any(out.iterdir())
        shutil.rmtree(old, ignore_errors=True)
        out.replace(old)
    staging.replace(out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    for name, c in {**verification.checks, **verification.drift}.items():
        log.info("%s: max |logit diff| %.3g, mean KL %.3g nats, top-1 agreement %.1f%%, perplexity %.3f vs %.3f",
                 name, c.max_abs_logit_diff, c.mean_kl, 100 * c.top1_agreement, c.perplexity_reference,
                 c.perplexity_candidate)
    log.info("export verified and written to %s", out)
    return ExportResult(out, verification, files)


def _device_map(device: torch.device):
    # On a GPU let accelerate spill what does not fit to the CPU; verification needs logits, not speed.
    return "auto" if device.type == "cuda" else {"": device}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _precision(autocast: torch.dtype | None) -> str:
    return f"both under {str(autocast).removeprefix('torch.')} autocast as in training" if autocast else \
        "both in float32 as in training"
