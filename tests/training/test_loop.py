"""The training loop's plan and failure injection for in-process runs (`train.num_workers: 0`), without Ray:
the runs themselves are in tests/distill/test_distill.py (sweeps, run names) and tests/finetune."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import TrainConfig
from pipeline.training.loop import _die_once, plan_total_steps


def test_an_in_process_run_plans_its_steps_like_one_worker() -> None:
    one, zero = TrainConfig(num_workers=1, batch_size=8), TrainConfig(num_workers=0, batch_size=8)
    assert plan_total_steps(zero, 100) == plan_total_steps(one, 100) == 13  # ceil(100 / 8), one epoch


def test_injected_failure_in_process_raises_once_instead_of_exiting(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"injected failure at step 3 \(in-process run\)"):
        _die_once(str(tmp_path), 3, in_process=True)  # os._exit here would end the test session
    _die_once(str(tmp_path), 3, in_process=True)  # once per run directory: the rerun goes on
    assert (tmp_path / ".injected-failure-3").is_file()
