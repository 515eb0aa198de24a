"""The export's model card (README.md): where the model came from, how it was trained and merged, and the
verification figures, in the layout the Hugging Face hub reads (YAML metadata, then Markdown)."""

from __future__ import annotations

import math
from pathlib import Path

from qlora.config import ExportCommand, ExportFormat, LoraInit, MergeMode, ObjectiveName, QuantMethod
from qlora.runfolder import TrainedRun

_WHAT = {
    ExportFormat.hf: "a merged model (base weights plus the trained LoRA update, in one set of safetensors)",
    ExportFormat.gguf: "a merged model in one GGUF file, for llama.cpp-family runtimes",
    ExportFormat.adapter: "the trained LoRA adapter alone (peft format), to apply to the base model",
}

_MERGE = {
    MergeMode.dequantized: "the base weights the adapter was trained against (the quantized weights, dequantized) "
                           "plus the LoRA update, so the model computes what was trained",
    MergeMode.original: "the original, unquantized base weights plus the LoRA update; the adapter never saw "
                        "those weights, so this model differs from the trained one by the drift shown below",
}


def model_card(run: TrainedRun, cmd: ExportCommand, verification, *, files: list[str], tokenizer) -> str:
    config, options = run.config, cmd.export
    base = config.model.name_or_path
    hub_id = not Path(base).expanduser().exists()
    quant = config.quant.method.value + ("+double-quant" if config.quant.double_quant else "")
    if config.quant.method == QuantMethod.none:
        quant = "none (16/32-bit base)"
    lora = config.lora
    eval_loss = run.state.get("final_eval_loss")
    preference = config.objective.name != ObjectiveName.sft
    lines = ["---"]
    if hub_id:
        lines.append(f"base_model: {base}")
    lines += ["library_name: " + ("peft" if options.format == ExportFormat.adapter else "transformers"),
              "tags:", "- qlora", "- lora", f"- {options.format.value}", "---", "",
              f"# {Path(cmd.output_dir).name}", "",
              f"This is {_WHAT[options.format]}, from a QLoRA fine-tune of `{base}` made with qlora.", "",
              "## Training", "",
              "| | |", "|---|---|",
              f"| base model | `{base}` (revision `{config.model.revision}`) |",
              f"| base quantization | {quant}, compute dtype {config.quant.compute_dtype.value} |",
              f"| LoRA | r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, targets "
              f"{', '.join(lora.target_modules)}{', rsLoRA' if lora.rslora else ''}{', DoRA' if lora.dora else ''} |",
              f"| adapter init | {_init(config)} |",
              f"| quality options | {_options(config)} |",
              f"| recipe | {run.recipe or '(not recorded)'} |",
              f"| objective | {_objective(config)} |",
              f"| data | `{config.data.path}` ({config.data.format.value}) |",
              f"| steps | {run.state.get('step')} of {config.train.max_steps}, batch "
              f"{config.train.micro_batch_size * config.train.grad_accum_steps}, lr {config.optim.lr:g}, "
              f"{config.optim.name.value} |",
              f"| final eval loss | {_pair_loss(eval_loss) if preference else _loss(eval_loss)} |",
              f"| run | `{run.folder}` |", ""]
    if options.format != ExportFormat.adapter:
        lines += ["## Merge", "",
                  f"`export.merge={options.merge.value}`: {_MERGE[options.merge]}. Weights are "
                  f"{options.dtype.value}.", ""]
    lines += ["## Verification", "",
              f"Next-token distributions compared on {verification.probe}. Each check compares the export with the "
              "model it claims to be, rounded as the export stores it, so a right export differs by floating-point "
              f"operation order alone; a check must stay within mean KL {verification.max_kl:g} nats per token "
              "(`export.max_kl`). Drift is for information: what the storage rounding costs against the model "
              "as trained, and how far other choices would be.", "",
              "| comparison | kind | max abs logit diff | mean KL (nats) | top-1 agreement | perplexity (ref / this) |",
              "|---|---|---|---|---|---|"]
    for kind, group in (("check", verification.checks), ("drift", verification.drift)):
        for name, c in group.items():
            lines.append(f"| {name.replace('_', ' ')} | {kind} | {c.max_abs_logit_diff:.3g} | {c.mean_kl:.3g} | "
                         f"{100 * c.top1_agreement:.1f}% | {c.perplexity_reference:.3f} / "
                         f"{c.perplexity_candidate:.3f} |")
    lines += ["", *(f"- {name.replace('_', ' ')}: {text}." for name, text in verification.compared.items()),
              "", f"Result: {'passed' if not verification.failed else 'FAILED: ' + '; '.join(verification.failed)}.",
              "", "## Use", "", *_usage(cmd, files, tokenizer), "", "## Files", "",
              ", ".join(f"`{f}`" for f in files + ["README.md"]), ""]
    return "\n".join(lines)


def _usage(cmd: ExportCommand, files: list[str], tokenizer) -> list[str]:
    folder = cmd.output_dir
    prompt = "[{'role': 'user', 'content': 'Give three tips for staying healthy.'}]"
    if cmd.export.format == ExportFormat.gguf:
        gguf = next((f for f in files if f.endswith(".gguf")), "MODEL.gguf")
        return ["```", f"llama-cli -m {folder}/{gguf} -cnv", "```"]
    if cmd.export.format == ExportFormat.adapter:
        return ["```python", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
                f"model = AutoPeftModelForCausalLM.from_pretrained('{folder}')",
                f"tokenizer = AutoTokenizer.from_pretrained('{folder}')", "```", "",
                "Merging this adapter into the original base weights gives a different model from the trained one "
                "(see the drift above); `qlora export` with `export.merge=dequantized` merges it faithfully."]
    chat = bool(tokenizer.chat_template)
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"model = AutoModelForCausalLM.from_pretrained('{folder}')",
            f"tokenizer = AutoTokenizer.from_pretrained('{folder}')",
            *([f"inputs = tokenizer.apply_chat_template({prompt}, add_generation_prompt=True, return_dict=True, "
               "return_tensors='pt')"] if chat else ["inputs = tokenizer('Once upon a time', return_tensors='pt')"]),
            "output = model.generate(**inputs, max_new_tokens=128)",
            "print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))", "```", "",
            f"or `qlora generate model={folder} prompt=\"...\"`."]


def _init(config) -> str:
    if config.lora.init == LoraInit.loftq:
        return ("loftq: B @ A started as the rank-r SVD of the base's quantization error, so the adapter holds a "
                "correction towards the float weights; merged into the dequantized base it computes what was trained, "
                "merged into the original weights (or applied to them) it counts that correction twice")
    return config.lora.init.value


def _options(config) -> str:
    used = []
    if config.optim.lora_plus_ratio is not None:
        used.append(f"LoRA+ (B matrices at lr x {config.optim.lora_plus_ratio:g})")
    if config.train.neftune_alpha is not None:
        used.append(f"NEFTune (alpha {config.train.neftune_alpha:g}, training forwards only)")
    return ", ".join(used) or "none"


def _loss(loss: float | None) -> str:
    return "(no eval split)" if loss is None else f"{loss:.4f} (perplexity {math.exp(min(loss, 50)):.2f})"


def _objective(config) -> str:
    """The training objective and the keys that shape it."""
    objective = config.objective
    name = objective.name
    if name == ObjectiveName.sft:
        return "sft (next-token loss on the answers)"
    if name == ObjectiveName.dpo:
        reference = "precomputed" if objective.precompute_reference else "in each step"
        return (f"dpo ({objective.loss_type.value}, beta={objective.beta:g}, label smoothing "
                f"{objective.label_smoothing:g}; reference: the base with the adapter disabled, {reference})")
    if name == ObjectiveName.orpo:
        return f"orpo (lambda={objective.beta:g})"
    return f"simpo (beta={objective.beta:g}, gamma={objective.gamma:g})"


def _pair_loss(loss: float | None) -> str:
    return "(not measured)" if loss is None else f"{loss:.4f} per pair"
