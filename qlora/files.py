"""Writes that are all or nothing: a file or folder is either its old complete self or the new complete one; and
what a full disk looks like, so a write that runs out of space is one line naming the folder and the bytes needed."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to a temporary sibling, fsync it, and rename it over `path`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary sibling, fsync it, and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def write_folder_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder with `write(folder)`, fsync it, then swap it in for `target`.

    At every instant `target` is either its old complete self or the new complete one. An error leaves
    `target` as it was and removes the temporary folder.
    """
    staging = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        write(staging)
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            fsync_dir(path)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_SPACE_TEXT = tuple(os.strerror(code) for code in NO_SPACE) + ("os error 28",)


def free_bytes(path: Path) -> int:
    """Bytes free to this process on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def out_of_space(e: BaseException, folder: Path | None = None, needed: int = 0) -> bool:
    """Whether a failed write ran out of space. An OSError says so by its errno; safetensors says it in the text of
    its own error ("No space left on device (os error 28)"); torch.save says nothing of the cause ("unexpected pos
    ..."), so with `folder` a write that needed more than is free there counts as well."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE or any(t in str(seen) for t in _NO_SPACE_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return folder is not None and needed > 0 and free_bytes(folder) < needed


def size_text(n: int) -> str:
    """Bytes as people read a disk's: KiB below a MiB, MiB below a GiB, then GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.0f} KiB"


def disk_full(folder: Path, what: str, needed: int) -> str:
    """The cause of a full-disk stop in one phrase: where, what was being written, its bytes and what is free."""
    return f"disk full in {folder}: {what} needs about {size_text(needed)}, {size_text(free_bytes(folder))} free"


def folder_bytes(folder: Path) -> int:
    """The disk space the files under `folder` take (allocated blocks, at least their sizes; 0 when it does not
    exist): what writing the same files again needs."""
    if not Path(folder).is_dir():
        return 0
    stats = [p.stat() for p in Path(folder).rglob("*") if p.is_file()]
    return sum(max(st.st_size, getattr(st, "st_blocks", 0) * 512) for st in stats)
