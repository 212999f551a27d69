"""Probes of issue 24 that a config alone decides: each is one clear line from `moedistill`, exit 2, before
any stage (or Ray) starts. (Probe numbers are the issue's.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.paths import TINY
from support.ports import free_port

from pipeline.cli import main
from pipeline.distill.methods import ON_POLICY_METHODS


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The CLI's exit code is 2 and its whole message is one `moedistill: error:` line; -> that line."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moedistill: error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("student.build.num_experts=0", r"student\.build\.num_experts=0 must be >= 1"),  # probe 1
        ("student.build.top_k=8", r"student\.build\.top_k=8 routes to more experts than student\.build\.num"),
        ("teacher.build.top_k=8", r"teacher\.build\.top_k=8 routes to more experts"),  # probe 8
    ],
)
def test_impossible_model_shapes_are_refused_before_any_stage(
    capsys: pytest.CaptureFixture[str], setting: str, expected: str
) -> None:
    line = _refused(capsys, "distill", "--config", str(TINY), "--set", setting)
    assert re.search(expected, line), line
    assert "Fix: --set" in line


@pytest.mark.parametrize("name", ["../../escaped_run", "/tmp/abs", "a/b", "..", "~x"])
def test_run_names_that_leave_the_output_directory_are_refused(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:  # probe 6
    line = _refused(capsys, "distill", "--config", str(TINY), "--set", f"distill.run_name={name}")
    assert f"distill.run_name={name!r} must be a plain name" in line and "Fix:" in line


def test_a_sweep_name_that_leaves_the_output_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = {"name": "../out", "base": str(TINY), "grid": {"distill.method": ["kd"]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    line = _refused(capsys, "ablate", "--config", str(tmp_path / "s.yaml"))
    assert "name='../out' must be a plain name" in line


def test_the_unknown_method_error_lists_every_runnable_method(capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(capsys, "distill", "--config", str(TINY), "--set", "distill.method=b-distil")  # probe 10
    listed = line.split("valid methods: ")[1]
    for name, spec in ON_POLICY_METHODS.items():
        assert (name in listed) == (not spec.missing), (name, listed)
    assert "b-distill" in listed and "kd" in listed


def test_url_credentials_never_reach_the_console(tmp_path: Path) -> None:  # probe 5
    """botocore quotes the bucket as 'KEY:SECRET@bucket' (no scheme): the credentials given on the command
    line are redacted wherever they reappear, and the storage error is one short message, not a traceback."""
    env = {
        **os.environ,
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
    }
    url = "s3://AKIAEXAMPLE:secretvalue@bucket/x"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "cache", "ls", url], env=env, capture_output=True, text=True,
        timeout=120, cwd=tmp_path,
    )  # fmt: skip
    shown = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "secretvalue" not in shown and "AKIAEXAMPLE" not in shown, shown
    assert shown.startswith("moedistill: error: ") and "Traceback" not in shown, shown
    assert len(shown.strip().splitlines()) <= 3, shown


def test_redact_hides_registered_credentials_without_their_scheme() -> None:
    from pipeline.storage import redact, register_secrets

    register_secrets("--set", "cache.root=gs://user:hunter22@bkt/x")
    assert redact('Invalid bucket name "user:hunter22@bkt"') == 'Invalid bucket name "***@bkt"'
    assert redact("password hunter22 rejected") == "password *** rejected"
    assert redact("s3://a:b@c/d") == "s3://***@c/d"  # URLs with credentials, registered or not


@pytest.mark.parametrize("command", ["finetune-teacher", "cache", "distill"])
def test_data_with_no_record_that_fits_is_refused_before_any_stage(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:  # probe 2: every record longer than data.max_length
    sets = ["--set", f"output_dir={tmp_path}", "--set", "data.max_length=12"]
    line = _refused(capsys, command, "--config", str(TINY), *sets)
    expected = (
        r"every one of the \d+ records of the training split is longer than data\.max_length=12 tokens "
        r"\(shortest (\d+), longest \d+\).*Fix: --set data\.max_length=\1 or more"
    )
    assert re.search(expected, line), line


def test_evaluating_a_truncated_checkpoint_names_the_model_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # probe 7
    from support.tiny import tiny_arch, tiny_moe

    model_dir = tmp_path / "student"
    tiny_moe(tiny_arch(num_layers=1)).save_pretrained(model_dir)
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    capsys.readouterr()  # save_pretrained's progress bar
    sets = ["--set", f"output_dir={tmp_path / 'run'}"]
    line = _refused(capsys, "evaluate", "--config", str(TINY), *sets, "--model", f"trunc={model_dir}")
    assert f"model 'trunc' ({model_dir}): weights file {weights} is truncated" in line, line
    assert f"({len(data) // 2} of {len(data)} bytes)" in line and "Fix:" in line, line
    weights.write_bytes(b"\x01")  # not even a header
    line = _refused(capsys, "evaluate", "--config", str(TINY), *sets, "--model", f"trunc={model_dir}")
    assert "no readable safetensors header" in line, line


@pytest.mark.parametrize("setting", ["cache.batch_size=-4", "cache.rows_per_shard=0", "cache.num_actors=0"])
def test_cache_runtime_integers_are_checked_before_any_stage(
    capsys: pytest.CaptureFixture[str], setting: str
) -> None:  # probe 8
    line = _refused(capsys, "cache", "--config", str(TINY), "--set", setting)
    key, value = setting.split("=")
    assert f"{key}={value} must be >= 1. Fix: --set {key}=" in line, line
