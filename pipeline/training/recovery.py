"""Before a run resumes: its checkpoints that cannot be loaded are named, moved aside and dropped from Ray's
run snapshot, so Ray Train resumes from the newest intact one.

A checkpoint can fail to load because its `training_state.pt` was cut short (a full disk, a killed copy), its
bytes changed, it holds objects other than tensors (a crafted pickle: refused, never unpickled), or its folder
is gone. Ray Train v2 reads `<storage>/<run>/checkpoint_manager_snapshot.json` and hands the latest checkpoint
it lists to the workers; a bad one there fails every rerun, and deleting the folder by hand breaks the
snapshot. Here each bad checkpoint folder moves to `<storage>/<run>/quarantine/` (never deleted: it may be
evidence) and the snapshot is rewritten without it, latest = the newest intact checkpoint (none: the run
starts over).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import MoeDistillError
from pipeline.training.loop import STATE_FILE, load_training_state

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train v2's run snapshot (ray 2.60)
QUARANTINE_DIR = "quarantine"


def checkpoint_problem(checkpoint_dir: Path) -> str | None:
    """Why the training state of `checkpoint_dir` cannot be loaded (None: it loads, weights_only)."""
    state = checkpoint_dir / STATE_FILE
    if not state.is_file():
        return f"{state} is missing"
    try:
        load_training_state(state)
    except MoeDistillError:
        return f"{state} holds objects other than tensors and plain containers (refused, not unpickled)"
    except Exception as exc:  # torch/zip errors of a truncated or altered file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"{state} cannot be read ({first})"
    return None


def recover_checkpoints(storage_path: str, run_name: str) -> list[str]:
    """Quarantine the checkpoints of run `run_name` under `storage_path` that are newer than its newest
    intact one, and rewrite Ray's snapshot to match; -> one line per quarantined checkpoint (empty: nothing
    to do). A local storage path only (other storage: nothing is checked)."""
    run_dir = Path(storage_path) / run_name
    snapshot_path = run_dir / SNAPSHOT_FILE
    if "://" in storage_path or not snapshot_path.is_file():
        return []
    snapshot: dict[str, Any] = json.loads(snapshot_path.read_text())
    results = list(snapshot.get("checkpoint_results") or [])
    indices = list(snapshot.get("checkpoint_report_indices") or [])
    order = sorted(range(len(results)), key=lambda i: indices[i] if i < len(indices) else i)
    # A listed folder that is gone breaks Ray's snapshot wherever it is; of the rest, the newest that loads is
    # the resume point (older ones are not opened).
    bad = {
        results[i]["checkpoint_dir_name"]: "its folder is missing"
        for i in order
        if not (run_dir / results[i]["checkpoint_dir_name"]).is_dir()
    }
    for i in reversed(order):
        name = results[i]["checkpoint_dir_name"]
        if name in bad:
            continue
        problem = checkpoint_problem(run_dir / name)
        if problem is None:
            break
        bad[name] = problem
    if not bad:
        return []
    quarantine = run_dir / QUARANTINE_DIR
    quarantine.mkdir(exist_ok=True)
    lines = []
    for name, problem in bad.items():
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), str(quarantine / name))
            where = f"moved to {quarantine / name}"
        else:
            where = "its folder was already gone"
        lines.append(f"checkpoint {name} of run {run_name}: {problem}; {where}")
        log.debug("quarantined %s", lines[-1])  # the caller prints each line once
    keep = [i for i in order if results[i]["checkpoint_dir_name"] not in bad]
    snapshot["checkpoint_results"] = [results[i] for i in keep]
    snapshot["checkpoint_report_indices"] = [indices[i] for i in keep if i < len(indices)]
    snapshot["latest_checkpoint_result"] = results[keep[-1]] if keep else None
    pending = list(
        zip(snapshot.get("pending_training_results") or [], snapshot.get("pending_validation_specs") or [])
    )
    pending = [(r, spec) for r, spec in pending if r["checkpoint_dir_name"] not in bad]
    snapshot["pending_training_results"] = [r for r, _ in pending]
    snapshot["pending_validation_specs"] = [spec for _, spec in pending]
    for key in (
        "validated_checkpoint_dir_names",
        "timed_out_validation_checkpoint_dir_names",
        "failed_validation_checkpoint_dir_names",
    ):
        snapshot[key] = [n for n in snapshot.get(key) or [] if n not in bad]
    tmp = snapshot_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(snapshot))
    tmp.replace(snapshot_path)
    return lines
