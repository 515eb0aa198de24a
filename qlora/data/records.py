"""Reading records from a local json / jsonl / csv / parquet file or a hub dataset, and saying where each came from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from qlora.config import is_data_file
from qlora.errors import QloraError


@dataclass
class Source:
    """The records of one data file, and how to point a user at any one of them."""

    name: str
    """The path or hub id, as configured."""
    rows: list[dict]
    lines: list[int] | None = None
    """Line of each record in a JSON Lines file (None for other layouts)."""

    def where(self, i: int) -> str:
        """`line 18` (JSON Lines) or `record 18` (1-based), for messages."""
        return f"line {self.lines[i]}" if self.lines is not None else f"record {i + 1}"


def fingerprint(path: str, split: str) -> str:
    """A digest of the data's content (local files) or of datasets' own fingerprint (hub datasets)."""
    if is_data_file(path):
        digest = hashlib.sha256()
        with open(_existing(path), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    return f"{path}:{split}:{_load_hub(path, split)._fingerprint}"


def read_source(path: str, split: str) -> Source:
    """Every record of the file or hub dataset at `path`, as dicts."""
    if not is_data_file(path):
        return Source(path, [dict(row) for row in _load_hub(path, split)])
    local = _existing(path)
    if local.suffix in (".json", ".jsonl"):
        rows, lines = _read_json(local)
        source = Source(path, rows, lines)
    else:
        from datasets import load_dataset

        try:
            dataset = load_dataset(local.suffix.lstrip("."), data_files=str(local), split="train")
        except Exception as e:  # datasets raises many types; the cause is what the user needs
            raise QloraError(f"{path}: could not read ({type(e).__name__}: {e}); check the file") from e
        source = Source(path, [dict(row) for row in dataset])
    if not source.rows:
        raise QloraError(f"{path} holds no records; point data.path at a file with data")
    return source


def _existing(path: str) -> Path:
    local = Path(path).expanduser()
    if not local.is_file():
        raise QloraError(f"{path} does not exist; give a json/jsonl/csv/parquet file or a hub dataset id")
    return local


def _load_hub(name: str, split: str):
    from datasets import load_dataset

    try:
        return load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types; the cause is what the user needs
        raise QloraError(f"{name}: could not load this hub dataset ({type(e).__name__}: {e}); check the id, "
                         "the split and your network, or download it and point data.path at the file") from e


def _read_json(path: Path) -> tuple[list[dict], list[int] | None]:
    text = path.read_text(encoding="utf-8")
    lines = None
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise QloraError(f"{path}: invalid JSON at line {e.lineno} ({e.msg}); fix the file") from e
        if not isinstance(rows, list):
            raise QloraError(f"{path}: expected a JSON list of records, got a {type(rows).__name__}")
    else:
        rows, lines = [], []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise QloraError(f"{path}: line {lineno} is not valid JSON ({e.msg}); fix or remove that row") from e
            lines.append(lineno)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            where = f"line {lines[i]}" if lines else f"record {i + 1}"
            raise QloraError(f"{path}: {where} is a {type(row).__name__}, expected an object with fields")
    return rows, lines
