"""Run metrics: one JSON object per row in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends rows to `run_dir/metrics.jsonl` (flushed per row) and, optionally, TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))

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
