"""Teacher fine-tuning on a real local Ray cluster: learning, HF export, resume after a killed worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.paths import TINY
from transformers import AutoModelForCausalLM

from pipeline.config import load_config, with_overrides
from pipeline.errors import ConfigError
from pipeline.finetune.stage import run_finetune
from pipeline.training.loop import FAIL_AT_STEP_ENV

pytestmark = pytest.mark.usefixtures("ray_cluster")


def logged_steps(metrics_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (metrics_dir / "metrics.jsonl").read_text().splitlines()]


def test_finetune_learns_exports_and_survives_a_worker_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = {"output_dir": str(tmp_path / "run"), "finetune.max_steps": 12, "finetune.max_failures": 1}
    config = with_overrides(load_config(TINY), overrides)
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "3")  # FailureConfig(max_failures=1) restarts the worker group
    result = run_finetune(config, eval_examples=8)
    assert not result.skipped
    metrics_dir = tmp_path / "run" / "teacher" / "metrics"
    assert (metrics_dir / "resumes.log").read_text().strip() == "resumed at step 2"
    assert result.after["val_loss"] < result.before["val_loss"] - 0.5, (result.before, result.after)
    model = AutoModelForCausalLM.from_pretrained(result.export_dir)
    assert model.config.model_type == "qwen3_moe"
    assert logged_steps(metrics_dir) == [2, 4, 6, 8, 10, 12]
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


def test_killed_run_resumes_from_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = with_overrides(load_config(TINY), {"output_dir": str(tmp_path / "run")})
    metrics_dir = tmp_path / "run" / "teacher" / "metrics"
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5")  # checkpoints at 2 and 4; the worker process dies at 5
    with pytest.raises(Exception, match=r"(?i)fail|error|died"):
        run_finetune(config, eval_examples=4)
    assert not (tmp_path / "run" / "teacher" / "final").exists()
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    result = run_finetune(config, eval_examples=4)  # the same command again
    assert (metrics_dir / "resumes.log").read_text().strip() == "resumed at step 4"
    assert logged_steps(metrics_dir) == [2, 4, 6]
    assert Path(result.export_dir, "config.json").exists()
