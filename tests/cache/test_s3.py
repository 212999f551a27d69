"""The fsspec path end to end against a real S3 API on localhost (moto's ThreadedMotoServer, s3fs client):
build, kill and resume, verify, repair and read a teacher cache at s3://..."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from support.tiny import with_saved_teacher

from pipeline.cache import open_cache, read_cache_dataset, verify_cache
from pipeline.cache.format.shard import committed_shards
from pipeline.cache.repair import repair_cache
from pipeline.cache.stage import cache_runtime_from_config, locate_cache, run_cache
from pipeline.errors import CacheError

pytestmark = pytest.mark.integration  # a Ray cluster of its own, after the S3 environment is set

BUCKET = "moedistill-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """A moto S3 server on a free localhost port; the environment points every s3fs client (this process and
    the Ray workers started after it) at it."""
    import fsspec.config
    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,  # read by fsspec at import (Ray workers)
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.setitem(
            fsspec.config.conf, "s3", {"endpoint_url": endpoint}
        )  # this process imported fsspec already
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            server.stop()


@pytest.fixture(scope="module")
def cluster(s3: Any, request: pytest.FixtureRequest) -> None:
    # started after the S3 environment is set: its workers inherit it
    request.getfixturevalue("private_ray_cluster")


@pytest.fixture(scope="module")
def config(cluster: None, s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny config with its cache at s3://; the teacher is a saved tiny checkpoint (no fine-tuning)."""
    root = tmp_path_factory.mktemp("s3")
    return with_saved_teacher(root, {"cache.root": f"s3://{BUCKET}/caches"})


@pytest.fixture(scope="module")
def cache_url(config: Any) -> str:
    """Built on S3 by a run killed after one committed shard, then resumed by the same call again."""
    runtime = dataclasses.replace(cache_runtime_from_config(config), fail_after_shards=1, progress=False)
    with pytest.raises(CacheError, match="committed"):
        run_cache(config, runtime)
    info = run_cache(config)
    assert info.status == "resumed"
    assert info.path.startswith(f"s3://{BUCKET}/caches/")
    return info.path


def test_killed_build_resumed_and_verified_on_s3(config: Any, cache_url: str, s3: Any) -> None:
    report = verify_cache(cache_url)
    assert report.ok and report.num_shards_ok == report.num_shards == 3, report.problems
    assert locate_cache(config) == cache_url  # the pointer (relative to the root) resolves on S3 too
    assert not s3.exists(f"{cache_url[len('s3://') :]}/_BUILD.lock")  # released


def test_repair_on_s3_rebuilds_only_the_damaged_shard(config: Any, cache_url: str, s3: Any) -> None:
    base = cache_url[len("s3://") :]
    before = {p: s3.info(p)["ETag"] for p in s3.find(base) if "/shards/" in p}
    s3.rm(f"{base}/shards/shard-00001/_SHARD.json")
    s3.pipe_file(f"{base}/shards/shard-00002/index.parquet", b"not parquet")
    assert not verify_cache(cache_url).ok
    result = repair_cache(config, cache_url)
    assert result.rebuilt_shards == [1, 2] and result.report is not None and result.report.ok
    after = {p: s3.info(p)["ETag"] for p in s3.find(base) if "/shards/" in p}
    assert after == before  # same bytes (ETags are MD5s of the content), nothing else touched
    assert sorted(committed_shards(cache_url)) == [0, 1, 2]


def test_read_from_s3_checks_checksums(cache_url: str, s3: Any) -> None:
    base = cache_url[len("s3://") :]
    chunk = next(
        p for p in sorted(s3.find(f"{base}/shards/shard-00000/arrays.zarr/logit_values")) if "/c/" in p
    )
    original = s3.cat_file(chunk)
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    s3.pipe_file(chunk, bytes(damaged))
    try:  # first: a file that passed is not hashed again by the same process
        with pytest.raises(CacheError, match=r"shard 0 of teacher cache s3://.*is corrupted.*cache repair"):
            read_cache_dataset(cache_url, {"logits"})
    finally:
        s3.pipe_file(chunk, original)
    cache = open_cache(cache_url)
    rows = read_cache_dataset(cache_url, {"logits", "gates"}, num_student_experts=2).take_all()
    assert len(rows) == cache.num_sequences > 0
    assert rows[0]["logit_values"].dtype.name == "float32"
    assert os.environ["FSSPEC_S3_ENDPOINT_URL"].startswith("http://127.0.0.1:")
