"""Connect to Ray: the cluster a `ray job submit` runs in, or a local one started on demand."""

from __future__ import annotations

import logging
import os


def connect(num_cpus: int | None = None) -> None:
    """ray.init once per process; RAY_ADDRESS (set by `ray job submit`) selects the cluster."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs["num_cpus"] = num_cpus
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    # Keep Ray Data's own progress output quiet; stages draw their own bars.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("MOEDISTILL_RAY_PROGRESS", "0") == "1"
