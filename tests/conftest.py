"""Fixtures every folder shares: one real local Ray cluster for the whole session, one fine-tuned tiny teacher
with its cache (built once, read by many), and the `integration` tier marker.

Tiers (docs/testing.md): a test is `integration` when it needs Ray (this cluster, the shared teacher, or a
cluster of its own: its module says `pytestmark = pytest.mark.integration`); everything else is a unit test.
`pytest -m "not integration"` is the inner loop.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default: each report, checkpoint and the run's end
# waits for a poll. A tight poll saves seconds per run on the tiny models here (propagated to the controller).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# Fixtures that need Ray: a test using any of them is an integration test (`ray_head`: a `ray start` head of
# tests/cluster/test_jobs_submit.py).
RAY_FIXTURES = frozenset(
    {"ray_cluster", "private_ray_cluster", "tiny_teacher_cache", "tiny_workspace", "ray_head"}
)
_SESSION_CLUSTER = {"started": False}  # the session's cluster is up (a private one hands back to it)


# The longest files first (measured, longest first): the test command runs files on two xdist workers, and a
# long file handed out last would run alone at the end.
LONGEST_FILES = (
    "cluster/test_jobs_submit.py",
    "distill/test_distill.py",
    "cluster/test_node_faults.py",
    "finetune/test_finetune.py",
    "distill/test_onpolicy_distill.py",
    "cache/test_s3.py",
    "cache/test_cache.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if RAY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)

    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return LONGEST_FILES.index(path) if path in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: the other files, and every file's own tests, keep their order


def _start_local_cluster() -> None:
    """A fresh 2-CPU local cluster with the launcher's custom resources; its workers inherit os.environ."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",  # always a new cluster of its own, never one a `ray start` elsewhere recorded
        num_cpus=2,
        resources={"teacher_node": 1, "student_node": 1},
        include_dashboard=False,
        log_to_driver=False,
    )


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local cluster for the session (starting Ray costs 5-10 s). Tests that need a cluster of another
    shape start their own in a subprocess; a module that needs a fresh one takes `private_ray_cluster`."""
    import ray

    _start_local_cluster()
    _SESSION_CLUSTER["started"] = True
    try:
        yield
    finally:
        _SESSION_CLUSTER["started"] = False
        ray.shutdown()


@pytest.fixture(scope="module")
def private_ray_cluster() -> Iterator[None]:
    """A fresh cluster for one module: its workers see the environment the module set first (e.g. an S3
    endpoint), and the cluster's actor table holds only the module's actors. The session's cluster comes
    back afterwards (its fixtures' state lives on disk, so nothing is lost)."""
    import ray

    _start_local_cluster()
    try:
        yield
    finally:
        ray.shutdown()
        if _SESSION_CLUSTER["started"]:
            _start_local_cluster()


@pytest.fixture(scope="session")
def tiny_teacher_cache(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """tests/configs/tiny.yaml's teacher fine-tuned (in-process) and cached (Ray Data) once per session.
    Read-only: tests that write take `tiny_workspace`, their module's own copy."""
    from support.tiny import SHARED_TEACHER, tiny_config

    from pipeline.cache.stage import run_cache
    from pipeline.finetune.stage import run_finetune

    config = tiny_config(tmp_path_factory.mktemp("shared-teacher"), SHARED_TEACHER)
    run_finetune(config, eval_examples=2)
    run_cache(config)
    return config


@pytest.fixture(scope="module")
def tiny_workspace(tiny_teacher_cache: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A copy of the shared teacher's output_dir and cache root for one module: what its tests write (student
    runs, sweeps, moved teachers) never reaches another module."""
    from pipeline.config import with_overrides

    source_run, source_caches = Path(tiny_teacher_cache.output_dir), Path(tiny_teacher_cache.cache.root)
    root = tmp_path_factory.mktemp("workspace")
    shutil.copytree(source_run, root / "run")
    shutil.copytree(source_caches, root / "caches")
    return with_overrides(
        tiny_teacher_cache, {"output_dir": str(root / "run"), "cache.root": str(root / "caches")}
    )
