"""Fault injection through the CLI: each numbered case of "nothing trains on bad data" on a real tiny cache.

One cache is built by `moedistill cache` (Ray Data, a tiny saved teacher); every test damages its own copy
and asserts the clear error, or the repair, and that no bytes outside the damaged shard changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from support.paths import REPO, TINY
from support.ports import free_port
from support.tiny import save_teacher, with_saved_teacher, write_config

from pipeline.cache.stage import locate_cache, teacher_checkpoint
from pipeline.cli import main
from pipeline.config import load_config, teacher_fields, with_overrides
from pipeline.errors import ConfigError
from pipeline.run_identity import claim_run_dir
from pipeline.workspace import paths_for


@pytest.fixture(scope="module")
def built(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("faults")
    config = with_saved_teacher(root)
    yaml_path = write_config(config, root / "config.yaml")
    assert main(["cache", "--config", yaml_path]) == 0
    cache = Path(locate_cache(config))
    return {"root": root, "config": config, "yaml": yaml_path, "cache": cache, "digests": digests(cache)}


def cli(*argv: str) -> int:
    """The exit code of `moedistill ARGV` (`cache verify` exits through SystemExit)."""
    try:
        return main(list(argv))
    except SystemExit as e:
        return int(e.code or 0)


def digests(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def copy_root(built: dict[str, Any], dest: Path) -> tuple[str, Path]:
    """A copy of the whole cache root; -> (a config file using it, the copied cache directory)."""
    shutil.copytree(built["root"] / "caches", dest / "caches")
    config = with_overrides(built["config"], {"cache.root": str(dest / "caches")})
    return write_config(config, dest / "config.yaml"), dest / "caches" / built["cache"].name


def flip_16_bytes(chunk: Path) -> None:
    data = bytearray(chunk.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    chunk.write_bytes(bytes(data))


def chunk_of(cache: Path, shard: int, array: str) -> Path:
    files = sorted((cache / f"shards/shard-{shard:05d}/arrays.zarr/{array}").rglob("*"))
    return next(p for p in files if p.is_file() and p.name != "zarr.json")


# --- 1. training on a corrupted cache ----------
def test_1_distill_on_a_flipped_logit_chunk_fails_before_training(
    built: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config_path, cache = copy_root(built, tmp_path)
    chunk = chunk_of(cache, 1, "logit_values")
    flip_16_bytes(chunk)
    started = time.perf_counter()
    code = main(["distill", "--config", config_path, "--set", "distill.method=kd"])
    err = capsys.readouterr().err
    assert code == 2, err
    rel = chunk.relative_to(cache).as_posix()
    assert f"shard 1 of teacher cache {cache}: file {rel} is corrupted" in err, err
    assert f"moedistill cache repair {cache} --config" in err, err
    assert not list((Path(built["config"].output_dir) / "students").glob("kd-*/metrics")), "training started"
    assert time.perf_counter() - started < 60


# --- 2. repair ----------
def test_2_repair_rebuilds_corrupt_shards_and_a_broken_manifest(
    built: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config_path, cache = copy_root(built, tmp_path)
    flip_16_bytes(chunk_of(cache, 0, "logit_values"))
    (cache / "shards/shard-00002/_SHARD.json").unlink()
    assert cli("cache", "verify", str(cache)) == 1
    out = capsys.readouterr().out
    assert "commit marker shards/shard-00002/_SHARD.json is missing" in out, out
    (cache / "manifest.json").write_text('{"schema": "teacher_cache", "truncated')
    assert main(["cache", "repair", str(cache), "--config", config_path]) == 0
    out = capsys.readouterr().out
    assert "manifest rebuilt from the commit markers; shards [0, 2] rebuilt" in out, out
    assert "OK: teacher cache" in out, out
    assert digests(cache) == built["digests"]  # byte-identical to the uninterrupted build, manifest included
    assert cli("cache", "verify", str(cache)) == 0


def test_2_rerunning_cache_rebuilds_a_deleted_shard_only(
    built: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config_path, cache = copy_root(built, tmp_path)
    shutil.rmtree(cache / "shards/shard-00001")
    untouched = {p: p.stat().st_mtime_ns for p in (cache / "shards/shard-00000").rglob("*") if p.is_file()}
    assert main(["cache", "--config", config_path]) == 0
    assert "resumed and completed" in capsys.readouterr().out
    assert digests(cache) == built["digests"]
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched


# --- 3. the configured teacher ----------
def test_3_teacher_path_wins_over_a_stale_fine_tuned_teacher(built: dict[str, Any], tmp_path: Path) -> None:
    built_from = with_overrides(load_config(TINY), {"output_dir": str(tmp_path / "run")})
    stale = paths_for(built_from).teacher_final
    save_teacher(built_from, stale, seed=1)
    claim_run_dir(stale.parent, teacher_fields(built_from), what="teacher", fix="-")
    config = with_overrides(
        built["config"],
        {"output_dir": str(tmp_path / "run"), "tokenizer.path": built["config"].tokenizer.path},
    )
    assert teacher_checkpoint(config) == built["config"].teacher.path
    assert teacher_checkpoint(built_from) == str(stale)  # fine-tuned from this config's teacher: used
    no_path = with_overrides(built_from, {"teacher.build.hidden_size": 32})  # another teacher, no path
    with pytest.raises(ConfigError, match=r"was made from another teacher .* than this config's"):
        teacher_checkpoint(no_path)


# --- 4. moved roots ----------
def test_4_a_copied_root_resolves_to_itself(built: dict[str, Any], tmp_path: Path) -> None:
    _, cache = copy_root(built, tmp_path)
    moved = with_overrides(built["config"], {"cache.root": str(tmp_path / "caches")})
    assert locate_cache(moved) == str(cache)
    pointer = next((tmp_path / "caches" / "by-config").glob("*.json"))
    assert json.loads(pointer.read_text())["path"] == cache.name


# --- 9. truncated files are found before training ----------
def test_9_a_truncated_index_is_an_error_before_training(
    built: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config_path, cache = copy_root(built, tmp_path)
    index = cache / "shards/shard-00002/index.parquet"
    index.write_bytes(index.read_bytes()[:-100])
    before = digests(cache)
    assert main(["distill", "--config", config_path, "--set", "distill.method=sft"]) == 2
    err = capsys.readouterr().err
    assert "shard 2 of teacher cache" in err and "shards/shard-00002/index.parquet has" in err, err
    assert "Traceback" not in err
    assert digests(cache) == before  # an error changes nothing


# --- 10. a dead local head ----------
def _run_connect(env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    code = (
        "import ray; from pipeline.ray_session import connect; connect(num_cpus=1); "
        "print('GCS', ray.get_runtime_context().gcs_address)"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.integration  # starts a private Ray cluster in a subprocess
def test_10_a_stale_local_address_starts_a_private_cluster() -> None:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as tmp:  # short: Ray's socket paths
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = tmp
        started = time.perf_counter()
        proc = _run_connect(env, timeout=120)
        elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"local Ray cluster recorded at 127.0.0.1:{port} is not running" in proc.stderr
    assert "GCS" in proc.stdout and f":{port}" not in proc.stdout.split("GCS", 1)[1]
    assert elapsed < 90  # starting the private cluster itself takes most of it


def test_10_a_dead_ray_address_is_an_error_naming_it(capsys: pytest.CaptureFixture) -> None:
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    started = time.perf_counter()
    proc = _run_connect(env, timeout=60)
    assert proc.returncode != 0
    assert f"RAY_ADDRESS=127.0.0.1:{port} names a Ray cluster that does not answer" in proc.stderr
    assert time.perf_counter() - started < 30


# --- 11. determinism: two runs of one config give identical weights and losses ----------
# Covered in tests/distill/test_distill.py on the same tiny config: one worker (the killed-and-resumed
# B-Distill run equals the same config trained uninterrupted) and two DDP workers (one run trained twice).


def test_collate_class_raises_no_deprecation_warning(ray_cluster: None) -> None:
    import numpy as np
    import ray
    import torch

    from pipeline.training.loop import _numpy_collate

    class Task:
        def collate(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return {"x": torch.as_tensor(batch["x"]) * 2}

    ds = ray.data.from_items([{"x": i} for i in range(4)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(ds.iterator().iter_torch_batches(batch_size=2, collate_fn=_numpy_collate(Task())))
    assert sorted(int(v) for b in batches for v in b["x"]) == [0, 2, 4, 6]
    assert not [w for w in caught if "collate_fn" in str(w.message)], [str(w.message) for w in caught]


# --- --set errors ----------
def test_errors_caused_by_set_name_the_override_not_the_file(capsys: pytest.CaptureFixture) -> None:
    assert main(["distill", "--config", str(TINY), "--set", "distill.train.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moedistill: error: --set distill.train.batch_size=0 (applied to {TINY}): "), err
