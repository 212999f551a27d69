"""One lock discipline for the runs the fine-tune room writes (issue 24, probe 4): the teacher fine-tune and
the upcycled student's dense pretraining take their directory's run lock before any work. Two commands started
together train once: the second waits, then reuses the finished run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.paths import REPO
from support.tiny import tiny_config, write_config

from pipeline.config import with_overrides
from pipeline.errors import CacheError
from pipeline.finetune.stage import run_finetune
from pipeline.finetune.student_init import dense_student_dir, resolve_student
from pipeline.locks import RUN_LOCK_FILE, WAIT_ENV, run_lock

IN_PROCESS = {"finetune.num_workers": 0, "finetune.max_steps": 4, "student_pretrain.num_workers": 0}
BUSY = r"another run is writing the {what} .*pid \d+.*Fix: wait"


@pytest.mark.usefixtures("ray_cluster")
def test_a_held_teacher_or_dense_student_lock_stops_a_second_run_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(tmp_path, {**IN_PROCESS, "student.init": "upcycle", "student_pretrain.max_steps": 2})
    monkeypatch.setenv(WAIT_ENV, "0")  # the second command gives up at once instead of waiting
    teacher_dir = Path(config.output_dir) / "teacher"
    busy = BUSY.format(what="teacher fine-tune")
    with run_lock(teacher_dir, "teacher fine-tune"), pytest.raises(CacheError, match=busy):
        run_finetune(config, eval_examples=2)
    assert not (teacher_dir / "final").exists() and not (teacher_dir / "metrics").exists()  # nothing trained
    dense = dense_student_dir(config)
    busy = BUSY.format(what="pretrained dense student")
    with run_lock(dense, "pretrained dense student"), pytest.raises(CacheError, match=busy):
        resolve_student(config)
    assert not (dense / "final").exists()
    # released: the same commands now train, then reuse
    assert not run_finetune(config, eval_examples=2).skipped and run_finetune(config, eval_examples=2).skipped
    assert resolve_student(config).upcycle_from == str(dense / "final")
    assert not (teacher_dir / RUN_LOCK_FILE).exists() and not (dense / RUN_LOCK_FILE).exists()


@pytest.mark.integration  # two `moedistill` processes, each with a private Ray cluster
def test_two_fine_tunes_of_one_teacher_started_together_train_it_once(tmp_path: Path) -> None:
    config = write_config(with_overrides(tiny_config(tmp_path), IN_PROCESS), tmp_path / "config.yaml")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    lock = tmp_path / "run" / "teacher" / RUN_LOCK_FILE

    def start(log: str) -> subprocess.Popen:
        with open(tmp_path / log, "wb") as out:
            command = [sys.executable, "-m", "pipeline.cli", "finetune-teacher", "--config", config]
            return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    first = start("first.log")
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the first command holds the run: the second starts while it trains
    second = start("second.log")
    assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0
    logs = [(tmp_path / f).read_text() for f in ("first.log", "second.log")]
    assert "teacher already fine-tuned" not in logs[0], logs[0][-2000:]
    assert "teacher already fine-tuned" in logs[1] and "reusing it" in logs[1], logs[1][-2000:]
    steps = (tmp_path / "run" / "teacher" / "metrics" / "metrics.jsonl").read_text().splitlines()
    assert len(steps) == len(set(steps)) == 2, steps  # steps 2 and 4, each logged once: one training
    assert not lock.exists()
