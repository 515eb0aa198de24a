"""Run by torchrun in tests/test_distributed.py: one training run per process, then what each process holds.

    torchrun --nproc_per_node N tests/distributed_worker.py RESULT_DIR OVERRIDE...

Trains with `qlora.train.run` on the composed config and writes RESULT_DIR/rank{R}.pt: the process's LoRA
tensors (whole, gathered from shards under FSDP), and how many rows of each 4-bit weight this process holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import bitsandbytes as bnb
import torch

from qlora import distributed
from qlora.composition import compose_config
from qlora.train import run


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    result = run(compose_config(overrides))
    model = result.model
    adapter = {name: distributed.full(p.detach()).cpu() for name, p in model.named_parameters() if p.requires_grad}
    # (rows held here, rows in all) of each 4-bit weight: packed into float storage, sharded by rows
    four_bit = [(p.to_local().shape[0] if hasattr(p, "to_local") else p.shape[0], p.shape[0])
                for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) for p in [m.weight]]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"adapter": adapter, "four_bit_rows": four_bit, "sharded": distributed.is_sharded(model)},
               out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
