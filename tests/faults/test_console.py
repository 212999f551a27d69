"""The console a person reads (pipeline/console.py): with a run log chosen, as every `moedistill` command
does, Ray's and the workers' chatter goes to the log file, and the terminal shows only the project's own
lines, the workers' progress bars drawn on the driver, and a failed Ray task as one line naming the log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.paths import REPO

BAR = re.compile(r"\d+%\|")

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import ray
    from pipeline.console import configure
    from pipeline.ray_session import connect

    configure("probe")
    connect(num_cpus=1, output_dir=sys.argv[1])

    @ray.remote
    def work(fail):
        from ray.experimental.tqdm_ray import tqdm
        print("chatter from inside Ray", flush=True)
        print("[train] the project's own line", flush=True)
        bar = tqdm(desc="steps", total=3, flush_interval_s=0.0)
        for _ in range(3):
            bar.update(1)
        bar.close()
        if fail:
            raise ValueError("a cause deep inside a task")
        return 1

    ray.get(work.remote(False))
    time.sleep(2.0)  # Ray's log monitor relays worker output within about a second
    if sys.argv[2] == "fail":
        from pipeline.cli import _print_ray_failure
        try:
            ray.get(work.options(max_retries=0).remote(True))
        except Exception as exc:
            sys.exit(_print_ray_failure(exc))
    """
)


def _run(tmp_path: Path, mode: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), mode],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    first = proc.stdout.splitlines()[0]
    assert first.startswith("moedistill: Ray and worker logs: "), proc.stdout + proc.stderr
    return proc, Path(first.split(": ", 2)[2])


@pytest.mark.integration
def test_worker_chatter_goes_to_the_run_log_and_the_terminal_keeps_the_projects_lines(tmp_path: Path) -> None:
    proc, log = _run(tmp_path, "ok")
    shown = proc.stdout + proc.stderr
    assert proc.returncode == 0, shown
    assert log.parent == tmp_path / "logs" and log.name.startswith("probe-")
    assert shown.count("[train] the project's own line") == 1, shown
    assert "steps" in proc.stderr  # the worker's bar, drawn by the driver
    assert "pid=" not in shown and "chatter from inside Ray" not in shown, shown
    assert "Token authentication" not in shown  # Ray's start-up notice went to the log too
    logged = log.read_text()
    assert "chatter from inside Ray" in logged and "pid=" in logged
    assert len(shown.strip().splitlines()) <= 6, shown


@pytest.mark.integration
def test_a_failed_ray_task_is_one_line_naming_the_log_that_holds_its_traceback(tmp_path: Path) -> None:
    proc, log = _run(tmp_path, "fail")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moedistill: error:")]
    assert len(errors) == 1, proc.stderr
    assert "a cause deep inside a task" in errors[0] and f"the traceback is in {log}" in errors[0]
    assert "Traceback (most recent call last)" not in proc.stdout + proc.stderr
    assert "ValueError: a cause deep inside a task" in log.read_text()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 KiB tmpfs: a real filesystem that runs out of space (needs root, as CI has)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", mount], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.integration
def test_a_cache_build_on_a_full_disk_is_one_line_not_a_traceback_wall(
    tiny_workspace: Any, full_disk: Path, tmp_path: Path
) -> None:  # issue 24, probe 8: disk full printed 288 lines and 3 tracebacks
    from support.tiny import write_config

    from pipeline.config import with_overrides

    config = with_overrides(tiny_workspace, {"cache.root": str(full_disk / "caches"), "cache.logits_k": 6})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    path = write_config(config, tmp_path / "c.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "cache", "--config", path],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Message lines: a progress bar redraws in place on a terminal, so its refreshes are not counted.
    shown = [line for line in (proc.stdout + proc.stderr).strip().split("\n") if not BAR.search(line)]
    errors = [line for line in shown if line.startswith("moedistill: error:")]
    assert proc.returncode != 0 and len(errors) == 1, shown
    assert "No space left" in errors[0] and "rerun" in errors[0], errors
    assert not any("Traceback" in line or "pid=" in line for line in shown), shown
    assert len(shown) <= 10, shown
