"""`qlora plan` against what a run allocates, on this machine: prints a Markdown table.

    python scripts/plan_vs_measured.py [--cache DIR]

For tiny Llama-architecture models on the CPU: the exact quantities (quantized base, LoRA weights, optimizer
state) against the bytes of the loaded tensors, and the activation estimate against the bytes autograd saves for
the backward pass (measured with saved-tensor hooks). Then, for each number of decoder layers recomputed
(gradient checkpointing), the plan's per-step memory (activations, logits, workspace) against the most bytes a
training step's tensors held at once (`qlora.plan.PeakBytes`). On a GPU the whole-run peak would be compared with
CUDA's max allocated; that comparison has not been run yet (no GPU was available when this was written).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from qlora import demo
from qlora.composition import compose_config
from qlora.lora import attach_lora
from qlora.loss import CausalLMLoss
from qlora.model import enable_checkpointing, load_base_model, prepare_kbit, quant_report
from qlora.optim import build_optimizer
from qlora.plan import PeakBytes, gib, measured_saved_bytes, measured_state_bytes, plan

SHAPE = ["model.scratch.hidden_size=192", "model.scratch.intermediate_size=512", "model.scratch.num_attention_heads=3",
         "model.scratch.num_key_value_heads=1", "model.scratch.num_hidden_layers=3", "lora.r=8",
         "train.micro_batch_size=3", "train.seq_len=80", "train.loggers=[]", "train.gradient_checkpointing=false"]
CASES = {
    "float32, dropout 0": ["lora.dropout=0.0"],
    "float32, dropout 0.1": ["lora.dropout=0.1"],
    "bf16 autocast, dropout 0": ["lora.dropout=0.0", "quant.compute_dtype=bfloat16", "train.mixed_precision=bf16"],
    "bf16 autocast, dropout 0.1": ["lora.dropout=0.1", "quant.compute_dtype=bfloat16", "train.mixed_precision=bf16"],
}


CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=tempfile.mkdtemp(prefix="qlora-plan-"))
    args = parser.parse_args()
    print("| case | base (plan / tensors) | LoRA | optimizer state | activations saved (plan / autograd) | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, overrides in CASES.items():
        config = compose_config([f"cache_dir={args.cache}", f"model.scratch.path={args.cache}/m",
                                 f"output_dir={args.cache}/r", *SHAPE, *overrides])
        demo.prepare_assets(config)
        base = prepared_base(config)
        base_bytes = quant_report(base).total_bytes
        model = attach_lora(base, config.lora)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        batch = torch.randint(0, model.config.vocab_size, (config.train.micro_batch_size, config.train.seq_len))
        saved = measured_saved_bytes(model, batch, config.train.mixed_precision.value == "bf16")
        optimizer = build_optimizer(trainable, config.optim, CPU)
        model(input_ids=batch[:, :8]).logits.float().sum().backward()
        optimizer.step()
        p = plan(config, "cpu")
        planned = p.activation_bytes + p.tokens * model.config.vocab_size * 4
        lora = sum(t.numel() * t.element_size() for t in trainable)
        print(f"| {name} | {p.base_bytes:,} / {base_bytes:,} | {p.trainable_bytes:,} / {lora:,} | "
              f"{p.optimizer_bytes:,} / {measured_state_bytes(optimizer):,} | {gib(planned)} / {gib(saved)} | "
              f"{planned / saved:.3f} |")
    recomputation(args.cache)


def prepared_base(config):
    """The base as `qlora train` prepares it (peft's k-bit preparation, embeddings kept in the compute dtype)."""
    model = load_base_model(config.model, config.quant, CPU)
    return prepare_kbit(model, config.train.float32_embeddings, config.lora.modules_to_save)


def recomputation(cache: str) -> None:
    """Plan against measured per-step peak for 0..L recomputed layers (float32, LoRA dropout 0.1)."""
    config = compose_config([f"cache_dir={cache}", f"model.scratch.path={cache}/m4", f"output_dir={cache}/r", *SHAPE,
                             "model.scratch.num_hidden_layers=4", "train.micro_batch_size=2", "train.seq_len=256",
                             "lora.dropout=0.1"])
    demo.prepare_assets(config)
    layers = config.model.scratch.num_hidden_layers
    print(f"\n| decoder layers recomputed (of {layers}) | per-step peak (plan / measured) | ratio |")
    print("| --- | --- | --- |")
    for checkpointed in range(layers + 1):
        base = prepared_base(config)
        enable_checkpointing(base, checkpointed)
        loss = CausalLMLoss(attach_lora(base, config.lora), config.train.loss_chunk_tokens).train()
        batch = torch.randint(0, base.config.vocab_size, (config.train.micro_batch_size, config.train.seq_len))
        loss(input_ids=batch, labels=batch).backward()  # gradients allocated: the next step is a steady one
        with PeakBytes() as peak:
            loss(input_ids=batch, labels=batch).backward()
        p = plan(config, "cpu", checkpointed)
        planned = p.activation_bytes + p.logits_bytes + p.workspace_bytes
        print(f"| {checkpointed} | {gib(planned)} / {gib(peak.bytes)} | {planned / peak.bytes:.3f} |")


if __name__ == "__main__":
    main()
