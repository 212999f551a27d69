"""SAR (distill.method=sar) as a distillation run: one OnPolicyTask step against a real in-process
TeacherScorer (the teacher's routers change, nothing else does, and the student trains on the updated
teacher's targets), then one short run_distill through the teacher service on the session's cluster (the
module's copy of the shared fine-tuned tiny teacher).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from support.inprocess_teacher import InProcessClient
from support.tiny import teacher_service_run

from pipeline.cache import open_cache
from pipeline.cache.stage import locate_cache
from pipeline.config import Config, DistillConfig, with_overrides
from pipeline.data.stage import prepare_data
from pipeline.distill import onpolicy
from pipeline.distill.methods import ON_POLICY_METHODS, on_policy_method
from pipeline.distill.onpolicy_task import OnPolicyTask
from pipeline.distill.stage import run_distill
from pipeline.models.alignment import layer_pairs

STEPS = 2


# The shared 2-CPU cluster of conftest.py on purpose: the teacher service and the student worker get logical
# CPU shares (pipeline.placement.small_cluster_cpu_share) so Ray Data keeps one; whole CPUs would hang here.


@pytest.fixture(scope="module")
def config(tiny_workspace: Config) -> Config:
    """The module's copy of the shared fine-tuned tiny teacher and its cache, with SAR's student settings."""
    return teacher_service_run(tiny_workspace, "sar", STEPS)


def test_sar_is_a_registered_on_policy_preset_with_its_source() -> None:
    spec = ON_POLICY_METHODS["sar"]
    assert on_policy_method(DistillConfig(method="sar")) is spec  # wired: nothing missing
    assert "Every Expert Matters" in spec.source and "Student-Aware Router" in spec.source
    assert spec.base == "kd" and "rank 0" in spec.deviation and spec.data
    assert getattr(onpolicy, spec.loss).__name__ == "reverse_kl"  # the router step's objective


def test_sar_step_trains_the_teacher_routers_only_and_the_student_on_their_targets(config: Config) -> None:
    prepared = prepare_data(config)
    cache = open_cache(locate_cache(config))
    client = InProcessClient(config)
    task = OnPolicyTask(
        config,
        tokenizer_path=prepared.tokenizer_path,
        pairs=layer_pairs(int(cache.manifest["teacher"]["num_layers"]), 1),
        teacher_hidden_size=cache.hidden_size,
        client=client,
        total_steps=STEPS,
    )
    teacher = client.scorer.stage.adapter.model
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    rows = cache.read_shard(cache.shards[0]["shard_id"], {"logits"})[:4]
    batch = task.collate({k: [r[k] for r in rows] for k in rows[0]})
    torch.manual_seed(0)
    model = task.build_model()
    loss, parts = task.compute_loss(model, batch, 0)
    loss.backward()
    assert math.isfinite(parts["sar_loss"]) and parts["sar_loss"] > 0
    assert {"loss_sft", "loss_forward_kl"} <= set(parts)  # the base preset kd's terms
    assert any(bool(p.grad.abs().sum() > 0) for p in model.student.parameters() if p.grad is not None)
    changed = {name for name, p in teacher.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.endswith("mlp.gate.weight") for name in changed)
    assert len(changed) == client.scorer.stage.adapter.num_layers  # every router, nothing else
    # the student's targets are the updated, densely routed teacher's, not the cached ones
    served = torch.cat([torch.from_numpy(r["logit_values"]).float() for r in client.served])
    assert served.shape == batch["logit_values"].shape
    assert not torch.allclose(served, batch["logit_values"].float(), atol=1e-3)


def test_sar_distillation_run_finishes_and_records_its_router_losses(config: Config) -> None:
    # the student in-process: the subject is the service's router steps (test_onpolicy_distill.py runs
    # an on-policy student on a Ray Train worker)
    result = run_distill(with_overrides(config, {"distill.train.num_workers": 0}))
    run_dir = Path(result.export_dir).parent
    metrics = [json.loads(line) for line in (run_dir / "metrics" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m["sar_loss"]) and m["sar_loss"] > 0 and m["tokens"] > 0 for m in metrics)
    assert all(math.isfinite(m["loss_forward_kl"]) for m in metrics)
    print("sar_loss per step:", [m["sar_loss"] for m in metrics])
    assert not result.skipped and result.method == "sar" and result.run_name.startswith("sar-")
    assert result.val_loss > 0 and (Path(result.export_dir) / "config.json").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "sar"
    stats = summary["teacher_service"]
    assert stats["requests"] >= STEPS and stats["scored_tokens"] > 0  # every step's targets were served
