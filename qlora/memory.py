"""The process's memory: its peak for logs and summaries, its resident size and the RAM still free (for plans of CPU
runs), and glibc's malloc set up so that a CPU run's memory is what its tensors need.

Linux figures come from /proc; elsewhere the peak falls back to getrusage and the others are unknown (None).
"""

from __future__ import annotations

import os
import platform
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


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_ARENA_MAX": "1"}
"""glibc's malloc settings for a run: every block of 1 MiB or more mapped on its own and returned to the system
when freed, and one arena for all threads."""


def exec_with_run_malloc(argv: list[str]) -> None:
    """Restart this `qlora` command with MALLOC_ENV set; return where that is done already or is not glibc's
    business (not Linux, another libc, a user's own MALLOC_MMAP_THRESHOLD_, or QLORA_MALLOC=default).

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), so after the first few
    frees a training step's large temporaries come from the heap, and a freed heap block is kept for reuse;
    fragmented by blocks of every size, the heap keeps growing. SmolLM2-135M at 8 x 384 tokens: the step's tensors
    peak at 6.25 GiB (counted by qlora.plan.PeakBytes), the process grew by 10.1 GiB in its first step and by 13.6
    GiB by its second; with a fixed 1 MiB threshold, by 6.27 and 6.29 GiB, at the same step time (docs/plan.md).
    The settings are read when the process starts, hence the restart: execv keeps the process id, arguments and
    environment, and costs one interpreter start before anything is imported.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or os.environ.get("QLORA_MALLOC") == "default":
        return
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    os.environ.update(MALLOC_ENV)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "qlora", *argv])


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
