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
        kwargs["runtime_env"] = {"worker_process_setup_hook": "pipeline.ray_session.quiet_ray_internals"}
    ray.init(**kwargs)
    # Keep Ray Data's own progress output quiet; stages draw their own bars.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("MOEDISTILL_RAY_PROGRESS", "0") == "1"


def quiet_ray_internals() -> None:
    """Runs in every worker of a local cluster. On a loaded laptop Ray Train's placement-group cleaner
    warns once a second that the state API timed out (harmless: it retries); that drowned the progress
    bars of the demo, so only its errors are shown."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR
    )
