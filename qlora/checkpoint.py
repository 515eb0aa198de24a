"""Checkpoints: everything a run needs to continue exactly where it stopped, written so a crash never
leaves a half-written one; and finding the one to resume from.

    output_dir/checkpoints/step-000200/
        adapter/        the LoRA weights in peft's format (usable on their own with the run's tokenizer/)
        optimizer.pt    optimizer state, bitsandbytes' 8-bit state included
        scheduler.pt    learning-rate schedule position
        scaler.pt       the fp16 gradient scaler's state (train.mixed_precision=fp16 only)
        rng.pt          python, numpy, torch CPU and CUDA generator states
        state.json      the TrainState (step, epoch, data position, eval losses so far) and the samples
                        generated before training
        config.yaml     the resolved config that produced it

A checkpoint is written into `.step-000200.tmp`, every file and folder fsynced, then renamed into place, so a
folder named `step-*` is complete by construction. Loading reads safetensors and `torch.load(weights_only=True)`
only: a checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from qlora.config import Config
from qlora.errors import QloraError, first_line
from qlora.files import NO_SPACE, disk_full, folder_bytes, out_of_space, write_folder_atomic

log = logging.getLogger(__name__)

FOLDER = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")

# Keys that may differ between a checkpoint's config and the resumed run's without changing what is computed.
HARMLESS_KEYS = frozenset({
    "output_dir", "overwrite", "resume", "force_resume", "debug", "cache_dir", "data.cache",
    "train.max_steps", "train.eval_every_steps", "train.eval_max_sequences", "train.log_every_steps",
    "train.eval_max_batches",  # an earlier version's name for the eval bound
    "train.num_workers", "train.sample_prompts", "train.samples_from_eval", "train.max_new_tokens", "train.progress",
    "train.loggers", "train.project", "train.report", "train.check_memory", "train.memory_limit_gb",
    "train.save_every_steps", "train.keep_checkpoints", "train.on_nonfinite_loss",
    "train.loss_chunk_tokens",  # the same loss, summed in another order
    "train.gradient_checkpointing",  # recomputed activations are the same activations (dropout masks included)
    "train.per_sample_attention",  # the same attention, without the masked-out scores
    # How processes share the work does not change what a step computes (the process count is checked apart).
    "dist.strategy", "dist.cpu_offload", "dist.timeout_minutes",
})


@dataclass
class TrainState:
    """Where the run is: everything the loop advances, saved in every checkpoint (state.json)."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Completed passes over the training data."""
    batch: int = 0
    """Micro batches drawn in the current epoch: with the epoch, the exact data position."""
    tokens_seen: int = 0
    """Non-padding tokens consumed (prompt and response)."""
    tokens_trained: int = 0
    """Tokens that carried loss."""
    first_eval_loss: float | None = None
    final_eval_loss: float | None = None
    skipped_steps: int = 0
    """Updates skipped for a non-finite loss (train.on_nonfinite_loss=skip)."""
    processes: int = 1
    """Processes that trained (each draws its own share of the batches, so `batch` counts per process)."""


def step_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    root = Path(run_dir) / FOLDER
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def is_finished(run_dir: Path) -> bool:
    """Whether a run completed: summary.json is the last file a run writes."""
    return (Path(run_dir) / "summary.json").is_file()


# ----------------------------------------------------------------------------------------------- writing


def folder(run_dir: Path, step: int) -> Path:
    """Where checkpoint `step` of the run in `run_dir` lives."""
    return Path(run_dir) / FOLDER / f"step-{step:06d}"


def save(run_dir: Path, step: int, write: Callable[[Path], None], keep: int, needed: int = 0) -> Path:
    """Write checkpoint `step` with `write(folder)`, atomically; then keep only the newest `keep` (0: all).

    A disk that runs out while writing leaves the earlier checkpoints as they were, and a QloraError names the
    folder, the bytes needed (what the newest checkpoint took, or `needed` for the first) and what is free."""
    target = folder(run_dir, step)
    target.parent.mkdir(exist_ok=True)
    previous = [p for p in complete_checkpoints(run_dir) if p != target]
    needed = folder_bytes(previous[-1]) if previous else needed
    kept = f"checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    try:
        write_folder_atomic(target, write)
    except Exception as e:
        if out_of_space(e, target.parent, needed):
            raise QloraError(f"{disk_full(target.parent, f'checkpoint {target.name}', needed)}; {kept}. free disk "
                             "space (or lower train.keep_checkpoints), then continue with resume=auto") from e
        if not isinstance(e, OSError):
            raise
        raise QloraError(f"{_why(e)} while writing checkpoint {target}; {kept}. "
                         f"{_fix(e)}, then continue with resume=auto") from e
    for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def estimated_bytes(*states) -> int:
    """About what torch.save / safetensors write for these nested dicts and lists of tensors: their bytes, a
    record's overhead per tensor, and a margin for the small files beside them."""
    tensors = []

    def walk(x) -> None:
        if isinstance(x, torch.Tensor):
            tensors.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    for state in states:
        walk(state)
    return sum(t.numel() * t.element_size() + 4096 for t in tensors) + 2**16


def write_parts(folder: Path, *, model, adapter: dict | None, optimizer: dict, scheduler: dict, scaler: dict | None,
                state: dict, config_yaml: str) -> None:
    """Write a checkpoint's files into `folder` (what `read` reads back): `model`'s adapter (`adapter` holds its
    tensors when they were gathered from shards), the optimizer, schedule and scaler states, the RNG states now,
    state.json and config.yaml."""
    model.save_pretrained(str(folder / "adapter"), state_dict=adapter)
    torch.save(optimizer, folder / "optimizer.pt")
    torch.save(scheduler, folder / "scheduler.pt")
    torch.save(rng_state(), folder / "rng.pt")
    if scaler is not None:
        torch.save(scaler, folder / "scaler.pt")
    (folder / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    (folder / "config.yaml").write_text(config_yaml)


def remove_partial(run_dir: Path) -> None:
    """Delete what a killed writer left behind (temporary folders are never read)."""
    root = Path(run_dir) / FOLDER
    for leftover in root.glob(".step-*") if root.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)


def _why(e: OSError) -> str:
    if e.errno in NO_SPACE:
        return "disk full" if e.errno != errno.EFBIG else "file size limit reached"
    return f"{e.strerror or e}"


def _fix(e: OSError) -> str:
    return "free disk space (or lower train.keep_checkpoints)" if e.errno in NO_SPACE else "fix the file system"


# ----------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every random generator a step can draw from (dropout, data workers), in torch.load-safe types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class Checkpoint:
    """A checkpoint read fully into memory (so a bad file is found before anything is changed)."""

    path: Path
    state: dict
    adapter: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict
    config: dict
    scaler: dict | None = None

    @property
    def step(self) -> int:
        return self.state["step"]


def read(path: Path) -> Checkpoint:
    """Load every part of the checkpoint at `path`; QloraError naming the file if one is missing or unreadable."""
    from safetensors.torch import load_file

    path = Path(path)
    current = "state.json"
    try:
        state = json.loads((path / current).read_text())
        current = "adapter/adapter_model.safetensors"
        adapter = load_file(path / current)
        parts = {}
        for current in ("optimizer.pt", "scheduler.pt", "rng.pt"):
            parts[current] = torch.load(path / current, map_location="cpu", weights_only=True)
        current = "scaler.pt"
        scaler = torch.load(path / current, weights_only=True) if (path / current).is_file() else None
        current = "config.yaml"
        config = OmegaConf.to_container(OmegaConf.load(path / current))
    except Exception as e:  # noqa: BLE001 (any failure to read means the same thing to the user)
        raise QloraError(f"checkpoint {path} is unreadable: {current}: {first_line(e)}; "
                         "resume from another checkpoint (resume=PATH) or start over") from e
    return Checkpoint(path, state, adapter, parts["optimizer.pt"], parts["scheduler.pt"], parts["rng.pt"], config,
                      scaler)


def find(config: Config) -> Checkpoint | None:
    """The checkpoint `config.resume` asks for, read; None to start fresh.

    resume=auto takes the newest checkpoint in output_dir that reads back whole, falling back to older ones
    (with a warning) if the newest is damaged; resume=PATH takes that checkpoint, or a run folder's newest.
    """
    if config.resume is None:
        return None
    if config.resume == "auto":
        candidates = complete_checkpoints(Path(config.output_dir))
        for path in reversed(candidates):
            try:
                return read(path)
            except QloraError as e:
                log.warning("%s; trying the one before it", e)
        if candidates:
            raise QloraError(f"resume=auto: none of the {len(candidates)} checkpoints in "
                             f"{Path(config.output_dir) / FOLDER} is readable; start over with overwrite=true")
        return None
    return read(resolve_path(config.resume))


def resolve_path(resume: str) -> Path:
    """The checkpoint folder resume=PATH names: the folder itself, or a run folder's newest checkpoint."""
    path = Path(resume).expanduser()
    if (path / "state.json").is_file():
        return path
    if not path.exists():
        raise QloraError(f"resume={resume}: no such folder; give a run folder or one of its checkpoints "
                         f"(RUN/{FOLDER}/step-N), or resume=auto")
    found = complete_checkpoints(path)
    if not found:
        raise QloraError(f"resume={resume}: no checkpoint there (looked for {FOLDER}/step-N); it was written by a "
                         "run with checkpoints, or give another path")
    return found[-1]


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to."""
    return Path(checkpoint).parent.parent


def differences(saved: dict, config: Config) -> list[str]:
    """Config keys whose value changes what training computes, as 'key (saved -> now)'."""
    now = _flatten(OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True))
    before = _flatten(saved)
    changed = []
    for key in sorted(set(now) | set(before)):
        if key in HARMLESS_KEYS or now.get(key, "(absent)") == before.get(key, "(absent)"):
            continue
        changed.append(f"{key} ({before.get(key, '(absent)')} -> {now.get(key, '(absent)')})")
    return changed


def _flatten(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    flat = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return flat
