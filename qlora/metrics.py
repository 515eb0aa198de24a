"""Run metrics: one JSON object per row in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from qlora.files import write_text_atomic


class MetricsLog:
    """Appends rows to `run_dir/metrics.jsonl` (flushed per row) and, optionally, TensorBoard scalars.

    A run that continues from step `start` (0 for a fresh one) first drops the rows after it, which a run
    killed after its last checkpoint left behind, so the file reads as one uninterrupted run. `history`, when
    given, is the metrics.jsonl those first rows come from (a run resumed into a new folder).
    """

    def __init__(self, run_dir: Path, tensorboard: bool, start: int = 0, history: Path | None = None) -> None:
        path = run_dir / "metrics.jsonl"
        source = history or path
        kept = [row for row in read_metrics(source.parent) if row["step"] <= start] if start and source.is_file() \
            else []
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
        self.file = open(path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start + 1)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
