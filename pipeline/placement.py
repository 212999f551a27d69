"""Where every stage runs: the one module that decides the resources of teacher actors, training workers and
the one-off tasks placed like them, and checks them before anything is scheduled.

* Teacher side: cache actors and teacher-service actors ask for `cache.resources` (e.g. `teacher_node`) and
  `cache.num_gpus_per_actor`; `teacher_placement` decides CPU, one GPU, or one teacher split over several
  GPUs (`device_map`), and `check_no_offload` refuses a teacher that would not fit.
* Student side: Ray Train workers ask for `train.resources_per_worker` (e.g. `student_node`) plus a GPU when
  `train.use_gpu`; `worker_resources` leaves one CPU to Ray Data on small clusters. `run_placed_like` runs a
  model-sized one-off (validation loss, before/after figures) where those workers run, never on the driver.
* Evaluation actors ask for `evaluate.resources` and `evaluate.num_gpus_per_actor`
  (`evaluation_actor_options`).
* Custom resources (`teacher_node`, `student_node`) pin a stage to a node group. `check_placement` accepts a
  resource that a running node offers, or one the cluster's autoscaler can start a node for (cluster.yaml's
  GPU groups scale to zero, so their resources are absent until a stage asks for them); anything else is a
  clear error instead of a job that waits forever for a node that never comes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pipeline.config import Config, TrainConfig
from pipeline.errors import CacheError, ConfigError, MoeDistillError

T = TypeVar("T")

log = logging.getLogger(__name__)

# Resources an autoscaler provides that this process cannot see (e.g. KubeRay, a custom autoscaler):
# MOEDISTILL_AUTOSCALED_RESOURCES=teacher_node,student_node
AUTOSCALED_RESOURCES_ENV = "MOEDISTILL_AUTOSCALED_RESOURCES"
# `ray up` writes the cluster config here on the head, where job drivers run, and starts Ray with
# `--autoscaling-config=~/ray_bootstrap_config.yaml` (ray/autoscaler/_private/commands.py).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


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


# --- training workers and tasks placed like them ----------------------------------------------------------
def worker_resources(cfg: TrainConfig, reserved_cpus: float = 0.0) -> dict[str, float] | None:
    """Leave one CPU to Ray Data: workers that hold every CPU starve the dataset feeding them (a hang).
    `reserved_cpus`: CPUs held by other actors of the run for its whole length (the teacher service)."""
    import ray

    resources = dict(cfg.resources_per_worker)
    if "CPU" in resources or not ray.is_initialized():
        return resources or None
    total_cpus = ray.cluster_resources().get("CPU", 0.0) - reserved_cpus
    if total_cpus - cfg.num_workers < 1:
        resources["CPU"] = max(0.1, round((total_cpus - 1) / cfg.num_workers, 2))
    return resources or None


def small_cluster_cpu_share(num_service_actors: int, cfg: TrainConfig) -> float | None:
    """Logical CPUs per teacher-service actor when whole CPUs for the service and the training workers
    would leave Ray Data none (a 2-CPU machine: service 1 + worker 1 = a hang); None when they fit. Logical
    only: the threads each side uses are set apart (torch_threads)."""
    import ray

    if not ray.is_initialized() or "CPU" in cfg.resources_per_worker:
        return None
    total_cpus = ray.cluster_resources().get("CPU", 0.0)
    holders = num_service_actors + cfg.num_workers
    if total_cpus - holders >= 1:
        return None
    return max(0.1, round((total_cpus - 1) / holders, 2))


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


# --- the teacher (cache actors, teacher service) -----------------------------------------------------------
def teacher_actor_options(
    num_gpus_per_actor: float, num_cpus_per_actor: float, resources: Mapping[str, float] | None
) -> dict[str, Any]:
    """Ray placement of one teacher actor (a whole model replica): its GPUs (several for a `device_map`
    teacher), host CPUs, and the node-group resources that pin it (cache.resources, e.g. teacher_node)."""
    return {
        "num_gpus": num_gpus_per_actor or None,
        "num_cpus": num_cpus_per_actor,
        **({"resources": dict(resources)} if resources else {}),
    }


# Share of each GPU that a multi-GPU (device_map) teacher's weights may fill; the rest holds activations (a
# micro-batch's all-expert outputs [N, E, H] per cached layer dominate: lower cache.batch_size if they OOM).
DEVICE_MAP_WEIGHT_FRACTION = 0.8

PlacementKind = Literal["cpu", "cuda", "device_map"]


@dataclass(frozen=True)
class TeacherPlacement:
    """Where one teacher replica runs: decided by `teacher_placement`, applied by `load_teacher`."""

    kind: PlacementKind
    max_memory: dict[int, int] | None = None  # device_map: weight budget in bytes per visible GPU index

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` arguments: accelerate places the layers over the GPUs (device_map)."""
        if self.kind != "device_map":
            return {}
        return {"device_map": "auto", "max_memory": dict(self.max_memory or {})}


def placement_kind(num_gpus_per_actor: float) -> PlacementKind:
    if num_gpus_per_actor <= 0:
        return "cpu"
    return "cuda" if num_gpus_per_actor <= 1 else "device_map"


def teacher_placement(num_gpus_per_actor: float, gpu_total_memory: Sequence[int]) -> TeacherPlacement:
    """Pure placement rule. gpu_total_memory: total bytes of each CUDA device this process sees (a Ray actor
    sees exactly its assigned GPUs). A device_map teacher gets no CPU or disk budget: it fits on its GPUs or
    fails loudly, never runs silently offloaded."""
    kind = placement_kind(num_gpus_per_actor)
    if kind == "cpu":
        return TeacherPlacement("cpu")
    if not gpu_total_memory:
        raise CacheError(
            f"num_gpus_per_actor={num_gpus_per_actor} but this process sees no CUDA device. Fix: run on a "
            "GPU node with a CUDA build of torch, or set cache.num_gpus_per_actor: 0 for a CPU teacher."
        )
    if kind == "cuda":
        return TeacherPlacement("cuda")
    if not float(num_gpus_per_actor).is_integer():
        raise ConfigError(
            f"num_gpus_per_actor={num_gpus_per_actor}: above 1 a teacher is split over whole GPUs. Fix: use "
            f"a whole number ({int(num_gpus_per_actor) + 1}), or <= 1 for one (shared) GPU."
        )
    n = int(num_gpus_per_actor)
    if len(gpu_total_memory) < n:
        raise CacheError(
            f"num_gpus_per_actor={n} but this process sees only {len(gpu_total_memory)} CUDA device(s). Fix: "
            "check CUDA_VISIBLE_DEVICES, or lower cache.num_gpus_per_actor to the GPUs a node has."
        )
    budget = {i: int(gpu_total_memory[i] * DEVICE_MAP_WEIGHT_FRACTION) for i in range(n)}
    return TeacherPlacement("device_map", budget)


def visible_gpu_memory() -> list[int]:
    """Total memory (bytes) of each CUDA device this process sees; [] without CUDA."""
    import torch  # only inside a teacher actor: the CLI and drivers import this module without torch

    if not torch.cuda.is_available():
        return []
    return [int(torch.cuda.get_device_properties(i).total_memory) for i in range(torch.cuda.device_count())]


def check_no_offload(device_map: dict[str, Any] | None, num_gpus: int) -> None:
    """CacheError if accelerate put any module on the CPU or disk (the teacher does not fit its GPUs)."""
    offloaded = sorted(
        name for name, dev in (device_map or {}).items() if str(dev) in ("cpu", "disk", "meta")
    )
    if offloaded:
        raise CacheError(
            f"the teacher does not fit in {num_gpus} GPUs at {DEVICE_MAP_WEIGHT_FRACTION:.0%} of their "
            f"memory: {len(offloaded)} module(s) would be offloaded ({', '.join(offloaded[:3])}). Fix: raise "
            "cache.num_gpus_per_actor, or use GPUs with more memory."
        )


def student_gpus_per_worker(train: TrainConfig) -> float:
    """The GPU share one Ray Train worker asks for: resources_per_worker's GPU, else 1 with train.use_gpu."""
    return float(train.resources_per_worker.get("GPU", 1.0 if train.use_gpu else 0.0))


def check_separate_gpus(
    teacher_gpus: float,
    teacher_resources: Mapping[str, float],
    train: TrainConfig,
    nodes: Sequence[Mapping[str, float]] | None = None,
) -> None:
    """ConfigError when Ray could put a teacher actor and a student worker on the same GPU.

    Ray gives a request of >= 1 GPU whole devices of its own and packs fractional requests onto shared ones,
    so the two sides can only meet on a GPU when both ask for a fraction. `nodes` (each node's resources,
    e.g. from `ray.nodes()`) narrows that to a GPU node offering both sides' custom resources; without it
    any two fractions are refused.
    """
    student_gpus = student_gpus_per_worker(train)
    if not (0 < teacher_gpus < 1 and 0 < student_gpus < 1):
        return
    if nodes is not None:
        wanted = (set(teacher_resources) | set(train.resources_per_worker)) - {"GPU", "CPU"}
        if not any(n.get("GPU", 0) > 0 and all(n.get(r, 0) > 0 for r in wanted) for n in nodes):
            return
    raise ConfigError(
        f"teacher actors ask for {teacher_gpus} GPU and student workers for {student_gpus} GPU: Ray may "
        "pack both onto one GPU, and the teacher and the student must never share GPU memory. Fix: give "
        "one side whole GPUs (cache.num_gpus_per_actor: 1, or train.resources_per_worker without a "
        "fractional GPU), or pin the sides to different node groups (cache.resources: {teacher_node: 1}, "
        "train.resources_per_worker: {student_node: 1})."
    )


# --- evaluation actors -------------------------------------------------------------------------------------
def evaluation_actor_options(config: Config) -> dict[str, Any]:
    """Ray Data `map_batches` placement of one evaluation actor: its GPU share and node-group resources
    (e.g. {"student_node": 1} pins the actors to cluster.yaml's student_gpu nodes)."""
    ev = config.evaluate
    return {"num_gpus": ev.num_gpus_per_actor, **({"resources": dict(ev.resources)} if ev.resources else {})}
