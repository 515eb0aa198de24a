"""How much a CPU training step grows the process, against what its tensors hold (the malloc table of docs/plan.md).

    MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_ARENA_MAX=1 python scripts/malloc_probe.py MODEL_DIR --shape 8x384

Loads MODEL_DIR as `qlora train recipe=smollm2-alpaca` does (NF4 + double quant, LoRA on every linear layer),
then runs forward + backward on random token ids, `--steps` times; with `--count-step K`, step K runs under
`qlora.plan.PeakBytes`, which counts the most bytes its tensors held at once. After each step it prints the
resident size and the peak (VmHWM) over the resident size before the first step. malloc's settings are read
when the process starts: set them in its environment (this script does not restart itself as `qlora` does).
"""

from __future__ import annotations

import argparse
import time

import torch

from qlora import memory
from qlora.composition import compose_config
from qlora.lora import attach_lora
from qlora.loss import CausalLMLoss
from qlora.model import load_base_model, prepare_kbit
from qlora.plan import PeakBytes

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--shape", default="8x384", help="MICROxSEQ_LEN")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--count-step", type=int, default=None, help="run this step (0-based) under PeakBytes")
    args = parser.parse_args()
    micro, seq_len = (int(n) for n in args.shape.split("x"))
    config = compose_config(["recipe=smollm2-alpaca", f"model.name_or_path={args.model}",
                             f"train.micro_batch_size={micro}", f"train.seq_len={seq_len}",
                             "train.gradient_checkpointing=false", "model.attn_implementation=sdpa"])
    cpu = torch.device("cpu")
    model = prepare_kbit(load_base_model(config.model, config.quant, cpu, torch.float32),
                         config.train.float32_embeddings, config.lora.modules_to_save)
    model.config.use_cache = False
    loss = CausalLMLoss(attach_lora(model, config.lora), config.train.loss_chunk_tokens)
    ids = torch.randint(0, model.config.vocab_size, (micro, seq_len), generator=torch.Generator().manual_seed(0))
    before = memory.resident_bytes() / GIB
    print(f"resident before the first step: {before:.2f} GiB")
    for step in range(args.steps):
        counting = PeakBytes() if step == args.count_step else None
        started = time.perf_counter()
        with counting or torch.enable_grad():
            loss(input_ids=ids, labels=ids).backward()
        seconds = time.perf_counter() - started
        model.zero_grad(set_to_none=True)
        counted = f", tensors peaked at {counting.bytes / GIB:.2f} GiB" if counting else ""
        print(f"step {step}: {seconds:.1f} s{counted}; resident {memory.resident_bytes() / GIB:.2f} GiB, "
              f"peak growth {memory.peak_gb(cpu) - before:.2f} GiB")


if __name__ == "__main__":
    main()
