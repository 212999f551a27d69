"""Checkpoints that fail to load (issue 24, probe 3): named, moved to the run's quarantine/ folder (never
deleted), dropped from Ray Train's run snapshot, and the run resumes from the newest intact one."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from pipeline.training.loop import STATE_FILE
from pipeline.training.recovery import QUARANTINE_DIR, SNAPSHOT_FILE, recover_checkpoints


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _result(name: str, step: int) -> dict[str, Any]:
    return {"version": 0, "checkpoint_dir_name": name, "metrics": {"step": step}}


def _run_with_snapshot(run: Path, steps: list[int]) -> list[str]:
    """A run folder as Ray Train 2.60 leaves it: one checkpoint folder per step and the run snapshot."""
    names = [f"checkpoint_{step:03d}" for step in steps]
    for name, step in zip(names, steps, strict=True):
        (run / name).mkdir(parents=True)
        torch.save({"step": step, "model": {"w": torch.ones(2)}}, run / name / STATE_FILE)
    snapshot = {
        "ray_version": "2.60.0",
        "checkpoint_results": [_result(n, s) for n, s in zip(names, steps, strict=True)],
        "checkpoint_report_indices": list(range(1, len(steps) + 1)),
        "latest_checkpoint_result": _result(names[-1], steps[-1]),
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": len(steps),
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }
    (run / SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    return names


def test_unloadable_checkpoints_are_quarantined_and_the_snapshot_points_at_the_newest_intact_one(
    tmp_path: Path,
) -> None:
    run = tmp_path / "storage" / "run"
    names = _run_with_snapshot(run, [2, 4, 6, 8])
    marker = tmp_path / "code-ran"
    with open(run / names[3] / STATE_FILE, "wb") as f:  # step 8: a crafted pickle
        pickle.dump({"step": 8, "rng": _RunsCode(str(marker))}, f, protocol=2)
    state = run / names[2] / STATE_FILE  # step 6: cut in half
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    intact = (run / names[1] / STATE_FILE).read_bytes()
    lines = recover_checkpoints(str(tmp_path / "storage"), "run")
    assert len(lines) == 2 and not marker.exists()  # refused, never unpickled
    assert "checkpoint_008" in lines[0] and "objects other than tensors" in lines[0], lines
    assert "checkpoint_006" in lines[1] and "cannot be read" in lines[1], lines
    assert all(f"moved to {run / QUARANTINE_DIR}" in line for line in lines)
    assert sorted(p.name for p in (run / QUARANTINE_DIR).iterdir()) == ["checkpoint_006", "checkpoint_008"]
    snapshot = json.loads((run / SNAPSHOT_FILE).read_text())
    assert [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]] == names[:2]
    assert snapshot["checkpoint_report_indices"] == [1, 2]
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_004"
    assert (run / names[1] / STATE_FILE).read_bytes() == intact and recover_checkpoints(
        str(tmp_path / "storage"), "run"
    ) == []  # nothing left to do


def test_a_listed_checkpoint_whose_folder_is_gone_is_dropped_from_the_snapshot(tmp_path: Path) -> None:
    run = tmp_path / "run"
    names = _run_with_snapshot(run, [2, 4])
    for p in (run / names[1]).iterdir():
        p.unlink()
    (run / names[1]).rmdir()  # what the old advice ("delete that checkpoint directory") left behind
    lines = recover_checkpoints(str(tmp_path), "run")
    assert len(lines) == 1 and "its folder is missing" in lines[0] and "already gone" in lines[0], lines
    snapshot = json.loads((run / SNAPSHOT_FILE).read_text())
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == names[0]


# The same on a real Ray Train run (a truncated latest checkpoint, the run resumed from the one before):
# tests/finetune/test_finetune.py.
