"""The process's memory: its peak for logs and summaries, its resident size and the RAM still free (for plans of CPU
runs), and glibc's allocator kept to one arena so that a CPU run's memory is what its tensors need.

Linux figures come from /proc; elsewhere the peak falls back to getrusage and the others are unknown (None).
"""

from __future__ import annotations

import sys
from pathlib import Path

GIB = 2**30


def peak_gb(device) -> float:  # device: torch.device
    """Peak memory so far (GiB): CUDA's max allocated on a GPU, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / GIB
    # Linux's VmHWM is this process's own peak; getrusage's ru_maxrss survives exec, so a run started from a
    # bigger process would report that one's peak.
    peak = _status_kib("VmHWM")
    if peak is not None:
        return peak * 1024 / GIB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (GIB if sys.platform == "darwin" else 2**20)


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux's VmRSS); None where it is not known."""
    resident = _status_kib("VmRSS")
    return None if resident is None else resident * 1024


def available_ram() -> int | None:
    """Linux's MemAvailable (free memory plus the page cache it can reclaim); None where it is not known."""
    available = _kib("/proc/meminfo", "MemAvailable")
    return None if available is None else available * 1024


def one_malloc_arena() -> None:
    """Have glibc's malloc serve every thread from one arena (a no-op elsewhere, and when already done).

    glibc gives each thread that allocates an arena of its own, and an arena keeps what is freed in it for reuse.
    torch's worker threads allocate too, so on a CPU a training step's freed temporaries pile up in several arenas:
    SmolLM2-135M at 8 x 384 tokens on 2 threads grew the process by 1.47 times the most bytes its tensors held at
    once; with one arena, by 1.03 times, at the same step time and tokenization speed (docs/plan.md). It applies to
    arenas made after the call, so the CLI calls it before torch starts its threads.
    """
    global _arenas_limited
    if _arenas_limited or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): its allocator is its own business
        return
    M_ARENA_MAX = -8  # glibc's malloc.h
    libc.mallopt(M_ARENA_MAX, 1)
    _arenas_limited = True


_arenas_limited = False


def _status_kib(key: str) -> int | None:
    return _kib("/proc/self/status", key)


def _kib(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None
