"""A tiny sweep on a local Ray cluster: one teacher cache, three student runs, one table; reruns skip."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from pipeline.ablate import load_sweep, plan_runs, run_ablate
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


def test_sweep_builds_one_cache_and_reuses_it(ray_cluster, tmp_path: Path, capsys) -> None:
    path = write_sweep(tmp_path, {"distill.method": ["sft", "kd", "b-distill"]})
    first = run_ablate(path)
    assert first["cache"].status == "built" and first["trained"] == 3
    assert len(list((tmp_path / "caches").glob("*/manifest.json"))) == 1
    out = capsys.readouterr().out
    assert "built once, read by 3 student run(s)" in out
    with open(tmp_path / "run" / "sweeps" / "t" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["model"] for r in rows} == {"teacher"} | {r.run_name for r in first["runs"]}
    assert all(r["val_loss"] for r in rows if r["model"] != "teacher")
    assert (tmp_path / "run" / "sweeps" / "t" / "results.png").stat().st_size > 0

    second = run_ablate(path)  # rerun: the cache exists, every run finished
    assert second["cache"].status == "exists" and second["trained"] == 0
    assert all(r.skipped for r in second["runs"])


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
