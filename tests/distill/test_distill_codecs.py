"""Training from expert-state codec caches: the MC term in the cached subspace (distill.mc_state_space) and
over the tokens a subsampled cache keeps states for, through DistillTask's collate and loss, in-process.

Caches come from a tiny real Qwen3-MoE teacher by the local executor; batches are what the Ray Dataset's
per-shard read task yields (pipeline.cache.read.reader._read_shard_batch), so no Ray cluster is started."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from support.tiny import teacher_assets, teacher_cache_spec, tiny_arch, tiny_moe

from pipeline.cache import CacheRuntime, build_teacher_cache, open_cache
from pipeline.cache.read.reader import _read_shard_batch
from pipeline.config import Config, DistillConfig
from pipeline.data.collate import distill_positions
from pipeline.distill.losses import STATE_LOSSES, mc_exploration_loss
from pipeline.distill.methods import get_method
from pipeline.distill.objective import objective_terms
from pipeline.distill.stage import _states_space, default_run_name
from pipeline.distill.student import DistillStudent
from pipeline.distill.task import DistillTask
from pipeline.errors import ConfigError
from pipeline.models.alignment import layer_pairs

D, E_T, WIDTH, E_S, RANK = 32, 8, 4, 2, 6
PAIRS = layer_pairs(4, 2)  # [(0, 1), (1, 3)]
TEACHER_LAYERS = [t for _, t in PAIRS]
FIELDS = ["expert_states", "gates", "logits"]
STUDENT_ARCH = tiny_arch(
    hidden_size=16, num_layers=2, num_experts=E_S, top_k=1, moe_intermediate_size=16, num_heads=2,
    num_kv_heads=1, max_position_embeddings=256, initializer_range=0.02,
)  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("distill_codecs")
    teacher_arch = tiny_arch(hidden_size=D, num_experts=E_T, max_position_embeddings=256)
    a = teacher_assets(root, 12, records_seed=5, vocab_size=384, arch=teacher_arch, model_seed=0)
    spec = teacher_cache_spec(
        a,
        cached_layers=tuple(TEACHER_LAYERS),
        width=WIDTH,
        logits_k=8,
        states_dtype="float16",
        max_length=150,
        states_basis_tokens=200,
    )
    runtime = CacheRuntime(batch_size=4, rows_per_shard=6, executor="local", progress=False)

    def build(**codec: Any) -> str:
        return build_teacher_cache(
            dataclasses.replace(spec, **codec), a.records, str(root / "c"), runtime
        ).path

    return {
        "tok": a.tok,
        "tok_path": a.tokenizer_path,
        "full": build(),
        "low_rank": build(states_codec="fp8", states_rank=RANK),
        "subsampled": build(states_codec="int8", states_token_fraction=0.5),
        "low_rank_subsampled": build(states_rank=RANK, states_token_fraction=0.5),
        "half_fp16": build(states_token_fraction=0.5),  # "full"'s codec, half of its tokens' states
    }


def _columns(path: str, space: str, shard_id: int = 0) -> dict[str, np.ndarray]:
    """One shard as the Ray Dataset's read task hands it to the training loop's collate."""
    return _read_shard_batch(
        {"shard_id": np.asarray([shard_id])}, path, FIELDS, E_S, TEACHER_LAYERS, states_space=space
    )


def _student(vocab: int, seed: int = 1) -> DistillStudent:
    student = tiny_moe(STUDENT_ARCH, vocab_size=vocab, seed=seed).train()
    torch.manual_seed(seed)  # the projections P initialise from the global generator
    return DistillStudent(student, [s for s, _ in PAIRS], teacher_hidden_size=D)


def _task(assets: dict[str, Any], cache: str, **distill: Any) -> DistillTask:
    config = Config(name="codecs", distill=DistillConfig(method="b-distill", **distill))
    path = assets[cache]
    return DistillTask(
        config, tokenizer_path=assets["tok_path"], pairs=PAIRS, teacher_hidden_size=D, cache_path=path
    )


def test_subspace_mc_loss_equals_the_full_loss_on_reconstructed_targets(assets: dict[str, Any]) -> None:
    cache = open_cache(assets["low_rank"])
    full = _task(assets, "low_rank").collate(_columns(cache.path, "full"))
    sub = _task(assets, "low_rank").collate(_columns(cache.path, "subspace"))
    v = cache.group_basis(E_S, TEACHER_LAYERS).v  # [P, E_S, D, q]
    assert v.shape[:3] == (len(PAIRS), E_S, D) and sub["expert_state_coeffs"].shape[-1] == v.shape[-1]
    n = full["gates"].shape[0]
    h_student = torch.randn(n, E_S, D, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for pair in range(len(PAIRS)):
        for state_loss in STATE_LOSSES:
            losses, grads = [], []
            for targets, basis in ((full["expert_states"], None), (sub["expert_state_coeffs"], v[pair])):
                loss = mc_exploration_loss(
                    full["gates"][:, pair].float(),
                    targets[:, pair],
                    h_student,
                    k=3,
                    alpha=0.2,
                    generator=torch.Generator().manual_seed(7),
                    state_loss=state_loss,
                    basis=basis,
                )
                losses.append(loss)
                grads.append(torch.autograd.grad(loss.sum(), h_student)[0])
            assert float(losses[0].detach().mean()) > 0
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_subspace_b_distill_step_matches_full_space_and_sends_finite_gradient(assets: dict[str, Any]) -> None:
    results = {}
    for space in ("full", "subspace"):
        task = _task(assets, "low_rank", mc_state_space=space)
        batch = task.collate(_columns(assets["low_rank"], space))
        assert ("expert_state_coeffs" in batch) == (space == "subspace")
        model = _student(len(assets["tok"]))
        loss, metrics = task.compute_loss(model, batch, step=0)  # same seed, step: the same MC draws
        loss.backward()
        assert torch.isfinite(loss) and metrics["loss_mc"] > 0
        for name, p in model.named_parameters():
            if "projections" in name or "experts" in name:
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert any(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if "projections" in n)
        results[space] = metrics
    assert results["subspace"]["loss_mc"] == pytest.approx(results["full"]["loss_mc"], rel=1e-5)
    assert results["subspace"]["loss"] == pytest.approx(results["full"]["loss"], rel=1e-5)


def test_subspace_is_refused_for_a_cache_without_a_basis(assets: dict[str, Any]) -> None:
    method = get_method("b-distill")
    with pytest.raises(ConfigError, match=r"cache\.states_rank"):
        _states_space(method, "subspace", open_cache(assets["subsampled"]))
    assert _states_space(method, "subspace", open_cache(assets["low_rank"])) == "subspace"
    assert _states_space(get_method("kd"), "subspace", open_cache(assets["full"])) == "full"  # no MC term
    task = _task(assets, "full", mc_state_space="subspace")  # full states in the batch, no coefficients
    batch = task.collate(_columns(assets["full"], "full"))
    with pytest.raises(ConfigError, match="mc_state_space: subspace"):
        task.compute_loss(_student(len(assets["tok"])), batch, step=0)
    names = {
        space: default_run_name(Config(name="x", distill=DistillConfig(mc_state_space=space)), "key")
        for space in ("full", "subspace")
    }
    assert names["full"] != names["subspace"]  # part of the run's settings fingerprint


def test_masked_mc_term_is_the_mean_over_the_tokens_with_states(assets: dict[str, Any]) -> None:
    task = _task(assets, "subsampled")
    columns = _columns(assets["subsampled"], "full")
    batch = task.collate(columns)
    mask = batch["expert_state_mask"]
    n, kept = int(mask.shape[0]), int(mask.sum())
    assert 0 < kept < n and batch["expert_states"].shape[0] == kept  # only the rows that carry states
    assert batch["gates"].shape[0] == n  # every other target keeps all tokens
    # One-hot teacher gates make every draw expert 0 with weight 1, so the MC term is known in closed form.
    batch["gates"] = torch.zeros_like(batch["gates"])
    batch["gates"][..., 0] = 1.0
    model = _student(len(assets["tok"]))
    token_mask = distill_positions(batch["response_mask"])
    forward = model(batch["input_ids"], batch["attention_mask"], token_mask)
    k = task.distill.k
    terms, metrics = objective_terms(
        task.method, task.distill, forward, batch, token_mask, torch.Generator().manual_seed(0)
    )
    want, over_all = 0.0, 0.0
    for pair in range(len(PAIRS)):
        h_s = forward.projected_states[pair][:, 0].detach()
        h_t = torch.zeros(n, D)
        h_t[mask] = batch["expert_states"][:, pair, 0]
        per_token = k * (h_s - h_t).pow(2).mean(-1)
        want += float(per_token[mask].sum()) / kept
        over_all += float(per_token.mean())
    assert metrics["loss_mc"] == pytest.approx(want, rel=1e-5)
    assert abs(want - over_all) > 1e-3 * want  # averaging over all tokens would be a different number
    assert metrics["state_tokens"] == kept and metrics["tokens"] == n
    assert torch.isfinite(terms["sft"]) and metrics["loss_erd"] == metrics["loss_erd"]


@pytest.mark.parametrize(("cache", "space"), [("subsampled", "full"), ("low_rank_subsampled", "subspace")])
def test_subsampled_cache_trains_end_to_end_through_the_collate(
    assets: dict[str, Any], cache: str, space: str
) -> None:
    task = _task(assets, cache, mc_state_space=space)
    model = _student(len(assets["tok"]))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    shards = [int(s["shard_id"]) for s in open_cache(assets[cache]).shards if s["num_rows"] > 0]
    for step, shard_id in enumerate(shards[:2] * 2):
        batch = task.collate(_columns(assets[cache], space, shard_id))
        loss, metrics = task.compute_loss(model, batch, step=step)
        assert torch.isfinite(loss) and 0 < metrics["state_tokens"] < metrics["tokens"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = [not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True)]
    assert sum(moved) > len(moved) // 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_subsampled_mc_term_equals_the_full_caches_on_the_same_tokens(assets: dict[str, Any]) -> None:
    """Issue 21: the MC term from a fraction-0.5 cache is the full cache's MC term restricted to the tokens
    that kept their states (the same draws: one generator, pair after pair, as the objective uses it)."""
    half = _task(assets, "half_fp16").collate(_columns(assets["half_fp16"], "full"))
    full = _task(assets, "full").collate(_columns(assets["full"], "full"))
    assert torch.equal(half["input_ids"], full["input_ids"])
    mask = half["expert_state_mask"]
    assert 0 < int(mask.sum()) < mask.shape[0]
    model = _student(len(assets["tok"]))
    token_mask = distill_positions(half["response_mask"])
    forward = model(half["input_ids"], half["attention_mask"], token_mask)
    task = _task(assets, "half_fp16")
    _, metrics = objective_terms(
        task.method, task.distill, forward, half, token_mask, torch.Generator().manual_seed(0)
    )
    generator, want = torch.Generator().manual_seed(0), 0.0
    for pair in range(len(PAIRS)):
        want += float(  # detached: a number to compare with
            mc_exploration_loss(
                full["gates"][:, pair][mask].float(),
                full["expert_states"][:, pair][mask].float(),
                forward.projected_states[pair][mask].float(),
                task.distill.k,
                task.distill.alpha,
                generator=generator,
            )
            .mean()
            .detach()
        )
    assert metrics["loss_mc"] == pytest.approx(want, rel=1e-6)
