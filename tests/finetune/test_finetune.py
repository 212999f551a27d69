"""Teacher fine-tuning on the session's Ray cluster: learning, HF export, resume after a killed run and
after a worker failure, reuse, refusal of other settings, --force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.paths import TINY
from transformers import AutoModelForCausalLM

from pipeline.config import load_config, with_overrides
from pipeline.errors import ConfigError
from pipeline.finetune.stage import run_finetune
from pipeline.training.loop import FAIL_AT_STEP_ENV, STATE_FILE
from pipeline.training.recovery import QUARANTINE_DIR, SNAPSHOT_FILE

pytestmark = pytest.mark.usefixtures("ray_cluster")


def logged_steps(metrics_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (metrics_dir / "metrics.jsonl").read_text().splitlines()]


def test_finetune_resumes_after_a_kill_a_damaged_checkpoint_and_a_worker_failure_then_learns_and_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every way a fine-tune comes back, on one run: the driver gives up (max_failures 0) when a worker dies
    at step 5, leaving checkpoints at steps 2 and 4; step 4's training state is then cut short (issue 24,
    probe 3), so the same command again moves it to the run's quarantine/ folder, drops it from Ray Train's
    run snapshot and resumes from step 2; in that rerun (`FailureConfig(max_failures=1)`, a runtime-only
    change) a worker dies at step 7 and Ray Train restarts the group from the step-6 checkpoint."""
    overrides = {"output_dir": str(tmp_path / "run"), "finetune.max_steps": 12, "finetune.max_failures": 0}
    config = with_overrides(load_config(TINY), overrides)
    metrics_dir = tmp_path / "run" / "teacher" / "metrics"
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5")  # checkpoints at 2 and 4; the worker process dies at 5
    with pytest.raises(Exception, match=r"(?i)fail|error|died"):
        run_finetune(config, eval_examples=8)
    assert not (tmp_path / "run" / "teacher" / "final").exists()
    storage = tmp_path / "run" / "ray" / f"{config.name}-finetune-teacher"
    latest = json.loads((storage / SNAPSHOT_FILE).read_text())["latest_checkpoint_result"]
    assert latest["metrics"]["step"] == 4
    state = storage / latest["checkpoint_dir_name"] / STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])  # a disk that filled up while it was written, say
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "7")
    result = run_finetune(with_overrides(config, {"finetune.max_failures": 1}), eval_examples=8)
    assert not result.skipped
    resumes = (metrics_dir / "resumes.log").read_text().splitlines()
    assert resumes == ["resumed at step 2", "resumed at step 6"]
    quarantined = storage / QUARANTINE_DIR / latest["checkpoint_dir_name"] / STATE_FILE
    assert quarantined.stat().st_size == 1000  # moved aside, never deleted
    assert result.after["val_loss"] < result.before["val_loss"] - 0.5, (result.before, result.after)
    model = AutoModelForCausalLM.from_pretrained(result.export_dir)
    assert model.config.model_type == "qwen3_moe"
    assert logged_steps(metrics_dir) == [2, 4, 4, 6, 8, 10, 12]  # step 4 again: its checkpoint was lost
    # A second request finds the finished export and does not train again, also when only runtime
    # settings (logging, checkpoint cadence) change.
    assert run_finetune(with_overrides(config, {"finetune.log_every": 5}), eval_examples=4).skipped
    # Other training settings would make it another teacher: refused, naming the fix.
    changed = with_overrides(config, {"finetune.max_steps": 4})
    with pytest.raises(ConfigError, match=r"finetune\.max_steps: 12 -> 4.*--force"):
        run_finetune(changed, eval_examples=4)
    # --force retrains from scratch with the new settings (no resume from the old run's checkpoints).
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    forced = run_finetune(changed, force=True, eval_examples=4)
    assert not forced.skipped
    assert logged_steps(metrics_dir) == [2, 4] and not (metrics_dir / "resumes.log").exists()
