"""pipeline.teacher_service on a real local Ray cluster: a pool of tiny Qwen3-MoE teachers on `teacher_node`.

One service for the module (2 teacher actors, at most 2 requests admitted at once); its scores are compared
with a cache built in-process by the cache stage from the same teacher and spec.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch
from support.tiny import teacher_assets, teacher_cache_spec, tiny_arch

from pipeline.cache import CacheRuntime, build_teacher_cache, open_cache
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.placement import check_separate_gpus
from pipeline.teacher_service import TeacherServiceConfig, plan_batches, start_teacher_service

NUM_RECORDS, WIDTH, LAYERS, K = 12, 4, (0, 2), 8
MAX_IN_FLIGHT = 2


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny teacher and its cache (local executor: the cache stage's own per-shard code)."""
    root = tmp_path_factory.mktemp("service")
    arch = tiny_arch(num_layers=3)
    a = teacher_assets(root, NUM_RECORDS, records_seed=5, vocab_size=320, arch=arch, model_seed=1)
    spec = teacher_cache_spec(
        a,
        cached_layers=LAYERS,
        width=WIDTH,
        logits_k=K,
        states_dtype="float16",
        max_length=256,
        store_expert_states=False,
    )
    runtime = CacheRuntime(batch_size=3, rows_per_shard=6, executor="local", progress=False)
    cache = open_cache(build_teacher_cache(spec, a.records, str(root / "caches"), runtime).path)
    examples = [ex for s in cache.shards for ex in cache.read_shard(s["shard_id"], {"logits", "gates"})]
    return {"spec": spec, "examples": examples, "path": cache.path, "tok": a.tokenizer_path, "root": root}


@pytest.fixture(scope="module")
def service(ray_cluster: None, cached: dict[str, Any]) -> Any:
    config = TeacherServiceConfig(
        num_actors=2,
        num_cpus_per_actor=0.25,  # leaves a whole CPU of the 2 to the training test's Ray Data read tasks
        resources={"teacher_node": 0.5},
        max_batch_sequences=4,
        max_wait_s=0.02,
        max_in_flight=MAX_IN_FLIGHT,
    )
    svc = start_teacher_service(cached["spec"], WIDTH, config)
    yield svc
    svc.shutdown()


def _request(ex: dict[str, Any]) -> dict[str, Any]:
    """Only token ids travel: what a student worker sends for one sequence."""
    return {
        "seq_id": int(ex["seq_id"]),
        "input_ids": ex["input_ids"].tolist(),
        "response_mask": ex["response_mask"].tolist(),
    }


def _assert_matches_cache(served: dict[str, np.ndarray], cached: dict[str, Any]) -> None:
    # Same code, other batch composition (padding): equal up to float rounding, then fp16 storage rounding.
    assert served["logit_values"].dtype == np.float16 and served["gates"].dtype == np.float16
    np.testing.assert_array_equal(served["logit_indices"], cached["logit_indices"])
    np.testing.assert_allclose(served["logit_values"].astype(np.float32), cached["logit_values"], rtol=2e-3)
    np.testing.assert_allclose(served["logit_tail_logmass"], cached["logit_tail_logmass"], rtol=1e-4)
    np.testing.assert_allclose(served["gates"].astype(np.float32), cached["gates"], rtol=2e-3, atol=1e-4)


# --- pure parts ------------------------------------------------------------------------------------------
def test_plan_batches_groups_by_length_within_bounds() -> None:
    lengths = [5, 40, 7, 38, 6, 41, 100]
    batches = plan_batches(lengths, max_sequences=3, max_tokens=130)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    # longest first; 100 alone (2 x 100 > 130), the ~40s together, the short ones together
    assert batches == [[6], [5, 1, 3], [2, 4, 0]]
    assert all(len(b) * max(lengths[i] for i in b) <= 130 or len(b) == 1 for b in batches)
    assert plan_batches([300], 4, 100) == [[0]]


def test_placement_refuses_a_shared_gpu() -> None:
    fractional = TrainConfig(use_gpu=True, resources_per_worker={"GPU": 0.5, "student_node": 1})
    with pytest.raises(ConfigError, match="share GPU memory"):
        check_separate_gpus(0.5, {"teacher_node": 1}, fractional)
    # a GPU node offering both sides' resources: refused; separate node groups: allowed
    both = [{"GPU": 1, "teacher_node": 1, "student_node": 1}]
    with pytest.raises(ConfigError):
        check_separate_gpus(0.5, {"teacher_node": 1}, fractional, nodes=both)
    apart = [{"GPU": 1, "teacher_node": 1}, {"GPU": 1, "student_node": 1}]
    check_separate_gpus(0.5, {"teacher_node": 1}, fractional, nodes=apart)
    # whole GPUs on either side are exclusive devices in Ray: never shared
    check_separate_gpus(1, {"teacher_node": 1}, fractional)
    check_separate_gpus(0.5, {}, TrainConfig(use_gpu=True))


# --- the service -----------------------------------------------------------------------------------------
def test_served_scores_equal_cached_targets(service: Any, cached: dict[str, Any]) -> None:
    examples = cached["examples"]
    served: dict[int, dict[str, np.ndarray]] = {}

    def student(part: list[dict[str, Any]]) -> None:  # one student worker: its own client
        client = service.client(max_pending=2)
        refs = [client.submit([_request(ex)]) for ex in part]
        import ray

        for ex, ref in zip(part, refs, strict=True):
            served[int(ex["seq_id"])] = ray.get(ref)[0]

    workers = [threading.Thread(target=student, args=(examples[i::2],)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(served) == sorted(int(ex["seq_id"]) for ex in examples)
    for ex in examples:
        _assert_matches_cache(served[int(ex["seq_id"])], ex)
    stats = service.stats()
    assert stats["sequences"] >= len(examples) and stats["scored_tokens"] > 0
    # requests from both students were batched together, and the counters are consistent
    assert stats["sequences_per_batch"] > 1 and stats["batches"] < stats["sequences"]
    assert 0 < stats["padding_efficiency"] <= 1 and 0 < stats["utilisation"] <= 1
    assert stats["scored_tokens_per_s"] > 0 and stats["in_flight"] == 0


def test_backpressure_bounds_in_flight_requests(service: Any, cached: dict[str, Any]) -> None:
    import ray

    reqs = [[_request(ex)] for ex in cached["examples"][:8]]
    # The client side: a third submit blocks until one of the first two is answered.
    client = service.client(max_pending=2)
    first = [client.submit(r) for r in reqs[:2]]
    client.submit(reqs[2])
    assert ray.wait(first, num_returns=1, timeout=0)[0], "submit did not wait for a pending request"
    # The service side: many requests at once are admitted at most MAX_IN_FLIGHT at a time.
    wide = service.client(max_pending=len(reqs))
    ray.get([wide.submit(r) for r in reqs])
    stats = service.stats()
    assert stats["peak_in_flight"] <= MAX_IN_FLIGHT
    assert stats["peak_waiting"] >= 1  # the bound was reached: requests waited for admission


def _student_gkd_steps(
    client: Any, prompts: list[list[int]], teacher_path: str, steps: int
) -> dict[str, Any]:
    """A student worker (Ray task on student_node): generate, send token ids, GKD steps on served targets."""
    from pipeline.data.collate import distill_positions, pad_batch
    from pipeline.distill.onpolicy import SparseTargets, generated_examples, gkd_loss
    from pipeline.models.build import load_causal_lm
    from pipeline.models.generate import generate_token_ids

    torch.manual_seed(0)
    student = load_causal_lm(teacher_path)  # same vocabulary; perturbed so it differs from the teacher
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.05 * torch.randn_like(param))
    eos, pad = student.config.eos_token_id, student.config.pad_token_id
    responses = generate_token_ids(
        student, prompts, max_new_tokens=6, pad_id=pad, eos_id=eos, greedy=False, seed=1
    )
    examples = generated_examples(prompts, responses, list(range(len(prompts))), eos, pad)
    served = client.score(examples)  # only token ids travel
    targets = SparseTargets.from_rows(served)
    batch = pad_batch(examples, pad)
    mask = distill_positions(batch["response_mask"])
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    student.train()
    losses = []
    for _ in range(steps):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = gkd_loss(targets, logits[mask].float(), beta=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return {"examples": examples, "served": served, "losses": losses, "rows": int(mask.sum())}


def test_on_policy_gkd_steps_with_served_targets(service: Any, cached: dict[str, Any]) -> None:
    import ray

    from pipeline.cache.build.teacher import TeacherOutputSpec, score_sequences, to_storage
    from pipeline.data.collate import pad_batch
    from pipeline.models.adapter import MoEAdapter
    from pipeline.models.build import load_causal_lm

    prompts = [
        ex["input_ids"][: int(np.argmax(ex["response_mask"]))].tolist() for ex in cached["examples"][:4]
    ]
    # the worker cannot import this test module: ship the function by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    task = ray.remote(_student_gkd_steps).options(num_cpus=0.5, resources={"student_node": 0.5})
    out = ray.get(task.remote(service.client(), prompts, cached["spec"].teacher_path, 4), timeout=300)
    assert out["rows"] == sum(len(r["logit_tail_logmass"]) for r in out["served"]) > 0
    assert out["losses"][-1] < out["losses"][0]  # the student moves toward the teacher on its own samples
    # the served targets for student samples are the cache stage's scoring of those sequences
    teacher = load_causal_lm(cached["spec"].teacher_path)
    spec = TeacherOutputSpec.from_spec(cached["spec"], WIDTH)
    for ex, served in zip(out["examples"], out["served"], strict=True):
        batch = pad_batch([ex], teacher.config.pad_token_id)
        direct = score_sequences(MoEAdapter(teacher), batch, spec, [ex["seq_id"]])
        np.testing.assert_array_equal(
            served["logit_indices"], to_storage("logit_indices", direct["logit_indices"], "float16")
        )
        np.testing.assert_allclose(
            served["logit_values"].astype(np.float32),
            to_storage("logit_values", direct["logit_values"], "float16").astype(np.float32),
            rtol=2e-3,
        )


def test_killed_teacher_actor_is_replaced_and_requests_complete(service: Any, cached: dict[str, Any]) -> None:
    import ray

    examples = cached["examples"]
    victim = service.scorers[0]
    before = ray.get(victim.ping.remote())
    client = service.client(max_pending=len(examples))
    refs = [client.submit([_request(ex)]) for ex in examples]
    time.sleep(0.05)  # some batches are computing, others queued
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    assert len(done) < len(refs), "every request finished before the kill: not mid-run"
    ray.kill(victim, no_restart=False)
    for ex, ref in zip(examples, refs, strict=True):
        _assert_matches_cache(ray.get(ref, timeout=120)[0], ex)
    assert ray.get(victim.ping.remote(), timeout=120) != before  # a new process holds the teacher
    ray.get([client.submit([_request(ex)]) for ex in examples[:4]])  # the replacement takes work again
    stats = service.stats()
    print("teacher service stats:", stats)
    assert stats["actor_restarts"] >= 1


def _student_rows(cached: dict[str, Any], examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A student's own sparse distribution at the examples' positions (a perturbed teacher here)."""
    from pipeline.cache.build.sparsify import topk_sparsify
    from pipeline.data.collate import distill_positions, pad_batch
    from pipeline.models.build import load_causal_lm

    torch.manual_seed(0)
    student = load_causal_lm(cached["spec"].teacher_path)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.2 * torch.randn_like(param))
        batch = pad_batch(examples, 0)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = logits[distill_positions(batch["response_mask"])]
    ind, val, tail = topk_sparsify(rows, K)
    counts = [int(sum(ex["response_mask"][1:])) for ex in examples]
    return [
        {"logit_indices": i.numpy(), "logit_values": v.numpy(), "logit_tail_logmass": t.numpy()}
        for i, v, t in zip(ind.split(counts), val.split(counts), tail.split(counts), strict=True)
    ]


def test_sar_router_steps_change_only_the_routers(cached: dict[str, Any]) -> None:
    """In-process scorer (the actor class itself): SAR steps on student samples train the routers only."""
    from pipeline.distill.token_losses import reverse_kl
    from pipeline.teacher_service import TeacherScorer

    scorer = TeacherScorer(cached["spec"], WIDTH, 0.0, cpu_threads=1)
    model = scorer.stage.adapter.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    examples = [_request(ex) for ex in cached["examples"][:4]]
    plain_scores = scorer.score(examples)["results"]
    student_rows = _student_rows(cached, examples)
    losses = [scorer.router_step(examples, student_rows, reverse_kl, lr=0.05) for _ in range(5)]
    assert losses[-1] < losses[0]  # the teacher moved toward the student
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.endswith("mlp.gate.weight") for name in changed)
    assert len(changed) == scorer.stage.adapter.num_layers  # every router, nothing else
    # the student now distils from the updated (densely routed) teacher
    updated = scorer.score(examples)["results"]
    assert not np.array_equal(updated[0]["logit_values"], plain_scores[0]["logit_values"])


def test_sar_through_the_service_keeps_replicas_identical(service: Any, cached: dict[str, Any]) -> None:
    """Last in the module: it changes the service's teachers."""
    import ray

    from pipeline.distill.token_losses import reverse_kl

    examples = [_request(ex) for ex in cached["examples"][:4]]
    student_rows = _student_rows(cached, examples)
    first = service.router_step(examples, student_rows, reverse_kl, lr=0.05)
    again = service.router_step(examples, student_rows, reverse_kl, lr=0.05)
    assert len(first) == 2 and first[0] == first[1] and again[0] < first[0]
    a, b = (ray.get(s.score.remote(examples[:1]))["results"][0] for s in service.scorers)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])  # both replicas took the same steps
    assert not np.array_equal(a["logit_values"].astype(np.float32), cached["examples"][0]["logit_values"])
