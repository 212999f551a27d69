"""Per-step metrics on rank 0: JSONL (every field), CSV (flat table) and TensorBoard scalars."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, out_dir: str | Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self._writer = None
        self._csv_fields: list[str] | None = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional at run time
            self._writer = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float)}
        csv_path = self.out_dir / "metrics.csv"
        if self._csv_fields is None:
            if csv_path.exists():  # resumed run: keep the existing header
                with open(csv_path) as fh:
                    self._csv_fields = next(csv.reader(fh), None)
            if not self._csv_fields:
                self._csv_fields = list(scalars)
                with open(csv_path, "w", newline="") as fh:
                    csv.writer(fh).writerow(self._csv_fields)
        with open(csv_path, "a", newline="") as fh:
            csv.writer(fh).writerow([scalars.get(k, "") for k in self._csv_fields])
        if self._writer is not None:
            for key, value in scalars.items():
                if key != "step":
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
