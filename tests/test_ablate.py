"""Sweep files: parsing, planning and refusal of teacher-side grids (the Ray run is in test_distill.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.ablate import load_sweep, plan_runs
from pipeline.errors import ConfigError

TINY = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def write_sweep(tmp_path: Path, grid: dict, **extra) -> Path:
    sweep = {
        "name": "t",
        "base": str(TINY),
        "set": {
            "output_dir": str(tmp_path / "run"),
            "cache.root": str(tmp_path / "caches"),
            "finetune.max_steps": 4,
            "distill.train.max_steps": 2,
            "evaluate.max_examples": 4,
            "evaluate.num_seeds": 1,
        },
        "grid": grid,
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_grid_over_a_teacher_side_setting_is_refused(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, {"cache.logits_k": [4, 8]})
    with pytest.raises(ConfigError, match="changes the teacher cache"):
        plan_runs(load_sweep(path))


def test_sweep_file_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: x.yaml\ngrids: {}\n")
    with pytest.raises(ConfigError, match="unknown sweep key"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")
