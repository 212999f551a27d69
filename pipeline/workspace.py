"""Where one config's stages write: every output path under `output_dir`, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def teacher_final(self) -> Path:
        return self.root / "teacher" / "final"

    @property
    def ray_storage(self) -> Path:
        return (self.root / "ray").resolve()

    @property
    def students(self) -> Path:
        return self.root / "students"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def paths_for(config: Config) -> Paths:
    return Paths(config.out)
