"""B-Distill presets: the released code's router terms against a hand-computed example, and the presets'
definitions."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from support.paths import CONFIGS
from support.tiny import (
    OBJECTIVE_EXPERTS,
    OBJECTIVE_STUDENT_ARCH,
    OBJECTIVE_VOCAB,
    TEACHER_HIDDEN,
    objective_student,
    teacher_assets,
    teacher_cache_spec,
    tiny_arch,
)

from pipeline.config import DistillConfig, load_config, with_overrides
from pipeline.data.collate import distill_positions
from pipeline.distill import losses as L
from pipeline.distill import token_losses as T
from pipeline.distill.diagnostics import term_gradient_metrics
from pipeline.distill.methods import get_method, method_for, method_names, resolved_distill
from pipeline.distill.objective import distill_objective, lambda_mc_at, objective_terms
from pipeline.distill.stage import cache_fields_for, default_run_name, run_settings
from pipeline.distill.student import DistillStudent, StudentForward
from pipeline.errors import ConfigError
from pipeline.run_identity import settings_fingerprint
from pipeline.sweep import load_sweep, plan_runs

DEMO, STUDY = CONFIGS / "demo.yaml", CONFIGS / "demo-bdistill-study.yaml"

# Two tokens, two experts. One-hot teacher gates make every draw deterministic: token 0 always draws expert 0
# and token 1 expert 1, each with weight 1 (damping a one-hot gate and renormalising leaves it one-hot).
P_T = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
P_S = torch.tensor([[0.8, 0.2], [0.4, 0.6]])


def test_router_mc_by_hand() -> None:
    ce, coverage = L.router_mc_loss(P_T, P_S, 3, 0.5)
    # sum w * (-log p^S[e]) / sum w = (3 * -log 0.8 + 3 * -log 0.6) / 6
    assert ce.item() == pytest.approx((-math.log(0.8) - math.log(0.6)) / 2, rel=1e-6)
    # usage: teacher (3, 3) -> (0.5, 0.5); student (3 * 0.8, 3 * 0.6) -> (4/7, 3/7); KL / E with E = 2
    kl = 0.5 * math.log(0.5 / (4 / 7)) + 0.5 * math.log(0.5 / (3 / 7))
    assert coverage.item() == pytest.approx(kl / 2, rel=1e-5)


def test_router_mc_gradient_reaches_the_student_gate_only() -> None:
    logits = torch.randn(5, 4, requires_grad=True)
    p_t = torch.softmax(torch.randn(5, 4), -1).requires_grad_()
    ce, coverage = L.router_mc_loss(p_t, torch.softmax(logits, -1), 3, 0.5, torch.Generator().manual_seed(0))
    (ce + 0.5 * coverage).backward()
    assert p_t.grad is None and logits.grad is not None and logits.grad.abs().sum() > 0


def test_double_softmax_erd_by_hand() -> None:
    beta, sequences = 0.1, 1
    loss = L.double_softmax_erd_loss(P_T, P_S, beta, num_sequences=sequences)

    def softmax(row: list[float]) -> list[float]:
        z = [math.exp(x) for x in row]
        return [x / sum(z) for x in z]

    kl, entropy = 0.0, 0.0
    for t_row, s_row in zip(P_T.tolist(), P_S.tolist(), strict=True):
        a_t, a_s = softmax(t_row), softmax(s_row)  # softmax of probabilities: the released double softmax
        kl += sum(t * math.log(t / s) for t, s in zip(a_t, a_s, strict=True))
        entropy += -sum(s * math.log(s) for s in a_s)
    expected = kl / sequences - beta * entropy / 2  # KL summed / sequences; entropy averaged over tokens
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the KL part is divided by the number of sequences, not tokens
    two = L.double_softmax_erd_loss(P_T, P_S, 0.0, num_sequences=2)
    assert two.item() == pytest.approx(kl / 2, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The objective: switches and the official preset
# ----------------------------------------------------------------------------------------------------------

VOCAB, EXPERTS = OBJECTIVE_VOCAB, OBJECTIVE_EXPERTS


@pytest.fixture(scope="module")
def student() -> DistillStudent:
    return objective_student()


def _batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    response = torch.zeros_like(input_ids)
    response[:, 4:] = 1
    token_mask = distill_positions(response)
    n = int(token_mask.sum())
    teacher = torch.log_softmax(torch.randn(n, VOCAB, generator=g), -1)
    indices, values, tail = T.topk_sparsify(teacher, 8)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "response_mask": response,
        "logit_indices": indices,
        "logit_values": values,
        "logit_tail_logmass": tail,
        "gates": torch.softmax(torch.randn(n, 2, EXPERTS, generator=g), -1),
        "expert_states": torch.randn(n, 2, EXPERTS, TEACHER_HIDDEN, generator=g),
    }
    return batch, token_mask


def _terms(student: DistillStudent, distill: DistillConfig, step: int = 0, **forward_kw):
    batch, token_mask = _batch()
    method = method_for(distill)
    resolved = resolved_distill(distill)
    forward = student(batch["input_ids"], batch["attention_mask"], token_mask, **forward_kw)
    return objective_terms(
        method, resolved, forward, batch, token_mask, torch.Generator().manual_seed(1), step
    )


def test_experts_scope_mc_trains_only_experts_and_projections() -> None:
    # top-2 routing: with top-1 and renormalised weights every routing weight is exactly 1, so the routers'
    # MC gradient in the "model" scope would be float rounding (~1e-13) and its sign a matter of luck
    student = objective_student(dataclasses.replace(OBJECTIVE_STUDENT_ARCH, top_k=2))
    for scope, detach in (("model", False), ("experts", True)):
        terms, _ = _terms(student, DistillConfig(mc_grad_scope=scope), detach_expert_inputs=detach)
        metrics = term_gradient_metrics(student, terms)
        norm = {g: metrics[f"grad/mc/{g}/norm"] for g in ("embeddings", "attention", "routers", "norms")}
        if scope == "experts":
            assert all(v == 0.0 for v in norm.values()), norm
        else:
            assert all(v > 1e-6 for v in norm.values()), norm
        assert metrics["grad/mc/experts/norm"] > 0 and metrics["grad/mc/projections/norm"] > 0
        assert metrics["grad/erd/routers/norm"] > 0  # ERD keeps its full graph under either scope


def test_stable_preset_is_the_study_choice_cosine_distance() -> None:
    stable = resolved_distill(DistillConfig(method="b-distill-stable"))
    assert (stable.mc_grad_scope, stable.mc_state_loss) == ("model", "cosine")
    cosine = resolved_distill(DistillConfig(method="b-distill-cosine"))
    assert dataclasses.replace(stable, method="b-distill-cosine") == cosine  # the same settings


def test_lambda_mc_warmup_ramp(student: DistillStudent) -> None:
    d = DistillConfig(lambda_mc=2.0, lambda_mc_warmup_steps=4)
    assert [lambda_mc_at(d, s) for s in (0, 1, 2, 4, 10)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    assert lambda_mc_at(DistillConfig(lambda_mc=0.3), 0) == 0.3  # no ramp by default
    terms, metrics = _terms(student, d, step=1)
    assert metrics["lambda_mc"] == 0.5
    assert terms["mc"].item() == pytest.approx(0.5 * metrics["loss_mc"], rel=1e-6)
    assert terms["erd"].item() == pytest.approx(metrics["loss_erd"], rel=1e-6)  # lambda_erd = 1


def test_state_loss_switch_reaches_the_mc_term(student: DistillStudent) -> None:
    batch, token_mask = _batch()
    with torch.no_grad():
        forward = student(batch["input_ids"], batch["attention_mask"], token_mask)
    _, metrics = objective_terms(
        get_method("b-distill"), DistillConfig(mc_state_loss="relative"), forward, batch, token_mask,
        torch.Generator().manual_seed(1),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)  # the same draws, in the same order: pair 0 then pair 1
    expected = sum(
        L.mc_exploration_loss(batch["gates"][:, p], batch["expert_states"][:, p],
                              forward.projected_states[p], 3, 0.2, g, state_loss="relative").mean()
        for p in range(2)
    )  # fmt: skip
    assert metrics["loss_mc"] == pytest.approx(float(expected), rel=1e-6)


def test_official_objective_by_hand() -> None:
    """Two tokens, full-vocabulary teacher (k = V, no tail), one-hot teacher gates on the last pair."""
    logits = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.5, 0.5, 0.0]]], requires_grad=True)
    token_mask = torch.tensor([[True, True, False]])
    input_ids = torch.tensor([[0, 1, 2]])  # next tokens of the two positions: 1, 2
    teacher = torch.log_softmax(torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]), -1)
    router = torch.log(P_S).requires_grad_()
    forward = StudentForward(
        logits=logits,
        router_probs=[torch.softmax(torch.zeros(2, 2), -1), torch.softmax(router, -1)],  # pair 0 unused
        projected_states=[],
    )
    batch = {
        "input_ids": input_ids,
        "logit_indices": torch.arange(3).repeat(2, 1),
        "logit_values": teacher,
        "logit_tail_logmass": torch.full((2,), float("-inf")),
        "gates": torch.stack([torch.full((2, 2), 0.5), P_T], dim=1),  # [N, pairs, E]
    }
    distill = resolved_distill(DistillConfig(method="b-distill-official"))
    assert (distill.k, distill.alpha, distill.beta) == (3, 0.5, 0.1)
    total, metrics = distill_objective(
        get_method("b-distill-official"),
        distill,
        forward,
        batch,
        token_mask,
        torch.Generator().manual_seed(0),
    )
    student_logp = torch.log_softmax(logits[0, :2].detach(), -1)
    sft = -(student_logp[0, 1] + student_logp[1, 2]).item() / 2
    kl = (teacher.exp() * (teacher - student_logp)).sum(-1).mean().item()
    ce = (-math.log(0.8) - math.log(0.6)) / 2  # as in test_router_mc_by_hand
    coverage = (0.5 * math.log(0.5 / (4 / 7)) + 0.5 * math.log(0.5 / (3 / 7))) / 2
    erd = L.double_softmax_erd_loss(P_T, P_S, 0.1, num_sequences=1).item()  # checked by hand above
    assert metrics["loss_sft"] == pytest.approx(sft, rel=1e-5)
    assert metrics["loss_forward_kl"] == pytest.approx(kl, rel=1e-5)
    assert metrics["loss_router_mc"] == pytest.approx(ce, rel=1e-5)
    assert metrics["loss_coverage_kl"] == pytest.approx(coverage, rel=1e-4)
    assert metrics["loss_released_erd"] == pytest.approx(erd, rel=1e-5)
    expected = 0.8 * sft + 0.1 * kl + 0.1 * (ce + 0.5 * coverage + erd)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert router.grad is not None and router.grad.abs().sum() > 0  # gradients on, unlike the release


def test_presets_definitions() -> None:
    base = get_method("b-distill")
    assert base.settings == {} and base.formulas == "paper" and base.needs_expert_states
    assert resolved_distill(DistillConfig()) == DistillConfig()  # b-distill unchanged: the paper
    official = get_method("b-distill-official")
    assert not official.needs_expert_states and official.formulas == "released"
    assert cache_fields_for(official) == {"logits", "gates"}
    assert cache_fields_for(base) == {"logits", "gates", "expert_states"}
    assert "does NOT beat kd" in get_method("b-distill-stable").deviation
    for name in method_names():
        spec = get_method(name)
        assert spec.source and spec.deviation, name
    with pytest.raises(ConfigError, match=r"fixes distill\.mc_state_loss = 'cosine'.*sets 'relative'"):
        resolved_distill(DistillConfig(method="b-distill-stable", mc_state_loss="relative"))


# ----------------------------------------------------------------------------------------------------------
# Config switches and the run fingerprint
# ----------------------------------------------------------------------------------------------------------


def test_config_accepts_alpha_zero_and_validates_switches() -> None:
    config = load_config(DEMO)
    assert with_overrides(config, {"distill.alpha": 0.0}).distill.alpha == 0.0
    for bad in ({"distill.alpha": -0.1}, {"distill.lambda_mc_warmup_steps": -1},
                {"distill.mc_state_loss": "huber"}, {"distill.mc_grad_scope": "routers"}):  # fmt: skip
        with pytest.raises(ConfigError):
            with_overrides(config, bad)


def test_switches_are_in_the_fingerprint_and_diagnostics_is_not() -> None:
    config = load_config(DEMO)

    def fingerprint(overrides: dict) -> str:
        return settings_fingerprint(run_settings(with_overrides(config, overrides), "cache-key"))

    base = fingerprint({})
    for switch in ({"distill.mc_state_loss": "cosine"}, {"distill.mc_grad_scope": "experts"},
                   {"distill.lambda_mc_warmup_steps": 10}, {"distill.alpha": 0.0}):  # fmt: skip
        assert fingerprint(switch) != base, switch
    assert fingerprint({"distill.diagnostics": True}) == base
    # a preset's fixed settings are part of what is hashed
    stable = run_settings(with_overrides(config, {"distill.method": "b-distill-stable"}), "k")
    assert stable["distill"]["mc_state_loss"] == "cosine" and stable["distill"]["mc_grad_scope"] == "model"
    assert "-a0-" in default_run_name(with_overrides(config, {"distill.method": "b-distill-alpha0"}), "k")
    # an on-policy preset's loss settings too: changing them (e.g. MiniLLM's whitening) never reuses a run
    minillm = run_settings(with_overrides(config, {"distill.method": "minillm"}), "k")
    assert minillm["on_policy"]["loss_kwargs"] == {"mix_alpha": 0.0, "whiten": True}
    assert "on_policy" not in run_settings(config, "k")


def test_study_sweep_loads_with_three_seeds_per_method() -> None:
    sweep = load_sweep(STUDY)
    _, runs = plan_runs(sweep)
    methods = sweep.grid["distill.method"]
    assert {"sft", "kd", "b-distill", "b-distill-no-mc", "b-distill-no-erd", "b-distill-official"} <= set(
        methods
    )
    assert all(m in method_names() for m in methods)
    assert sweep.grid["distill.train.seed"] == [0, 1, 2]
    assert all(r.distill.diagnostics for r in runs)
    # every method from random weights, 3 seeds each
    by_init: dict[str, set[tuple[str, int]]] = {}
    for r in runs:
        by_init.setdefault(r.student.init, set()).add((r.distill.method, r.distill.train.seed))
    assert by_init["random"] == {(m, s) for m in methods for s in (0, 1, 2)}
    # every method from the upcycled student too, but b-distill-cosine (the same settings as b-distill-stable)
    assert by_init["upcycle"] == {(m, s) for m in methods if m != "b-distill-cosine" for s in (0, 1, 2)}
    assert len(runs) == sum(len(v) for v in by_init.values())
    names = {default_run_name(r, "k") for r in runs}
    assert len(names) == len(runs)  # every run its own directory


# ----------------------------------------------------------------------------------------------------------
# b-distill-official trains from a cache built without expert states
# ----------------------------------------------------------------------------------------------------------


def test_official_trains_from_a_gates_only_cache(tmp_path: Path) -> None:
    import numpy as np

    from pipeline.cache import CacheRuntime, build_teacher_cache, open_cache
    from pipeline.config import ArchitectureConfig, Config, ModelConfig
    from pipeline.distill.task import DistillTask
    from pipeline.errors import CacheError

    arch = tiny_arch(num_experts=4, max_position_embeddings=256, initializer_range=0.02)
    a = teacher_assets(tmp_path, 8, records_seed=0, vocab_size=300, arch=arch, model_seed=0)
    spec = teacher_cache_spec(
        a, cached_layers=(1, 3), width=None, logits_k=8, states_dtype="float16", max_length=256,
        store_expert_states=False,
    )  # fmt: skip
    runtime = CacheRuntime(batch_size=4, rows_per_shard=8, executor="local", progress=False)
    cache = open_cache(build_teacher_cache(spec, a.records, str(tmp_path / "caches"), runtime).path)
    official = get_method("b-distill-official")
    fields, pairs = cache_fields_for(official), [(0, 1), (1, 3)]
    cache.check_student(fields=fields, num_student_experts=2, teacher_layers_needed=[1, 3])
    with pytest.raises(CacheError, match="built without them"):
        cache.check_student(fields=cache_fields_for(get_method("b-distill")))
    rows = cache.read_shard(0, fields, num_student_experts=2, teacher_layers=[1, 3])

    def column(values: list) -> np.ndarray:  # Ray Data's ragged column: an object array of arrays
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    student = ArchitectureConfig(
        hidden_size=32, num_layers=2, num_experts=2, top_k=1, moe_intermediate_size=32, num_heads=4,
        num_kv_heads=2, head_dim=8,
    )  # fmt: skip
    config = Config(
        name="official",
        student=ModelConfig(build=student),
        distill=DistillConfig(method="b-distill-official"),
    )
    task = DistillTask(config, tokenizer_path=a.tokenizer_path, pairs=pairs, teacher_hidden_size=32)
    batch = task.collate({k: column([r[k] for r in rows]) for k in rows[0]})
    assert "gates" in batch and "expert_states" not in batch
    model = task.build_model()
    token_mask = distill_positions(batch["response_mask"])
    forward = model(batch["input_ids"], batch["attention_mask"], token_mask, with_experts=False)
    total, metrics = distill_objective(
        official, task.distill, forward, batch, token_mask, torch.Generator().manual_seed(0)
    )
    total.backward()
    assert math.isfinite(total.item())
    assert {"loss_router_mc", "loss_coverage_kl", "loss_released_erd"} <= set(metrics)
    last_router = model.student.model.layers[1].mlp.gate.weight
    assert last_router.grad is not None and last_router.grad.abs().sum() > 0
