"""The GPU check script in its CPU smoke mode, exactly as CI runs it, so it cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from support.paths import REPO


def test_gpu_check_tiny_cpu_run_writes_both_summaries(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    proc = subprocess.run(
        [sys.executable, "jobs/benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["tiny"]

    tests = summary["cuda_tests"]
    assert tests["failed"] == 0 and tests["errors"] == 0 and tests["passed"] + tests["skipped"] > 0
    if not torch.cuda.is_available():
        assert tests["passed"] == 0  # collected and skipped, not silently missing

    teacher = summary["teacher"]
    assert set(teacher["phases"]) == {"plain_forward", "forward_all_experts", "shard_compute"}
    assert 2 <= teacher["layers"] <= teacher["max_layers"]
    assert all(p["tokens_per_s"] > 0 for p in teacher["phases"].values())
    assert teacher["phases"]["plain_forward"]["vs_plain_forward"] == 1.0

    steps = summary["student"]["steps"]
    assert set(steps) == {"sft", "kd", "b-distill"} and steps["sft"]["vs_sft"] == 1.0
    assert all(s["step_s"] > 0 for s in steps.values())

    codecs = summary["codecs"]
    if "skipped" not in codecs:
        assert codecs["codecs"] and all(c["within_error_bound"] for c in codecs["codecs"].values())

    md = (out / "summary.md").read_text()
    for heading in ("## CUDA tests", "## Teacher", "## Student", "| shard_compute |", "| b-distill |"):
        assert heading in md, heading
