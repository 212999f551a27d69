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


def load_for_evaluation(model_cfg: Any, tokenizer: Any) -> Any:
    """The model of `model_cfg` (a ModelConfig) for one placed task: on its GPU in bfloat16 when Ray gave it
    one (a teacher too large for fp32 on one GPU still fits), else on the CPU in float32."""
    import torch

    from pipeline.models.factory import materialize_model

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    return materialize_model(model_cfg, tokenizer).to(device=device, dtype=dtype)
