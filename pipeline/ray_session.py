"""Connect to Ray: the cluster a `ray job submit` runs in, or a local one started on demand.

Ray's own discovery joins the last cluster `ray start` recorded on this machine; when that cluster is dead
(its address file left behind), `ray.init` retries the dead GCS for minutes. So the address is probed first
(a TCP connect, seconds at most): a dead recorded address is skipped for a private local cluster, and a dead
RAY_ADDRESS is an error naming it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pipeline.console import ray_startup_quietly, route_ray_output, use_run_log
from pipeline.errors import MoeDistillError
from pipeline.network import PROBE_TIMEOUT_S, tcp_answers


def connect(num_cpus: int | None = None, output_dir: str | Path | None = None) -> None:
    """ray.init once per process; RAY_ADDRESS (set by `ray job submit`) selects the cluster. With
    `output_dir`, a command-line run sends Ray's and the workers' logs to a file there (pipeline.console)."""
    import ray

    if ray.is_initialized():
        return
    if output_dir is not None:
        use_run_log(output_dir)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    env_address = os.environ.get("RAY_ADDRESS")
    if env_address:
        if not address_answers(env_address):
            raise MoeDistillError(
                f"RAY_ADDRESS={env_address} names a Ray cluster that does not answer (no connection within "
                f"{PROBE_TIMEOUT_S:.0f} s). Fix: start that cluster (or correct RAY_ADDRESS), or unset "
                "RAY_ADDRESS to run on a private local cluster."
            )
    else:
        recorded = recorded_local_address()
        if recorded is not None and not address_answers(recorded):
            print(
                f"moedistill: the local Ray cluster recorded at {recorded} is not running (stale address "
                "file); starting a private local cluster instead",
                file=sys.stderr,
                flush=True,
            )
            kwargs["address"] = "local"
        kwargs["num_cpus"] = num_cpus
        kwargs["include_dashboard"] = False
        kwargs["runtime_env"] = {"worker_process_setup_hook": "pipeline.ray_session.quiet_ray_internals"}
    with ray_startup_quietly():
        ray.init(**kwargs)
    # Keep Ray Data's own progress output quiet; stages draw their own bars.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("MOEDISTILL_RAY_PROGRESS", "0") == "1"
    route_ray_output()  # after ray.data's import, which installs its own console handler


def recorded_local_address() -> str | None:
    """The GCS address the last `ray start` on this machine recorded (what `ray.init()` would join)."""
    from ray._common.utils import get_ray_address_file

    try:
        with open(get_ray_address_file(None)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def address_answers(address: str) -> bool:
    """Whether something accepts TCP connections at a Ray address (host:port, ray://host:port); addresses
    Ray resolves itself ("auto", "local") count as answering."""
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    return not host or not port.isdigit() or tcp_answers(host, int(port))


def quiet_ray_internals() -> None:
    """Runs in every worker of a local cluster. On a loaded laptop Ray Train's placement-group cleaner
    warns once a second that the state API timed out (harmless: it retries); that drowned the progress
    bars of the demo, so only its errors are shown."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR
    )
