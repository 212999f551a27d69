"""Run one model-sized function where a stage's training workers run, not on the job driver.

A job's driver lives on the cluster head (a CPU node sized for bookkeeping): evaluating a 12B-parameter
upcycled teacher there for the before/after figures would exhaust its memory. These one-off tasks ask for
the same placement as the stage's workers (a GPU and the node-group resource), so they land on the
teacher or student group; on a laptop they are simply a local Ray task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pipeline.config import TrainConfig

T = TypeVar("T")


def run_placed_like(train: TrainConfig, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a Ray task placed like one worker of `train` (GPU, resources_per_worker)."""
    import ray

    task = ray.remote(fn).options(
        num_cpus=1,
        num_gpus=1 if train.use_gpu else 0,
        resources=dict(train.resources_per_worker) or None,
        max_retries=0,  # deterministic work: a failure would fail again
    )
    return ray.get(task.remote(*args))


def compute_device() -> Any:
    """The device a placed task computes on: its GPU when Ray gave it one."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
