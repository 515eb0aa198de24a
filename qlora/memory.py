"""The process's memory: its peak for logs and summaries, its resident size and the RAM still free (for plans of CPU
runs), and, on request, glibc's malloc set up so that a CPU run's memory is what its tensors need.

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
    return peak_bytes(device) / GIB


def peak_bytes(device) -> int:  # device: torch.device
    """Peak memory so far (bytes): CUDA's max allocated on a GPU, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device)
    # Linux's VmHWM is this process's own peak; getrusage's ru_maxrss survives exec (and fork), so a run started
    # from a bigger process would report that one's peak.
    peak = _status_kib("VmHWM")
    if peak is not None:
        return peak * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux's VmRSS); None where it is not known."""
    resident = _status_kib("VmRSS")
    return None if resident is None else resident * 1024


def available_ram() -> int | None:
    """Linux's MemAvailable (free memory plus the page cache it can reclaim); None where it is not known."""
    available = _kib("/proc/meminfo", "MemAvailable")
    return None if available is None else available * 1024


COMPACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_ARENA_MAX": "1"}
"""glibc's malloc settings of QLORA_MALLOC=compact: every block of 1 MiB or more mapped on its own and returned to
the system when freed, and one arena for all threads."""


def compact_malloc() -> bool:
    """Whether this process's malloc returns freed large blocks at once: a fixed mmap threshold of at most 1 MiB
    (QLORA_MALLOC=compact, or the user's own MALLOC_MMAP_THRESHOLD_)."""
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
    return threshold.isdigit() and int(threshold) <= 2**20


def exec_with_compact_malloc(argv: list[str]) -> None:
    """With QLORA_MALLOC=compact, restart this `qlora` command with COMPACT_MALLOC set; otherwise, or where that is
    done already or not glibc's business (not Linux, another libc), return.

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), so after the first frees a
    training step's large temporaries come from the heap, where freed blocks are kept for reuse and fragment.
    SmolLM2-135M at 8 x 384 tokens on a CPU: the step's tensors peak at 6.25 GiB (counted by qlora.plan.PeakBytes),
    the process grows by 10.1 GiB; compact, by 6.28 GiB, but every step maps fresh pages from the system and takes
    about 1.45 times as long (docs/plan.md). The plan prices either (`qlora.plan.CPU_ALLOCATOR_SHARE`). The settings
    are read when a process starts, hence the restart: execv keeps the process id, arguments and environment, and
    costs one interpreter start before anything is imported.
    """
    if os.environ.get("QLORA_MALLOC", "default") != "compact" or compact_malloc():
        return
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    os.environ.update(COMPACT_MALLOC)
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
