"""The stages as `ray job submit` runs them: a REAL local Ray head (`ray start --head`, dashboard, token
authentication on) in a subprocess, each stage submitted with the Jobs CLI, the repository shipped with
--working-dir, and the stage's outputs checked on disk.

Facts this encodes (ray 2.60): the Jobs CLI needs ray[default]; a head with token auth refuses a submitter
without the token ("Authentication required"); a submitter with RAY_AUTH_MODE=token and the cluster's token
(~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH as here) is accepted; the job's driver inherits the head's
environment, so it finds the token too; `ray job submit` blocks until the job ends and exits non-zero when
it fails. The entrypoint's `python` is whatever PATH the head resolves, so jobs name this venv's python.
Inside a job, Ray sets RAY_JOB_CONFIG_JSON_ENV_VAR (RAY_JOB_ID is stripped) and starts the entrypoint in the
unpacked --working-dir, a per-job temporary directory: a relative output_dir would be written there.

Every stage of the pipeline is submitted by default, in order, with a tiny config (seconds of CPU each; the
job start-up dominates): finetune-teacher, cache, distill, evaluate, report storage, ablate, and one
on-policy distillation (gkd-on-policy, 2 steps), whose teacher service starts and stops inside its job.
Only the distill job starts a Ray Train worker group; the other trainings run in their job's driver
(`num_workers: 0`), since their subject here is the job, not the workers.

The head runs with `--block` in a session of its own and is stopped by killing that session's processes and
their descendants only: never `ray stop`, which kills every Ray process on the machine (other test sessions
included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from support.paths import REPO
from support.ports import free_port

from pipeline.storage import resolve_under
from pipeline.workspace import RAY_JOB_ENV, job_local_paths, ray_job_working_dir, warn_if_job_local

DEMO = REPO / "jobs" / "configs" / "demo.yaml"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
# Not uploaded with --working-dir (.venv alone is GBs; Ray refuses packages over its size limit).
EXCLUDES = [".venv/", "runs/", ".git/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/", "*.egg-info/"]
START_TIMEOUT_S = 180  # a 2-core CI box shared with other test sessions starts a head in 15-60 s
JOB_TIMEOUT_S = 420
MAX_EXAMPLES = 4  # evaluated test examples per model


@dataclass(frozen=True)
class Stage:
    """One `ray job submit -- python <script> <args>`; in args "{config}", "{out}" (the run's output_dir),
    "{cache}" (the teacher cache the cache stage built) and "{sweep}" are filled in when it is submitted.
    `check(out)` asserts on what the stage wrote."""

    script: str
    args: tuple[str, ...]
    check: Callable[[Path], None]


SWEEP_NAME = "jobs-sweep"


def cache_dir(out: Path) -> Path:
    """The cache the config's teacher-side settings produced: <cache.root>/by-config/<hash>.json names it."""
    locators = sorted((out / "caches" / "by-config").glob("*.json"))
    assert len(locators) == 1, f"expected one by-config locator, got {locators}"
    stored = json.loads(locators[0].read_text())["path"]  # relative to cache.root (a root may move)
    return Path(resolve_under(str(out / "caches"), stored))


def check_teacher(out: Path) -> None:
    final = out / "teacher" / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert json.loads((final / "moedistill_export.json").read_text())["stage"] == "finetune-teacher"


def check_cache(out: Path) -> None:
    cache = cache_dir(out)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] is True, manifest
    assert manifest["totals"]["num_sequences"] > 0 and manifest["totals"]["num_tokens"] > 0, manifest
    assert manifest["shards"] and all((cache / shard["path"]).exists() for shard in manifest["shards"])


def check_student(out: Path) -> None:
    final = out / "students" / "probe" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["hidden_size"] == 32, config  # the student
    assert (final / "moedistill_export.json").is_file()


def _results(path: Path) -> list[dict]:
    from pipeline.evaluate.results import read_results_csv

    rows = read_results_csv(path)
    assert rows and all(0.0 <= r["rouge_l_mean"] <= 100.0 for r in rows), rows
    return rows


def check_eval(out: Path) -> None:
    rows = _results(out / "eval" / "results.csv")
    assert {r["model"] for r in rows} == {"teacher", "probe"}, rows
    assert all(r["num_examples"] == MAX_EXAMPLES and r["num_seeds"] == 1 for r in rows), rows
    assert all(len((out / "eval" / m / "predictions.jsonl").read_text().splitlines()) == MAX_EXAMPLES
               for m in ("teacher", "probe"))  # fmt: skip


def check_storage_report(out: Path) -> None:
    md = out / "reports" / "storage" / "storage.md"
    assert cache_dir(out).name in md.read_text()  # the measured store's key
    assert (out / "reports" / "storage" / "storage.png").stat().st_size > 0


def check_sweep(out: Path) -> None:
    rows = _results(out / "sweeps" / SWEEP_NAME / "results.csv")
    assert [r["method"] for r in rows] == ["teacher", "kd"], rows
    assert len(list((out / "students").glob("kd-*/final/config.json"))) == 1


ON_POLICY_STEPS = 2
ON_POLICY_SETS = tuple(
    arg
    for setting in (
        "distill.method=gkd-on-policy",
        "distill.run_name=onpolicy",
        f"distill.train.max_steps={ON_POLICY_STEPS}",
        f"distill.train.checkpoint_every={ON_POLICY_STEPS}",
        "distill.train.num_workers=0",  # the student in the job's driver; the teacher service on teacher_node
    )
    for arg in ("--set", setting)
)


def check_on_policy(out: Path) -> None:
    run = out / "students" / "onpolicy"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "gkd-on-policy" and not summary["skipped"], summary
    stats = summary["teacher_service"]  # the service's counters, recorded when the job's run stopped it
    assert stats["requests"] >= ON_POLICY_STEPS and stats["sequences"] > 0, stats
    assert stats["scored_tokens"] > 0 and stats["in_flight"] == 0 and stats["num_actors"] == 1, stats
    assert (run / "final" / "moedistill_export.json").is_file()


# In pipeline order; each stage uses what the previous ones wrote. Adding a stage is one line.
STAGES: list[Stage] = [
    Stage("jobs/finetune_teacher.py", ("--config", "{config}"), check_teacher),
    Stage("jobs/cache_teacher.py", ("--config", "{config}"), check_cache),
    Stage("jobs/distill.py", ("--config", "{config}"), check_student),
    Stage("jobs/evaluate.py", ("--config", "{config}"), check_eval),
    Stage("jobs/report.py", ("storage", "{cache}", "--out", "{out}/reports/storage"), check_storage_report),
    # one more student (kd) from the same cache, evaluated with the teacher's results reused
    Stage("jobs/ablate.py", ("--config", "{sweep}"), check_sweep),
    # on-policy: the job's distill stage starts the teacher service (the fine-tuned teacher, on teacher_node)
    Stage("jobs/distill.py", ("--config", "{config}", *ON_POLICY_SETS), check_on_policy),
]


def _ray_cli() -> list[str]:
    script = Path(sys.executable).with_name("ray")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


class LocalHead:
    """`ray start --head --block` with token auth, in a session of its own, under a private temp dir."""

    PORT_FLAGS = (
        "--port",
        "--node-manager-port",
        "--object-manager-port",
        "--metrics-export-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--ray-client-server-port",
    )

    def __init__(self) -> None:
        # A short path of our own: Ray's unix sockets live under it (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="mdjob", dir="/tmp"))
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("RAY_AUTH_") and k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
        }
        self.env_without_token = dict(env)
        # The same token for the head (and so every job driver it starts) and for the submitter. PATH puts
        # this venv first, so Ray's own helper processes resolve the same python.
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        )
        self.env = env
        self.log_path = self.root / "head.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            *_ray_cli(),
            "start",
            "--head",
            "--block",
            "--num-cpus",
            # logical CPUs: the on-policy job holds one for its teacher actor, one for its student worker
            # and one for Ray Data's cache reads at once (the machine may have 2 cores)
            "4",
            "--resources",
            json.dumps({"teacher_node": 1, "student_node": 1}),
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--temp-dir",
            str(self.root / "ray"),
            "--object-store-memory",
            str(256 * 1024**2),
            "--disable-usage-stats",
        ]
        for flag in self.PORT_FLAGS:
            cmd += [flag, str(free_port())]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"`ray start --head` exited with {self.proc.returncode}:\n{self.head_log()}")
            last = self.job("list", check=False, timeout=60)
            if last.returncode == 0:
                return
            time.sleep(2)
        pytest.fail(
            f"the Ray head's job server at {self.address} did not answer within {START_TIMEOUT_S} s.\n"
            f"last `ray job list`:\n{_tail(last.stdout if last else '')}\nhead log:\n{self.head_log()}"
        )

    def job(
        self, command: str, *args: str, check: bool = True, timeout: float = 120, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        """`ray job <command> --address <head> <args>`, with the submitter's environment (token included)."""
        result = subprocess.run(
            [*_ray_cli(), "job", command, "--address", self.address, *args],
            env=env or self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )
        if check and result.returncode != 0:
            what = f"`ray job {command} {' '.join(args)}`"
            pytest.fail(f"{what} exited {result.returncode}:\n{_tail(result.stdout)}")
        return result

    def head_log(self) -> str:
        return _tail(self.log_path.read_text()) if self.log_path.exists() else "(no head log)"

    def stop(self) -> None:
        """Stop this cluster's processes, and only those (see `processes`); then delete its temp dir."""
        import psutil

        if self.proc is not None:
            ours = self.processes()
            # SIGTERM lets `ray start --block` shut its node down; on a busy machine that can take a minute,
            # so after a short grace period whatever is left gets SIGKILL (nothing here needs a clean flush).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            left = {p.pid: p for p in [*ours, *self.processes()] if p.is_running()}
            for proc in left.values():
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(list(left.values()), timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    def processes(self) -> list:
        """This cluster's live processes: the head's session (`ray start` got a new one; Ray puts each worker
        in its own process group inside it) and all their descendants (a job's driver gets its own session).
        """
        import psutil

        if self.proc is None:
            return []
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(proc.pid) == self.proc.pid:
                    found[proc.pid] = proc
        for proc in list(found.values()):
            with contextlib.suppress(psutil.Error):
                found.update({child.pid: child for child in proc.children(recursive=True)})
        alive = []
        for proc in found.values():
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        return alive


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalHead]:
    head = LocalHead()
    try:
        head.start()
        yield head
    finally:
        head.stop()
        survivors = [" ".join(p.cmdline())[:160] for p in head.processes()]
        assert not survivors, f"Ray processes of {head.root} survived the teardown: {survivors}"


def tiny_job_config(tmp_path: Path) -> Path:
    """demo.yaml's settings, far smaller (seconds of CPU per stage), writing under tmp_path."""
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["name"] = "jobs-submit"
    cfg["output_dir"] = str(tmp_path / "run")
    # One training split for teacher and students: the demo's 1,000-record student share needs 12,000 records.
    cfg["data"].update(
        num_demo_records=160,
        max_length=96,
        val_fraction=0.1,
        test_fraction=0.1,
        student_train_records=None,
        teacher_train="all",
    )
    cfg["tokenizer"] = {"vocab_size": 384}
    tiny = yaml.safe_load(TINY.read_text())  # the integration tests' model shapes
    cfg["teacher"]["build"] = tiny["teacher"]["build"]
    cfg["student"]["build"] = tiny["student"]["build"]
    small_train = dict(
        batch_size=8, warmup_steps=1, max_steps=3, checkpoint_every=3, log_every=3, max_failures=0
    )
    # Pinned like on a cluster: the head advertises one teacher_node and one student_node. The teacher trains
    # in the job's driver (num_workers 0, Ray Train's local mode); the distill job is the one whose Ray Train
    # worker group runs inside a job.
    cfg["finetune"].update(small_train, num_workers=0, resources_per_worker={"teacher_node": 1})
    cfg["distill"]["train"].update(small_train, resources_per_worker={"student_node": 1})
    cfg["distill"]["run_name"] = "probe"
    cfg["cache"].update(
        root=str(tmp_path / "run" / "caches"),
        logits_k=8,
        batch_size=16,
        rows_per_shard=64,
        resources={"teacher_node": 1},
    )
    cfg["evaluate"].update(
        num_seeds=1,
        max_new_tokens=6,
        batch_size=16,
        max_examples=MAX_EXAMPLES,
        heldout_examples=0,  # the test split alone: the probe checks placement, not the held-out sets
        resources={"student_node": 1},
    )
    path = tmp_path / "tiny-job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # A sweep over it: one more student (a fixed run_name is refused in sweeps), then evaluation.
    sweep = {
        "name": SWEEP_NAME,
        "base": path.name,
        "set": {"distill.run_name": None, "distill.train.num_workers": 0},
        "grid": {"distill.method": ["kd"]},
        "evaluate": True,
    }
    (tmp_path / "tiny-sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def submit(head: LocalHead, script: str, args: list[str], submission_id: str) -> subprocess.CompletedProcess:
    args = [
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"excludes": EXCLUDES}),
        "--",
        sys.executable,  # the entrypoint's bare `python` would be whatever the head's PATH finds first
        script,
        *args,
    ]
    try:
        return head.job("submit", *args, check=False, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        head.job("stop", submission_id, check=False)
        logs = head.job("logs", submission_id, check=False).stdout
        pytest.fail(f"job {submission_id} ({script}) ran over {JOB_TIMEOUT_S} s; logs:\n{_tail(logs)}")


def test_submitter_without_the_token_is_refused(ray_head: LocalHead, tmp_path: Path) -> None:
    result = ray_head.job("list", check=False, env=ray_head.env_without_token)
    assert result.returncode != 0, f"token auth is off on the head?\n{_tail(result.stdout)}"
    assert "Authentication" in result.stdout, _tail(result.stdout)
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    result = ray_head.job("list", check=False, env={**ray_head.env, "RAY_AUTH_TOKEN_PATH": str(wrong)})
    assert result.returncode != 0 and "invalid or incorrect" in result.stdout, _tail(result.stdout)


def test_a_failing_job_makes_submit_exit_non_zero(ray_head: LocalHead) -> None:
    sid = f"moedistill-test-fails-{secrets.token_hex(3)}"
    entrypoint = [sys.executable, "-c", "raise SystemExit(3)"]
    result = ray_head.job("submit", "--submission-id", sid, "--", *entrypoint, check=False)
    assert result.returncode != 0, _tail(result.stdout)
    assert "exit code 3" in result.stdout, _tail(result.stdout)
    assert f"Job '{sid}' failed" in ray_head.job("status", sid).stdout


@pytest.mark.timeout(1500)  # seven job submissions: 16 min measured on a 2-core box under heavy load
def test_stages_run_as_ray_jobs(ray_head: LocalHead, tmp_path: Path) -> None:
    config = tiny_job_config(tmp_path)
    out = tmp_path / "run"
    fill = {"config": str(config), "out": str(out), "sweep": str(tmp_path / "tiny-sweep.yaml")}
    timings = []
    for index, stage in enumerate(STAGES):
        if "{cache}" in stage.args:
            fill["cache"] = str(cache_dir(out))
        args = [arg.format(**fill) for arg in stage.args]
        sid = f"moedistill-test-{index}-{Path(stage.script).stem}-{secrets.token_hex(3)}"
        started = time.monotonic()
        result = submit(ray_head, stage.script, args, sid)
        timings.append(f"{Path(stage.script).stem} {time.monotonic() - started:.0f}s")
        logs = ray_head.job("logs", sid, check=False).stdout
        assert result.returncode == 0, (
            f"`ray job submit ... {stage.script}` exited {result.returncode}; job logs:\n{_tail(logs)}"
        )
        status = ray_head.job("status", sid).stdout
        assert f"Job '{sid}' succeeded" in status, _tail(status)
        try:
            stage.check(out)
        except (AssertionError, OSError, KeyError) as exc:
            pytest.fail(f"{stage.script}: unexpected outputs under {out}: {exc!r}\njob logs:\n{_tail(logs)}")
        assert "warning: output_dir" not in logs and "warning: cache.root" not in logs, _tail(logs)
    print("job wall times: " + ", ".join(timings))


def test_a_relative_output_dir_in_a_job_is_warned_about(ray_head: LocalHead, tmp_path: Path) -> None:
    """Relative paths resolve inside the job's temporary working directory: the entry point says so.

    `report storage --config` (a projection from the config alone, no Ray work) writes under output_dir.
    """
    cfg = yaml.safe_load(tiny_job_config(tmp_path).read_text())
    cfg["output_dir"] = "runs/lost"
    config = tmp_path / "relative.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    sid = f"moedistill-test-relative-{secrets.token_hex(3)}"
    result = submit(ray_head, "jobs/report.py", ["storage", "--config", str(config)], sid)
    assert result.returncode == 0, _tail(result.stdout)
    logs = " ".join(ray_head.job("logs", sid).stdout.split())  # unwrapped
    assert logs.count("moedistill: warning:") == 1, logs  # a projection writes no cache
    assert "moedistill: warning: output_dir resolves to " in logs and "/runs/lost, inside" in logs, logs
    assert "working_dir_files" in logs and "--set output_dir=" in logs, logs


# --- the warning's decision, without a cluster -------------------------------------------------------------
JOB_ENV = {RAY_JOB_ENV: "{}"}


def test_job_working_dir_is_only_known_inside_a_job(tmp_path: Path) -> None:
    assert ray_job_working_dir(environ={}, cwd=tmp_path) is None
    assert ray_job_working_dir(environ=JOB_ENV, cwd=tmp_path) == tmp_path.resolve()


def test_only_paths_inside_the_job_working_dir_are_flagged(tmp_path: Path) -> None:
    workdir = tmp_path / "working_dir_files" / "_ray_pkg_0123"
    workdir.mkdir(parents=True)
    paths = {
        "output_dir": "runs/demo",  # relative: inside
        "cache.root": "s3://bucket/caches",  # a URL: never
        "elsewhere": str(tmp_path / "shared"),  # absolute, outside: fine
        "inside": str(workdir / "x"),  # absolute, but inside
    }
    assert job_local_paths(paths, environ=JOB_ENV, cwd=workdir) == {
        "output_dir": workdir.resolve() / "runs" / "demo",
        "inside": workdir.resolve() / "x",
    }


def test_every_stage_warns_from_its_own_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the stages call once they hold their config (pipeline.cli.load_cli_config, ablate, demo)."""
    from pipeline.cli import load_cli_config

    workdir = tmp_path / "job"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # load_config resolves relative paths against the cwd, as in a job
    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    load_cli_config(argparse.Namespace(config=str(DEMO), set=[]))
    warned = capsys.readouterr().err.strip().splitlines()
    assert len(warned) == 2 and "output_dir" in warned[0] and "cache.root" in warned[1], warned
    assert "/mnt/shared/runs/<name>" in warned[0] and "s3://" in warned[1], warned
    shared = [f"output_dir={tmp_path}/shared", "cache.root=s3://b/caches"]
    config = load_cli_config(argparse.Namespace(config=str(DEMO), set=shared))
    assert capsys.readouterr().err == "" and warn_if_job_local(config) == []
    monkeypatch.delenv(RAY_JOB_ENV)  # outside a job nothing is checked, whatever the paths
    load_cli_config(argparse.Namespace(config=str(DEMO), set=[]))
    assert capsys.readouterr().err == ""
