"""On-policy methods through the distill stage: run_distill starts the teacher service on teacher_node, trains
with OnPolicyTask on student_node, stops the service and records its counters; a teacher actor killed
mid-run is replaced and the run finishes every step (a real Ray Train worker); distillm-sgo's run trains
in-process (its subject is the validation hook). Single OnPolicyTask steps (imitkd, minillm) use a real
in-process TeacherScorer. The session's cluster (2 CPUs: the service and the worker get logical CPU shares,
pipeline.placement.small_cluster_cpu_share) and the module's copy of the shared fine-tuned tiny teacher.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support.inprocess_teacher import InProcessClient
from support.tiny import teacher_service_run

from pipeline.cache import open_cache
from pipeline.cache.stage import locate_cache
from pipeline.config import Config, with_overrides
from pipeline.data.stage import load_tokenizer, prepare_data
from pipeline.data.tokenize import tokenize_records
from pipeline.distill.methods import ON_POLICY_METHODS
from pipeline.distill.onpolicy_task import OnPolicyTask
from pipeline.distill.stage import default_run_name, run_distill
from pipeline.errors import ConfigError
from pipeline.models.alignment import layer_pairs
from pipeline.teacher_service.service import TEACHER_FAIL_AT_BATCH_ENV
from pipeline.training.loop import load_training_state

STEPS = 2


@pytest.fixture(scope="module")
def config(tiny_workspace: Config) -> Config:
    """The module's copy of the shared teacher (its cache holds greedy teacher responses: distillm-2's
    teacher side), with the on-policy student settings."""
    return teacher_service_run(tiny_workspace, "gkd-on-policy", STEPS)


def _cached_batch(config: Config, task: OnPolicyTask, n: int = 4) -> dict[str, torch.Tensor]:
    cache = open_cache(locate_cache(config))
    rows = cache.read_shard(cache.shards[0]["shard_id"], {"logits", "teacher_responses"})[:n]
    return task.collate({k: [r[k] for r in rows] for k in rows[0]})


def _task(config: Config, method: str, total: int, client: InProcessClient, **kwargs: Any) -> OnPolicyTask:
    cfg = with_overrides(config, {"distill.method": method})
    prepared = prepare_data(cfg)
    cache = open_cache(locate_cache(cfg))
    return OnPolicyTask(
        cfg,
        tokenizer_path=prepared.tokenizer_path,
        pairs=layer_pairs(int(cache.manifest["teacher"]["num_layers"]), 1),
        teacher_hidden_size=cache.hidden_size,
        client=client,
        total_steps=total,
        max_new_tokens=8,
        **kwargs,
    )


def _step(config: Config, method: str, step: int, total: int, client: InProcessClient) -> dict[str, float]:
    task = _task(config, method, total, client)
    torch.manual_seed(0)
    model = task.build_model()
    loss, parts = task.compute_loss(model, _cached_batch(task.config, task), step)
    loss.backward()
    grads = [p.grad for p in model.student.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and any(bool(g.abs().sum() > 0) for g in grads)
    return parts


def test_imitkd_mixes_dataset_and_student_rows_by_its_schedule(config: Config) -> None:
    client = InProcessClient(config)
    first = _step(config, "imitkd", step=0, total=10, client=client)
    assert first["on_policy"] == 0.0 and client.sequences == 0  # beta_0 = 1: cached targets only
    last = _step(config, "imitkd", step=10, total=10, client=client)
    assert last["on_policy"] == 1.0 and client.sequences > 0  # beta = 0: the student's own samples


def test_minillm_trains_on_served_targets_of_student_samples(config: Config) -> None:
    client = InProcessClient(config)
    parts = _step(config, "minillm", step=0, total=STEPS, client=client)
    assert parts["on_policy"] == 1.0 and parts["tokens"] > 0 and client.sequences > 0


def test_distillm2_trains_on_both_teacher_and_student_responses(config: Config) -> None:
    client = InProcessClient(config)
    parts = _step(config, "distillm-2", step=0, total=STEPS, client=client)
    # every prompt's teacher response and the student's own sample went to the teacher
    assert client.sequences >= 5 and parts["tokens"] > 0


def test_unwired_on_policy_methods_are_refused_naming_what_is_missing(config: Config) -> None:
    for name, spec in ON_POLICY_METHODS.items():
        if spec.missing:
            with pytest.raises(ConfigError, match="cannot run yet") as err:
                run_distill(with_overrides(config, {"distill.method": name}))
            assert spec.missing in str(err.value)
    wired = {n for n, s in ON_POLICY_METHODS.items() if not s.missing}
    assert wired >= {"gkd-on-policy", "imitkd", "minillm", "distillm-2", "distillm-sgo"}


def _validation_split(config: Config) -> list[dict[str, Any]]:
    prepared = prepare_data(config)
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    return tokenize_records(tokenizer, prepared.splits.validation, config.data.max_length)[0]


def test_distillm_sgo_validation_hook_raises_the_schedule_and_its_state_survives_a_checkpoint(
    config: Config, tmp_path: Path
) -> None:
    client = InProcessClient(config)
    with pytest.raises(ConfigError, match="validation examples"):
        _task(config, "distillm-sgo", total=20, client=client)
    task = _task(
        config, "distillm-sgo", total=20, client=client, validation_examples=_validation_split(config)
    )
    assert task.validation_every == 2  # 10 validations in 20 steps
    torch.manual_seed(0)
    model = task.build_model()
    val = task.validation_loss(model)
    assert val > 0
    model.train()  # as the loop does after validating
    assert task.on_validation(val, 2) == {} and task.sgo_schedule.prob == 0.0  # the first: nothing to compare
    task.on_validation(val + 0.5, 4)
    assert task.sgo_schedule.prob == pytest.approx(0.1)  # the loss rose: +0.1
    task.on_validation(val, 6)
    assert task.sgo_schedule.prob == pytest.approx(0.1)  # it fell: unchanged
    batch = _cached_batch(task.config, task)
    parts = task.compute_loss(model, batch, 0)[1]
    assert parts["sgo_prob"] == pytest.approx(0.1) and "replayed" in parts
    task.sgo_schedule.prob = 1.0  # every batch the student's: fresh samples, then reused ones
    sources = [task.compute_loss(model, batch, step)[1] for step in range(1, 6)]
    assert all(p["on_policy"] == 1.0 for p in sources) and client.sequences > 0
    assert {p["replayed"] for p in sources} == {0.0, 1.0} and len(task.replay) > 0
    # the hook's state travels in a checkpoint (loaded as the loop does: weights_only) and comes back whole
    torch.save({"task": [task.task_state()]}, tmp_path / "state.pt")
    restored = _task(config, "distillm-sgo", 20, client, validation_examples=task.validation_examples)
    restored.load_task_state(load_training_state(tmp_path / "state.pt")["task"][0])
    assert restored.sgo_schedule == task.sgo_schedule and len(restored.replay) == len(task.replay)
    drawn, again = restored.replay.sample(2), task.replay.sample(2)  # same items, same draws
    assert [example for example, _ in drawn] == [example for example, _ in again]
    assert all(torch.equal(a, b) for (_, x), (_, y) in zip(drawn, again) for a, b in zip(x, y, strict=True))


def test_distillm_sgo_run_validates_during_training_and_logs_its_schedule(config: Config) -> None:
    steps = 4  # validation every step (total_steps // 10 rounds up to 1)
    cfg = with_overrides(
        config,
        {
            "distill.method": "distillm-sgo",
            "distill.train.max_steps": steps,
            "distill.train.checkpoint_every": 2,
            "distill.train.num_workers": 0,  # in-process student; the teacher service is Ray's as always
        },
    )
    result = run_distill(cfg)
    metrics = [
        json.loads(line) for line in (Path(result.export_dir).parent / "metrics" / "metrics.jsonl").open()
    ]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert result.method == "distillm-sgo" and result.val_loss > 0
    # each step drew with the probability the validations after earlier steps decided: +0.1 per rise, from 0
    vals = [m["val_loss"] for m in metrics]
    for i, m in enumerate(metrics):
        rises = sum(vals[j] > vals[j - 1] for j in range(1, i))
        assert m["sgo_prob"] == pytest.approx(min(0.1 * rises, 0.5))
    # the loop measured what the stage reports: the last validation is the finished student's loss
    assert vals[-1] == pytest.approx(result.val_loss, rel=1e-4)


def test_on_policy_run_survives_a_killed_teacher_and_is_reused(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the teacher actor's process dies while scoring step 2's samples (after step 1 trained): mid-run
    monkeypatch.setenv(TEACHER_FAIL_AT_BATCH_ENV, "2")
    result = run_distill(config)
    monkeypatch.delenv(TEACHER_FAIL_AT_BATCH_ENV)
    run_dir = Path(result.export_dir).parent
    metrics = [json.loads(line) for line in (run_dir / "metrics" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # every step, none repeated or lost
    assert all(m["on_policy"] == 1.0 and m["tokens"] > 0 for m in metrics)
    assert not result.skipped and result.method == "gkd-on-policy" and result.val_loss > 0
    assert (Path(result.export_dir) / "config.json").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    stats = summary["teacher_service"]
    assert stats["requests"] >= STEPS and stats["sequences"] > 0 and stats["scored_tokens"] > 0
    assert stats["actor_restarts"] == 1  # the killed actor was replaced, and the replacement answered
    assert 0 < stats["padding_efficiency"] <= 1 and stats["in_flight"] == 0
    # identified like other runs: its own fingerprinted name, apart from the off-policy gkd preset's
    assert result.run_name.startswith("gkd-on-policy-")
    cache_key = open_cache(result.cache_path).key
    assert result.run_name != default_run_name(with_overrides(config, {"distill.method": "gkd"}), cache_key)
    again = run_distill(config)  # the finished run is reused: no service, no training
    assert again.skipped and again.run_name == result.run_name and again.teacher_service == stats
