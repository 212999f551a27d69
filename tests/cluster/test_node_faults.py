"""Node faults on one machine: a head and a teacher raylet started with `ray start` (each in its own process
group, stopped by process group), the cache stage run by the CLI against that cluster; the teacher node is
killed mid-cache and started again, and the build completes from its committed shards."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from support.paths import REPO
from support.ports import free_port
from support.tiny import with_saved_teacher

from pipeline.config import config_to_dict

TINY = REPO / "tests" / "configs" / "tiny.yaml"
RAY = str(Path(sys.executable).with_name("ray"))

pytestmark = pytest.mark.integration  # `ray start` nodes of its own


class Node:
    """One `ray start --block` process group."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.args, self.log, self.env = args, log, env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        """Start and wait until `ray start` reports the node up (nodes started at once time out)."""
        seen = self.log.read_text().count("Ray runtime started") if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # its own process group: killed as a unit, nothing else is touched
            )
        deadline = time.monotonic() + timeout
        while self.log.read_text().count("Ray runtime started") == seen:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp_path = tmp_path_factory.mktemp("nodes")
    temp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths
    token = Path(temp) / "auth_token"  # a token of our own for every process of this cluster
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_") and k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1"]
    head = Node(
        ["--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false", *common],
        tmp_path / "head.log",
        env,
    )
    teacher = Node(
        [f"--address={address}", '--resources={"teacher_node": 1}', *common], tmp_path / "teacher.log", env
    )
    student = Node(
        [f"--address={address}", '--resources={"student_node": 1}', *common], tmp_path / "student.log", env
    )
    try:
        head.start()
        teacher.start()
        student.start()
        yield {"address": address, "head": head, "teacher": teacher, "student": student, "env": env}
    finally:
        student.kill()
        teacher.kill()
        head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def write_config(tmp_path: Path, overrides: dict) -> Path:
    """The tiny config with a saved tiny teacher (no fine-tuning), written for the CLI."""
    config = with_saved_teacher(tmp_path, {"cache.resources": {"teacher_node": 1}, **overrides})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path


def cli(cluster: dict, tmp_path: Path, log: str, *args: str) -> subprocess.Popen:
    """`moedistill ARGS` as a driver of the test cluster (RAY_ADDRESS), output in tmp_path/log."""
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"]}
    with open(tmp_path / log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(paths: Callable[[], list[Path]], proc: subprocess.Popen, timeout: float) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = paths()
        if found:
            return found
        time.sleep(0.2)
    return []


def tails(tmp_path: Path, *logs: str) -> str:
    return "".join((tmp_path / f).read_text()[-2500:] for f in logs if (tmp_path / f).exists())


def finish(proc: subprocess.Popen, rerun: Callable[[], subprocess.Popen], timeout: float = 300) -> int:
    """The run's exit code; when it gave up on the lost node, the same command again (it resumes)."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    return code if code == 0 else rerun().wait(timeout=timeout)


def test_killed_teacher_node_resumes_from_committed_shards(cluster: dict, tmp_path: Path) -> None:
    config = str(write_config(tmp_path, {"cache.rows_per_shard": 8}))  # 24 shards: the kill lands mid-build
    build = cli(cluster, tmp_path, "build1.log", "cache", "--config", config)

    def markers() -> list[Path]:
        return sorted((tmp_path / "caches").glob("*/shards/shard-*/_SHARD.json"))

    assert wait_for(markers, build, 240), tails(tmp_path, "build1.log")
    cluster["teacher"].kill()  # mid-cache: the teacher actor's node is gone
    committed_before = {p.parent.name: p.stat().st_mtime_ns for p in markers()}
    assert len(committed_before) < 24, "the build finished before the kill"
    cluster["teacher"].start()
    code = finish(build, lambda: cli(cluster, tmp_path, "build2.log", "cache", "--config", config))
    assert code == 0, tails(tmp_path, "build1.log", "build2.log")
    cache = next(p.parent for p in (tmp_path / "caches").glob("*/manifest.json"))
    from pipeline.cache import verify_cache

    assert verify_cache(str(cache)).ok
    for name, mtime in committed_before.items():  # committed before the kill: never rewritten
        assert (cache / "shards" / name / "_SHARD.json").stat().st_mtime_ns == mtime


def test_killed_student_node_resumes_from_the_last_checkpoint(cluster: dict, tmp_path: Path) -> None:
    config = str(
        write_config(
            tmp_path,
            {
                "distill.train.resources_per_worker": {"student_node": 1},
                "distill.train.max_steps": 16,
                "distill.train.checkpoint_every": 2,
                "distill.train.max_failures": 2,
            },
        )
    )
    assert cli(cluster, tmp_path, "cache.log", "cache", "--config", config).wait(timeout=300) == 0
    train = cli(cluster, tmp_path, "train1.log", "distill", "--config", config)
    checkpoints = wait_for(lambda: sorted((tmp_path / "run" / "ray").glob("*/checkpoint_*")), train, 300)
    assert checkpoints, tails(tmp_path, "train1.log")
    cluster["student"].kill()  # mid-training: the worker's node is gone
    cluster["student"].start()
    code = finish(train, lambda: cli(cluster, tmp_path, "train2.log", "distill", "--config", config))
    assert code == 0, tails(tmp_path, "train1.log", "train2.log")
    resumes = list((tmp_path / "run" / "students").glob("*/metrics/resumes.log"))
    assert resumes and "resumed at step" in resumes[0].read_text(), tails(
        tmp_path, "train1.log", "train2.log"
    )
    assert list((tmp_path / "run" / "students").glob("*/final/model.safetensors"))
