"""The device a command runs on when nothing else chooses one: the current CUDA device, else the CPU.

Training takes its device from accelerate; `qlora eval`, `qlora export` and `qlora generate` use this one.
"""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """The current CUDA device (by index, as bitsandbytes places weights) if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
