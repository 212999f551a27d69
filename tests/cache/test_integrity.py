"""Read-time integrity, build-time repair, the build lock, redaction and safe checkpoint loading, on a small
cache built in-process (executor "local": the same per-shard code as the Ray pipeline, no cluster)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support.tiny import teacher_assets, teacher_cache_spec, tiny_arch

from pipeline import storage as cfs
from pipeline.cache import CacheRuntime, build_teacher_cache, open_cache, verify_cache
from pipeline.cache.integrity.checks import (
    check_before_read,
    ensure_verified,
    forget_verified,
    quick_check,
    verify_shards,
)
from pipeline.errors import CacheError, MoeDistillError
from pipeline.locks import LOCK_FILE, DirectoryLock
from pipeline.training import loop

NUM_RECORDS, ROWS_PER_SHARD = 20, 8  # 3 shards, the last one partial
LOCAL = CacheRuntime(batch_size=4, rows_per_shard=ROWS_PER_SHARD, executor="local", progress=False)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("integrity")
    arch = tiny_arch(
        num_layers=2, num_experts=4, num_heads=2, num_kv_heads=1, head_dim=16, initializer_range=0.02
    )
    a = teacher_assets(root, NUM_RECORDS, records_seed=5, vocab_size=384, arch=arch, model_seed=0)
    spec = teacher_cache_spec(
        a,
        cached_layers=(0, 1),
        width=None,
        logits_k=8,
        states_dtype="float16",
        max_length=256,
    )
    info = build_teacher_cache(spec, a.records, str(root / "caches"), LOCAL)
    return {"root": root, "records": a.records, "spec": spec, "info": info}


def copy_cache(assets: dict[str, Any], dest: Path) -> Path:
    """A copy under a root of its own (same key directory name, so a build there resumes it)."""
    target = dest / "caches" / assets["info"].key
    shutil.copytree(assets["info"].path, target)
    return target


def digests(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def flip_16_bytes(path: Path) -> Path:
    chunk = next(p for p in sorted(path.rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    chunk.write_bytes(bytes(data))
    return chunk


# --- read-time checksums ------------------------------------------------------------------------------------
def test_reader_refuses_a_flipped_logit_chunk(assets: dict[str, Any], tmp_path: Path) -> None:
    path = copy_cache(assets, tmp_path)
    chunk = flip_16_bytes(path / "shards/shard-00001/arrays.zarr/logit_values")
    cache = open_cache(str(path))
    rel = chunk.relative_to(path).as_posix()
    with pytest.raises(CacheError, match=rf"shard 1 .*file {rel} is corrupted.*moedistill cache repair"):
        cache.read_shard(1, {"logits"})
    assert cache.read_shard(0, {"logits"})  # undamaged shards read fine
    assert cache.read_shard(1, {"gates"})  # a read that never opens the damaged array is not refused
    with pytest.raises(CacheError, match=rf"file {rel} is corrupted"):
        verify_shards(str(path), cache.manifest, {"logits"})  # the driver's pre-check (no Ray: in-process)
    check_before_read(str(path), cache.manifest, {"logits"})  # same size: only the checksum can tell


def test_quick_check_finds_truncated_files_and_missing_commit_markers(
    assets: dict[str, Any], tmp_path: Path
) -> None:
    path = copy_cache(assets, tmp_path)
    index = path / "shards/shard-00000/index.parquet"
    index.write_bytes(index.read_bytes()[:-7])
    (path / "shards/shard-00002/_SHARD.json").unlink()
    manifest = open_cache(str(path)).manifest
    problems = quick_check(str(path), manifest)
    assert set(problems) == {0, 2}, problems
    assert "index.parquet has" in problems[0] and "_SHARD.json is missing" in problems[2]
    with pytest.raises(CacheError, match=r"shard 0 .* is damaged.*1 more shards.*cache repair"):
        check_before_read(str(path), manifest, {"logits"})
    report = verify_cache(str(path))
    assert not report.ok and {0, 2} <= set(report.damaged)
    assert any("commit marker shards/shard-00002/_SHARD.json is missing" in p for p in report.problems)


def test_checksum_cost_is_small_next_to_reading(
    assets: dict[str, Any], capsys: pytest.CaptureFixture
) -> None:
    """Measures sha256 of a shard's files against decoding the same shard (printed; the bound is loose)."""
    import time

    cache = open_cache(assets["info"].path)
    fields = {"logits", "gates", "expert_states"}
    t0 = time.perf_counter()
    for _ in range(5):
        forget_verified()
        for s in cache.shards:
            ensure_verified(cache.path, s, fields)
    hashing = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(5):
        for s in cache.shards:
            cache.read_shard(s["shard_id"], fields)  # hashes nothing: verified above in this process
    reading = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n[integrity] sha256 {hashing:.3f} s vs decode {reading:.3f} s ({hashing / reading:.2f}x)")
    assert hashing < 2 * reading


# --- repair by the build itself ----------
def test_build_rebuilds_only_damaged_shards_byte_identically(assets: dict[str, Any], tmp_path: Path) -> None:
    path = copy_cache(assets, tmp_path)
    before = digests(path)
    shutil.rmtree(path / "shards/shard-00001")
    values = next((path / "shards/shard-00002/arrays.zarr/gates").rglob("c/*/*/*"))
    values.write_bytes(values.read_bytes()[:-3])
    mtime_0 = (path / "shards/shard-00000/index.parquet").stat().st_mtime_ns
    info = build_teacher_cache(assets["spec"], assets["records"], str(tmp_path / "caches"), LOCAL)
    assert info.status == "resumed"
    assert verify_cache(str(path)).ok
    assert digests(path) == before  # rebuilt shards are byte-identical, the manifest too
    assert (path / "shards/shard-00000/index.parquet").stat().st_mtime_ns == mtime_0  # shard 0 untouched


def test_zero_usable_sequences_is_an_error_naming_the_limit_and_never_complete(
    assets: dict[str, Any], tmp_path: Path
) -> None:
    import dataclasses

    spec = dataclasses.replace(assets["spec"], max_length=8)
    with pytest.raises(
        CacheError, match=rf"0 usable sequences: all {NUM_RECORDS} of {NUM_RECORDS} .*max_length=8"
    ):
        build_teacher_cache(spec, assets["records"], str(tmp_path / "caches"), LOCAL)
    (manifest,) = (tmp_path / "caches").glob("*/manifest.json")
    assert json.loads(manifest.read_text())["complete"] is False  # an empty cache is never marked complete


# --- the build lock ----------
def test_a_second_build_refuses_and_never_touches_the_first_ones_staging(
    assets: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = copy_cache(assets, tmp_path)
    shutil.rmtree(path / "shards/shard-00001")
    staging = path / "shards/.tmp-shard-00001-of-the-first-build"
    staging.mkdir()
    (staging / "index.parquet").write_bytes(b"half written")
    monkeypatch.setenv("MOEDISTILL_CACHE_LOCK_WAIT_S", "0.5")
    with DirectoryLock(str(path)):  # the first build, still running
        with pytest.raises(CacheError, match=r"another build is writing .*pid \d+.*wait for it to finish"):
            build_teacher_cache(assets["spec"], assets["records"], str(tmp_path / "caches"), LOCAL)
        assert (staging / "index.parquet").read_bytes() == b"half written"
    assert not (path / LOCK_FILE).exists()  # released


def test_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text('{"host": "gone", "pid": 1, "token": "x", "heartbeat": 0}')
    with DirectoryLock(str(tmp_path), wait_s=0.0, stale_s=5.0) as lock:
        assert cfs.read_json(lock.fs, lock.path)["token"] == lock.owner["token"]
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    import json
    import socket
    import subprocess
    import sys
    import time

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process (a holder killed with SIGKILL)
    held = {"host": socket.gethostname(), "pid": dead.pid, "token": "x", "heartbeat": time.time()}
    (tmp_path / LOCK_FILE).write_text(json.dumps(held))  # a fresh heartbeat: not stale by age
    with DirectoryLock(str(tmp_path), wait_s=0.0, stale_s=600.0) as lock:
        assert cfs.read_json(lock.fs, lock.path)["token"] == lock.owner["token"]
    alive = {**held, "pid": os.getpid()}  # a live holder on this host keeps its lock
    (tmp_path / LOCK_FILE).write_text(json.dumps(alive))
    with pytest.raises(CacheError, match="another build"):
        DirectoryLock(str(tmp_path), wait_s=0.0, stale_s=600.0).acquire()


def test_a_held_lock_keeps_its_heartbeat_fresh(tmp_path: Path) -> None:
    import time

    with DirectoryLock(str(tmp_path), stale_s=0.4) as lock:
        time.sleep(1.0)  # > stale_s: only the heartbeat keeps it alive
        with pytest.raises(CacheError, match="another build"):
            DirectoryLock(str(tmp_path), wait_s=0.3, stale_s=0.4).acquire()
        assert cfs.read_json(lock.fs, lock.path)["token"] == lock.owner["token"]


# --- URLs ----------
def test_credentials_are_redacted() -> None:
    text = "cannot open s3://KEY:SECRET@bucket/caches/x (also gs://tok@b/y); /tmp/a@b stays"
    assert cfs.redact(text) == "cannot open s3://***@bucket/caches/x (also gs://***@b/y); /tmp/a@b stays"


def test_missing_fsspec_backend_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec.registry  # noqa: F401 (the module; `fsspec.registry` the attribute is a read-only view)

    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    with pytest.raises(CacheError, match=r"s3://\*\*\*@bucket/c.*pip install 'moe-distill\[s3\]'") as err:
        cfs.get_fs("s3://KEY:SECRET@bucket/c")
    assert "SECRET" not in str(err.value)


def test_stored_paths_are_relative_to_the_root() -> None:
    assert cfs.relative_to("s3://b/caches/", "s3://b/caches/abc") == "abc"
    assert cfs.resolve_under("/moved/caches", "abc") == "/moved/caches/abc"
    assert cfs.resolve_under("/moved/caches", "/old/caches/abc") == "/old/caches/abc"  # older pointers


# --- checkpoints ----------
def test_rng_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save({"rng": [loop._rng_state()]}, tmp_path / loop.STATE_FILE)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    loop._set_rng_state(loop.load_training_state(tmp_path / loop.STATE_FILE)["rng"][0])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    with open(tmp_path / loop.STATE_FILE, "wb") as f:
        pickle.dump({"step": 1, "rng": _RunsCode(str(marker))}, f, protocol=2)
    with pytest.raises(MoeDistillError, match=r"refusing to load checkpoint .*could run code"):
        loop.load_training_state(tmp_path / loop.STATE_FILE)
    assert not marker.exists()
