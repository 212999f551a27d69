"""Where stages run on a Ray cluster, checked before anything is scheduled.

* Custom resources (`teacher_node`, `student_node`) pin a stage to a node group. `check_placement` accepts a
  resource that a running node offers, or one the cluster's autoscaler can start a node for (cluster.yaml's
  GPU groups scale to zero, so their resources are absent until a stage asks for them); anything else is a
  clear error instead of a job that waits forever for a node that never comes.
* Under `ray job submit` a relative `output_dir` / `cache.root` resolves inside the job's temporary working
  directory, where outputs are lost: `warn_if_job_local` says so, naming the fix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import MoeDistillError

log = logging.getLogger(__name__)

# Resources an autoscaler provides that this process cannot see (e.g. KubeRay, a custom autoscaler):
# MOEDISTILL_AUTOSCALED_RESOURCES=teacher_node,student_node
AUTOSCALED_RESOURCES_ENV = "MOEDISTILL_AUTOSCALED_RESOURCES"
# `ray up` writes the cluster config here on the head, where job drivers run, and starts Ray with
# `--autoscaling-config=~/ray_bootstrap_config.yaml` (ray/autoscaler/_private/commands.py).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# Set by Ray's job supervisor for every `ray job submit` entrypoint (ray/dashboard/modules/job/
# job_supervisor.py); RAY_JOB_ID is stripped from the entrypoint's environment since ray 2.40.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


# --- custom resources ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlacementCheck:
    """What became of each requested resource."""

    live: list[str] = field(default_factory=list)  # offered by a running node
    autoscaled: dict[str, str] = field(default_factory=dict)  # absent now; name -> what will provide it
    missing: list[str] = field(default_factory=list)  # nothing offers it, now or later


def autoscaler_node_types(path: str | Path = BOOTSTRAP_CONFIG) -> dict[str, dict[str, float]]:
    """Worker node types the autoscaler may launch ({name: resources}), from a cluster launcher config.

    Node types with `max_workers: 0` (the head, usually) are left out, and everything is left out when the
    cluster's own `max_workers` is 0. A missing or unreadable file gives {}.
    """
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        return {}
    try:
        raw = yaml.safe_load(path.read_text())  # `ray up` writes it as JSON, which YAML reads too
    except (OSError, yaml.YAMLError) as exc:
        log.warning("cannot read the autoscaler config %s: %s", path, exc)
        return {}
    if not isinstance(raw, dict) or not isinstance(raw.get("available_node_types"), dict):
        return {}
    cluster_max = raw.get("max_workers")
    if isinstance(cluster_max, int | float) and cluster_max <= 0:
        return {}
    found: dict[str, dict[str, float]] = {}
    for name, spec in raw["available_node_types"].items():
        if not isinstance(spec, dict):
            continue
        max_workers = spec.get("max_workers", cluster_max)
        if isinstance(max_workers, int | float) and max_workers <= 0:
            continue
        resources = spec.get("resources") or {}
        found[str(name)] = {
            str(k): float(v) for k, v in resources.items() if isinstance(v, int | float) and v > 0
        }
    return found


def autoscalable_resources(
    autoscaler_config: str | Path | None = BOOTSTRAP_CONFIG,
    environ: Mapping[str, str] | None = None,
    ask_gcs: bool = True,
) -> dict[str, str]:
    """Resources an autoscaler can provide although no running node offers them: {name: what provides it}.

    Sources: $MOEDISTILL_AUTOSCALED_RESOURCES (comma list), the cluster launcher's config on the head
    (`autoscaler_config`; None skips it) and, when connected, the cluster config an autoscaler reported to
    the GCS (what Ray Train itself reads; launcher clusters with the default autoscaler do not report one).
    """
    env = os.environ if environ is None else environ
    found: dict[str, str] = {}
    for name in (env.get(AUTOSCALED_RESOURCES_ENV) or "").split(","):
        if name.strip():
            found.setdefault(name.strip(), f"${AUTOSCALED_RESOURCES_ENV}")
    if autoscaler_config is not None:
        for node_type, resources in autoscaler_node_types(autoscaler_config).items():
            for name in resources:
                found.setdefault(name, f"node type {node_type!r} of {autoscaler_config}")
    if ask_gcs:
        for name in _gcs_max_resources():
            found.setdefault(name, "the autoscaler's cluster config (GCS)")
    return found


def _gcs_max_resources() -> list[str]:
    """Resources of the node groups an autoscaler reported to the GCS (ray._private: best effort only)."""
    try:
        import ray

        if not ray.is_initialized():
            return []
        from ray._private.state import state

        reported = state.get_max_resources_from_cluster_config() or {}
    except Exception as exc:  # a private API: never let it break a stage
        log.debug("no cluster config from the GCS: %s", exc)
        return []
    return [name for name, amount in reported.items() if amount]


def plan_placement(
    resources: Mapping[str, float], live: Mapping[str, float], autoscalable: Mapping[str, str]
) -> PlacementCheck:
    """The decision alone: every requested resource is live, autoscaled or missing."""
    check = PlacementCheck()
    for name in resources:
        if live.get(name, 0) > 0:
            check.live.append(name)
        elif name in autoscalable:
            check.autoscaled[name] = autoscalable[name]
        else:
            check.missing.append(name)
    return check


def check_placement(
    resources: Mapping[str, float],
    what: str,
    *,
    live: Mapping[str, float] | None = None,
    autoscaler_config: str | Path | None = BOOTSTRAP_CONFIG,
    environ: Mapping[str, str] | None = None,
) -> PlacementCheck | None:
    """Fail before scheduling when no node offers a resource and no autoscaler can start one.

    `live` defaults to `ray.cluster_resources()` (nothing is checked when Ray is not initialised). When a
    resource is only autoscalable, prints one line saying the stage waits for the autoscaler.
    """
    if not resources:
        return None
    if live is None:
        import ray

        if not ray.is_initialized():
            return None
        live = ray.cluster_resources()
    absent = any(live.get(name, 0) <= 0 for name in resources)
    autoscalable = autoscalable_resources(autoscaler_config, environ) if absent else {}
    check = plan_placement(resources, live, autoscalable)
    if check.missing:
        offered = sorted(k for k in live if not k.startswith("node:"))
        first = check.missing[0]
        raise MoeDistillError(
            f"{what} ask for resource(s) {check.missing}, which no node of this Ray cluster offers "
            f"(cluster resources: {offered}) and no autoscaler node type provides (checked "
            f"{autoscaler_config} and ${AUTOSCALED_RESOURCES_ENV}). Fix: start nodes with them "
            "(`ray start --resources '{\"" + first + "\": 1}'`, or the node type's `resources` in "
            f"cluster.yaml), set {AUTOSCALED_RESOURCES_ENV}={','.join(check.missing)} when your autoscaler "
            "provides them, or remove them from the config."
        )
    if check.autoscaled:
        sources = "; ".join(sorted({f"{n} from {src}" for n, src in check.autoscaled.items()}))
        print(
            f"[placement] {what}: no running node offers {sorted(check.autoscaled)} yet ({sources}); "
            "waiting for the autoscaler to start one (minutes on a cloud; `ray status` shows it)",
            flush=True,
        )
    return check


# --- outputs under `ray job submit` -------------------------------------------------------------------------
def ray_job_working_dir(
    environ: Mapping[str, str] | None = None, cwd: str | Path | None = None
) -> Path | None:
    """The working directory of the `ray job submit` entrypoint this process is, or None outside a job.

    With `--working-dir`, Ray unpacks the upload into a per-job temporary directory
    (<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>) and starts the entrypoint there.
    """
    env = os.environ if environ is None else environ
    if not env.get(RAY_JOB_ENV):
        return None
    return Path(cwd if cwd is not None else os.getcwd()).resolve()


def job_local_paths(
    paths: Mapping[str, str | None], environ: Mapping[str, str] | None = None, cwd: str | Path | None = None
) -> dict[str, Path]:
    """The output paths ({label: path}) that resolve inside the Ray job's working directory."""
    workdir = ray_job_working_dir(environ, cwd)
    if workdir is None:
        return {}
    local: dict[str, Path] = {}
    for label, value in paths.items():
        if not value or "://" in value:
            continue
        path = Path(value).expanduser()
        resolved = (path if path.is_absolute() else workdir / path).resolve()
        if resolved == workdir or workdir in resolved.parents:
            local[label] = resolved
    return local


def format_job_local_warning(label: str, path: Path, workdir: Path | None) -> str:
    shared = "an absolute path on storage every node shares"
    fix = {
        "output_dir": f"{shared} (output_dir: /mnt/shared/runs/<name>, the EFS mount of cluster.yaml), e.g. "
        "with --set output_dir=...",
        "cache.root": f"an s3:// URL or {shared} (cache.root: s3://<bucket>/caches), e.g. with --set "
        "cache.root=...",
    }.get(label, f"{shared} (e.g. --out /mnt/shared/reports)")
    return (
        f"moedistill: warning: {label} resolves to {path}, inside this Ray job's working directory "
        f"{workdir}: Ray unpacks --working-dir into a temporary per-job directory, so what is written "
        f"there is not on other nodes and is lost when Ray cleans it up. Fix: set {label} to {fix} "
        "(docs/cluster.md)."
    )


def warn_job_local_paths(
    paths: Mapping[str, str | None], environ: Mapping[str, str] | None = None, cwd: str | Path | None = None
) -> list[str]:
    """Print (stderr) and return one warning per output path inside the Ray job's working directory."""
    import sys

    workdir = ray_job_working_dir(environ, cwd)
    warnings = [
        format_job_local_warning(label, path, workdir)
        for label, path in job_local_paths(paths, environ, cwd).items()
    ]
    for line in warnings:
        print(line, file=sys.stderr, flush=True)
    return warnings


def config_output_paths(config: Any) -> dict[str, str]:
    """What a stage of `config` writes (pipeline.config.Config): output_dir and cache.root."""
    return {"output_dir": str(config.out), "cache.root": config.cache.root}


def warn_if_job_local(config: Any) -> list[str]:
    """What every stage calls once it has its config: a no-op outside `ray job submit`."""
    return warn_job_local_paths(config_output_paths(config))
