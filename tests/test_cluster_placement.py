"""Placement on a local cluster with the launcher's custom resources (conftest's `ray_cluster`: one
`teacher_node` and one `student_node`): teacher actors and student training workers run holding the resource
their config asks for, and a resource no node offers fails at once with a readable error instead of a job
that waits forever for a node that never comes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import TrainConfig
from pipeline.errors import MoeDistillError
from pipeline.training.loop import LoopSpec
from pipeline.training.runner import check_resources_exist, fit

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_teacher_actor_pool_holds_teacher_node() -> None:
    """What the cache stage does: a Ray Data actor pool with `resources=cache.resources`."""
    import ray
    from ray.data import ActorPoolStrategy

    class Probe:  # defined here so Ray ships it by value to the actor
        def __init__(self) -> None:
            ctx = ray.get_runtime_context()
            self.where = json.dumps({"resources": ctx.get_assigned_resources(), "actor": ctx.get_actor_id()})

        def __call__(self, batch: dict) -> dict:
            return {"where": [self.where] * len(batch["id"])}

    rows = (
        ray.data.range(8, override_num_blocks=4)
        .map_batches(Probe, compute=ActorPoolStrategy(size=1), batch_size=2, resources={"teacher_node": 1})
        .take_all()
    )
    seen = [json.loads(r["where"]) for r in rows]
    assert len(seen) == 8
    assert all(s["resources"].get("teacher_node") == 1.0 for s in seen), seen
    assert all("student_node" not in s["resources"] for s in seen), seen


def probe_task_factory(report_dir: str):
    """The smallest TrainingTask (a linear model) whose workers record the resources Ray assigned them.

    Defined in a function so that Ray pickles it by value: workers cannot import this test module.
    """

    class ProbeTask:
        def build_model(self):
            import ray
            import torch

            ctx = ray.get_runtime_context()
            Path(report_dir, f"{ctx.get_actor_id()}.json").write_text(
                json.dumps(ctx.get_assigned_resources())
            )
            return torch.nn.Linear(4, 1)

        def collate(self, batch):
            import numpy as np
            import torch

            return {"x": torch.as_tensor(np.stack(list(batch["x"])), dtype=torch.float32)}

        def compute_loss(self, model, batch, step):
            loss = model(batch["x"]).pow(2).mean()
            return loss, {"loss": float(loss.detach())}

        def export(self, model, export_dir: str) -> None:
            Path(export_dir).mkdir(parents=True, exist_ok=True)

    return ProbeTask


def test_training_workers_hold_student_node(tmp_path: Path) -> None:
    """The project's Ray Train runner turns train.resources_per_worker into the workers' resources."""
    import ray

    reports = tmp_path / "assigned"
    reports.mkdir()
    train = TrainConfig(
        num_workers=1,
        batch_size=4,
        max_steps=2,
        warmup_steps=0,
        checkpoint_every=2,
        log_every=1,
        max_failures=0,
        resources_per_worker={"student_node": 1},
    )
    spec = LoopSpec(
        train=train,
        total_steps=2,
        rows_per_epoch=16,
        export_dir=str(tmp_path / "export"),
        metrics_dir=str(tmp_path / "metrics"),
    )
    fit(
        probe_task_factory(str(reports)),
        spec,
        run_name="placement-probe",
        storage_path=str(tmp_path / "ray"),
        datasets={"train": ray.data.from_items([{"x": [1.0, 2.0, 3.0, 4.0]}] * 16)},
    )
    assigned = [json.loads(p.read_text()) for p in reports.glob("*.json")]
    assert assigned, "no training worker reported"
    assert all(a.get("student_node") == 1.0 and "teacher_node" not in a for a in assigned), assigned


def test_resources_the_cluster_offers_pass() -> None:
    check_resources_exist({"teacher_node": 1}, what="teacher cache actors (cache.resources)")
    check_resources_exist({"student_node": 1}, what="training workers (train.resources_per_worker)")
    check_resources_exist({}, what="anything")


@pytest.mark.parametrize(
    ("resources", "what"),
    [
        ({"teacher_gpu_node": 1}, "teacher cache actors (cache.resources)"),
        ({"student_node": 1, "student_gpu_node": 1}, "training workers (train.resources_per_worker)"),
    ],
)
def test_a_resource_no_node_offers_is_a_clear_error(resources: dict[str, float], what: str) -> None:
    missing = next(name for name in resources if name.endswith("_gpu_node"))
    with pytest.raises(MoeDistillError) as info:
        check_resources_exist(resources, what=what)
    message = str(info.value)
    assert what in message and repr(missing) in message, message
    assert "teacher_node" in message and "student_node" in message, message  # what the cluster does offer
    assert f"ray start --resources '{{\"{missing}\": 1}}'" in message and "cluster.yaml" in message, message


def test_training_with_a_missing_resource_fails_before_scheduling(tmp_path: Path) -> None:
    """Without the check Ray Train would wait for a `student_gpu_node` forever."""
    import ray

    spec = LoopSpec(
        train=TrainConfig(num_workers=1, max_steps=1, resources_per_worker={"student_gpu_node": 1}),
        total_steps=1,
        rows_per_epoch=4,
        export_dir=str(tmp_path / "export"),
        metrics_dir=str(tmp_path / "metrics"),
    )
    with pytest.raises(MoeDistillError, match="student_gpu_node"):
        fit(
            probe_task_factory(str(tmp_path)),
            spec,
            run_name="never-scheduled",
            storage_path=str(tmp_path / "ray"),
            datasets={"train": ray.data.from_items([{"x": [0.0] * 4}] * 4)},
        )
