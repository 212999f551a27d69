"""Placement on a local cluster with the launcher's custom resources (conftest's `ray_cluster`: 2 CPUs, one
`teacher_node` and one `student_node`): the project's own stages -- the teacher cache stage, evaluation and
Ray Train -- run holding the resource their config asks for, and a resource no node offers fails at once with
a readable error instead of a job that waits forever for a node that never comes.

Which resources an actor held is read from the GCS actor table after the stage (`resource_mapping`: what the
raylet granted it; the public state API would need the dashboard, which these clusters run without).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from support.paths import TINY

from pipeline.config import TrainConfig, load_config, with_overrides
from pipeline.errors import MoeDistillError
from pipeline.placement import AUTOSCALED_RESOURCES_ENV, check_placement
from pipeline.training.loop import LoopSpec
from pipeline.training.runner import fit

# A fresh cluster: the actor table must hold only this module's actors.
pytestmark = pytest.mark.usefixtures("private_ray_cluster")


def actors_of(class_fragment: str) -> list[dict[str, Any]]:
    """Every actor of this cluster (alive or dead) whose class name contains `class_fragment`, with the
    resources it asked for and the resources the raylet granted it. Ray Data names its actor pool's class
    `MapWorker(MapBatches(<the callable class>))`."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    found = []
    for raw in state._connect_and_get_accessor().get_actor_table(None, None):
        actor = gcs_pb2.ActorTableData.FromString(raw)
        if class_fragment in actor.class_name:
            held: dict[str, float] = {}
            for entry in actor.resource_mapping:
                held[entry.name] = held.get(entry.name, 0.0) + sum(r.quantity for r in entry.resource_ids)
            found.append(
                {"class": actor.class_name, "required": dict(actor.required_resources), "held": held}
            )
    return found


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    """tests/configs/tiny.yaml, smaller, pinned like the paper presets: the cache to `teacher_node`,
    evaluation to `student_node`; its 'fine-tuned' teacher is a freshly built tiny MoE (no training)."""
    from pipeline.data.stage import load_tokenizer, prepare_data
    from pipeline.models.build import TinyMoEConfig, build_tiny_moe
    from pipeline.models.export import EXPORT_MARKER
    from pipeline.workspace import paths_for

    root = tmp_path_factory.mktemp("placement")
    config = with_overrides(
        load_config(TINY),
        {
            "output_dir": str(root / "run"),
            "data.num_demo_records": 80,
            "cache.root": str(root / "caches"),
            "cache.resources": {"teacher_node": 1},
            "evaluate.resources": {"student_node": 1},
            "evaluate.num_seeds": 1,
            "evaluate.max_examples": 4,
            "evaluate.heldout_examples": 0,  # the test split alone: this test is about placement
            "evaluate.max_new_tokens": 4,
        },
    )
    prepared = prepare_data(config)
    tok = load_tokenizer(prepared.tokenizer_path)
    arch = TinyMoEConfig(**dataclasses.asdict(config.teacher.build))
    teacher = build_tiny_moe(arch, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, seed=0)
    final = paths_for(config).teacher_final
    teacher.save_pretrained(final)
    (final / EXPORT_MARKER).write_text(json.dumps({"stage": "finetune-teacher"}))
    return config, final


def test_cache_stage_actors_hold_teacher_node(workspace) -> None:
    """pipeline.cache.stage.run_cache with cache.resources={"teacher_node": 1}: each teacher actor held it."""
    from pipeline.cache.format.manifest import read_manifest
    from pipeline.cache.stage import run_cache

    config, _ = workspace
    info = run_cache(config)
    assert info.status == "built" and info.num_tokens > 0
    assert read_manifest(info.path)["complete"] is True
    teachers = actors_of("TeacherShardStage")
    assert teachers, "no teacher cache actor ran"
    for actor in teachers:
        assert actor["required"].get("teacher_node") == 1.0, actor
        assert actor["held"].get("teacher_node") == 1.0 and "student_node" not in actor["held"], actor


def test_evaluation_actors_hold_student_node(workspace) -> None:
    """pipeline.evaluate.stage.run_evaluate with evaluate.resources={"student_node": 1}."""
    from pipeline.evaluate.stage import run_evaluate

    config, teacher = workspace
    results = run_evaluate(config, models={"teacher": str(teacher)}, progress=False)
    assert [(r["model"], r["num_examples"]) for r in results.rows] == [("teacher", 4)]
    generators = actors_of("GeneratorActor")
    assert generators, "no evaluation actor ran"
    for actor in generators:
        assert actor["required"].get("student_node") == 1.0, actor
        assert actor["held"].get("student_node") == 1.0 and "teacher_node" not in actor["held"], actor


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


def test_resources_the_cluster_offers_pass(capsys: pytest.CaptureFixture[str]) -> None:
    check_placement({"teacher_node": 1}, what="teacher cache actors (cache.resources)")
    check_placement({"student_node": 1}, what="training workers (train.resources_per_worker)")
    check_placement({}, what="anything")
    assert "autoscaler" not in capsys.readouterr().out


def test_a_resource_only_the_autoscaler_offers_waits_for_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A GPU group scaled to zero: absent from the live cluster, declared by the autoscaler (here the env)."""
    monkeypatch.setenv(AUTOSCALED_RESOURCES_ENV, "gpu_group_node")
    check_placement({"gpu_group_node": 1}, what="training workers (train.resources_per_worker)")
    lines = [line for line in capsys.readouterr().out.splitlines() if "autoscaler" in line]
    assert len(lines) == 1 and "gpu_group_node" in lines[0] and "waiting for the autoscaler" in lines[0]


@pytest.mark.parametrize(
    ("resources", "what"),
    [
        ({"teacher_gpu_node": 1}, "teacher cache actors (cache.resources)"),
        ({"student_node": 1, "student_gpu_node": 1}, "training workers (train.resources_per_worker)"),
    ],
)
def test_a_resource_no_node_offers_is_a_clear_error(
    resources: dict[str, float], what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(AUTOSCALED_RESOURCES_ENV, raising=False)
    missing = next(name for name in resources if name.endswith("_gpu_node"))
    with pytest.raises(MoeDistillError) as info:
        check_placement(resources, what=what)
    message = str(info.value)
    assert what in message and repr(missing) in message, message
    assert "teacher_node" in message and "student_node" in message, message  # what the cluster does offer
    assert f"ray start --resources '{{\"{missing}\": 1}}'" in message and "cluster.yaml" in message, message
    assert AUTOSCALED_RESOURCES_ENV in message, message


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


def test_evaluation_with_a_missing_resource_fails_before_scheduling(workspace) -> None:
    from pipeline.evaluate.stage import run_evaluate

    config, teacher = workspace
    # another protocol (max_new_tokens), so the teacher's earlier results are not simply reused
    config = with_overrides(
        config, {"evaluate.resources": {"student_gpu_node": 1}, "evaluate.max_new_tokens": 3}
    )
    with pytest.raises(MoeDistillError, match=r"evaluation actors \(evaluate.resources\).*student_gpu_node"):
        run_evaluate(config, models={"teacher": str(teacher)}, progress=False)
