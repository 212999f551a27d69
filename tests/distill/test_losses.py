"""Tests for pipeline.distill.losses (B-Distill contract), token_losses (sparse KD) and methods (presets)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.distill import losses as L
from pipeline.distill import token_losses as T
from pipeline.distill.methods import B_DISTILL_DEFAULTS, get_method, method_names
from pipeline.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# Layer pairs and expert mapping
# ----------------------------------------------------------------------------------------------------------


def test_layer_pairs_design_examples() -> None:
    assert L.layer_pairs(4, 2) == [(0, 1), (1, 3)]  # L_T = 2 L_S pairs 2->1, 4->2 (1-based)
    assert L.layer_pairs(28, 28) == [(i, i) for i in range(28)]
    assert L.layer_pairs(28, 14) == [(s, 2 * s + 1) for s in range(14)]
    assert L.layer_pairs(7, 1) == [(0, 6)]


def test_layer_pairs_match_one_based_definition_brute_force() -> None:
    for l_t in range(1, 41):
        for l_s in range(1, l_t + 1):
            expected = []
            for ls1 in range(1, l_s + 1):  # smallest 1-based l_T whose floor(l_T * L_S / L_T) == l_S
                lt1 = next(lt for lt in range(1, l_t + 1) if (lt * l_s) // l_t == ls1)
                expected.append((ls1 - 1, lt1 - 1))
            assert L.layer_pairs(l_t, l_s) == expected, (l_t, l_s)


@pytest.mark.parametrize("args", [(2, 4), (0, 1), (3, 0), (True, 1), (4.0, 2), (-1, 1)])
def test_layer_pairs_rejects_bad_counts(args: tuple) -> None:
    with pytest.raises(ValueError):
        L.layer_pairs(*args)


def test_expert_mapping_examples() -> None:
    assert L.expert_mapping(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert L.expert_mapping(4, 4).tolist() == [0, 1, 2, 3]
    assert L.expert_mapping(4, 1).tolist() == [0, 0, 0, 0]
    assert L.expert_mapping(6, 4).tolist() == [0, 0, 1, 2, 2, 3]  # non-divisible: groups of 2,1,2,1
    assert L.expert_mapping(8, 2).dtype == torch.long


def test_expert_mapping_is_eq6_and_balanced() -> None:
    for e_t in range(1, 33):
        for e_s in range(1, e_t + 1):
            pi = L.expert_mapping(e_t, e_s).tolist()
            # Eq. 6, 1-based: pi(j) = floor((j - 1) E_S / E_T) + 1
            assert [p + 1 for p in pi] == [math.floor((j - 1) * e_s / e_t) + 1 for j in range(1, e_t + 1)]
            sizes = [pi.count(e) for e in range(e_s)]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and pi == sorted(pi)


@pytest.mark.parametrize("args", [(2, 4), (0, 1), (4, 0), (4, True), (4, 2.0)])
def test_expert_mapping_rejects_bad_counts(args: tuple) -> None:
    with pytest.raises(ValueError):
        L.expert_mapping(*args)


# ----------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------


def test_aggregate_by_hand() -> None:
    p = torch.tensor([0.1, 0.3, 0.4, 0.2])
    h = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    assert torch.allclose(L.aggregate_gates(p, 2), torch.tensor([0.4, 0.6]))
    expected = torch.stack([(0.1 * h[0] + 0.3 * h[1]) / 0.4, (0.4 * h[2] + 0.2 * h[3]) / 0.6])
    assert torch.allclose(L.aggregate_expert_states(p, h, 2), expected)
    # identity when E_S = E_T
    assert torch.allclose(L.aggregate_expert_states(p, h, 4), h)
    # non-divisible 6 -> 4: groups {0,1}, {2}, {3,4}, {5}
    p6 = torch.tensor([0.1, 0.2, 0.3, 0.1, 0.1, 0.2])
    h6 = torch.randn(6, 3)
    assert torch.allclose(L.aggregate_gates(p6, 4), torch.tensor([0.3, 0.3, 0.2, 0.2]))
    got = L.aggregate_expert_states(p6, h6, 4)
    assert torch.allclose(got[0], (0.1 * h6[0] + 0.2 * h6[1]) / 0.3)
    assert torch.allclose(got[1], h6[2]) and torch.allclose(got[3], h6[5])


def test_aggregation_composes_8_4_2() -> None:
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 8), dim=-1)
    h = torch.randn(2, 3, 8, 5)
    p4, h4 = L.aggregate_gates(p, 4), L.aggregate_expert_states(p, h, 4)
    assert p4.shape == (2, 3, 4) and h4.shape == (2, 3, 4, 5)
    assert torch.allclose(L.aggregate_gates(p4, 2), L.aggregate_gates(p, 2), atol=1e-6)
    assert torch.allclose(L.aggregate_expert_states(p4, h4, 2), L.aggregate_expert_states(p, h, 2), atol=1e-5)


def test_mapping_composition_holds_exactly_when_student_divides_width() -> None:
    for e_t in range(1, 17):
        for w in range(1, e_t + 1):
            for e_s in range(1, w + 1):
                direct = L.expert_mapping(e_t, e_s)
                composed = L.expert_mapping(w, e_s)[L.expert_mapping(e_t, w)]
                if w % e_s == 0:
                    L.check_reaggregation(w, e_s)
                    assert torch.equal(direct, composed), (e_t, w, e_s)
                else:
                    with pytest.raises(ValueError, match="divide"):
                        L.check_reaggregation(w, e_s)
    # a case where folding via a non-multiple width would be wrong
    assert not torch.equal(L.expert_mapping(12, 4), L.expert_mapping(6, 4)[L.expert_mapping(12, 6)])


def test_aggregate_zero_mass_group_is_zero_state_without_nan() -> None:
    p = torch.tensor([[0.0, 0.0, 0.5, 0.5]], requires_grad=True)
    h = torch.randn(1, 4, 3, requires_grad=True)
    out = L.aggregate_expert_states(p, h, 2)
    assert torch.equal(out[0, 0], torch.zeros(3))
    assert torch.allclose(out[0, 1], 0.5 * h[0, 2] + 0.5 * h[0, 3])
    out.sum().backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(h.grad).all()


def test_aggregate_dtypes_and_shape_errors() -> None:
    p = torch.softmax(torch.randn(5, 8), -1)
    h = torch.randn(5, 8, 4)
    assert L.aggregate_expert_states(p.half(), h.half(), 4).dtype == torch.float16
    assert L.aggregate_expert_states(p.bfloat16(), h.bfloat16(), 4).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        L.aggregate_expert_states(p, h[:, :6], 2)
    with pytest.raises(ValueError):
        L.aggregate_expert_states(p, h[0], 2)
    with pytest.raises(ValueError):
        L.aggregate_gates(p, 16)  # more student than teacher experts


# ----------------------------------------------------------------------------------------------------------
# MC expert exploration
# ----------------------------------------------------------------------------------------------------------


def _exact_mc(p: list[float], d: list[float], k: int, alpha: float) -> float:
    """E[L] by enumerating every draw sequence of length k (Algorithm 1 with exact probabilities)."""

    def rec(probs: list[float], depth: int) -> float:
        if depth == k:
            return 0.0
        total = 0.0
        for e, pe in enumerate(probs):
            if pe == 0.0:
                continue
            damped = list(probs)
            damped[e] *= alpha
            z = sum(damped)
            total += pe * (pe * d[e] + rec([x / z for x in damped], depth + 1))
        return total

    z0 = sum(p)
    return rec([x / z0 for x in p], 0)


@pytest.mark.parametrize(("k", "alpha"), [(1, 0.2), (3, 0.2), (4, 0.5), (2, 1.0)])
def test_mc_sampler_mean_matches_exact_expectation(k: int, alpha: float) -> None:
    torch.manual_seed(1)
    e, d, reps = 4, 3, 20000
    p_tok = torch.tensor(
        [[0.7, 0.2, 0.07, 0.03], [0.25, 0.25, 0.25, 0.25], [0.0, 0.9, 0.1, 0.0]], dtype=torch.float64
    )
    ht_tok = torch.randn(3, e, d, dtype=torch.float64)
    hs_tok = torch.randn(3, e, d, dtype=torch.float64)
    dist = (hs_tok - ht_tok).pow(2).mean(-1)
    loss = L.mc_exploration_loss(
        p_tok.repeat_interleave(reps, 0),
        ht_tok.repeat_interleave(reps, 0),
        hs_tok.repeat_interleave(reps, 0),
        k,
        alpha,
        torch.Generator().manual_seed(123),
    ).view(3, reps)
    for tok in range(3):
        exact = _exact_mc(p_tok[tok].tolist(), dist[tok].tolist(), k, alpha)
        mean = loss[tok].mean().item()
        # 5 standard errors of the mean of `reps` i.i.d. per-token losses: a false failure has p < 1e-6.
        tol = 5 * loss[tok].std().item() / math.sqrt(reps) + 1e-12
        assert abs(mean - exact) <= tol, (tok, mean, exact, tol)


def test_mc_one_hot_gate_is_deterministic() -> None:
    p = torch.tensor([[0.0, 1.0, 0.0]])
    ht, hs = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    d1 = (hs[0, 1] - ht[0, 1]).pow(2).mean()
    # damping a one-hot gate and renormalising gives the same one-hot gate: K draws of expert 1, w = 1
    assert torch.allclose(L.mc_exploration_loss(p, ht, hs, 3, 0.2), 3 * d1)


def test_mc_seeded_generator_is_reproducible() -> None:
    p = torch.softmax(torch.randn(500, 6), -1)
    ht, hs = torch.randn(500, 6, 4), torch.randn(500, 6, 4)
    a = L.mc_exploration_loss(p, ht, hs, 3, 0.2, torch.Generator().manual_seed(7))
    b = L.mc_exploration_loss(p, ht, hs, 3, 0.2, torch.Generator().manual_seed(7))
    c = L.mc_exploration_loss(p, ht, hs, 3, 0.2, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (500,) and a.dtype == torch.float32


def test_mc_gradient_reaches_student_only() -> None:
    p = torch.softmax(torch.randn(8, 4), -1).requires_grad_()
    ht = torch.randn(8, 4, 5, requires_grad=True)
    hs = torch.randn(8, 4, 5, requires_grad=True)
    L.mc_exploration_loss(p, ht, hs, 3, 0.2, torch.Generator().manual_seed(0)).sum().backward()
    assert p.grad is None and ht.grad is None
    assert hs.grad is not None and hs.grad.abs().sum() > 0
    # K = 1 with a one-hot gate: d/dh_s of mean((h_s[e] - h_t[e])^2) = 2 (h_s[e] - h_t[e]) / D
    p1 = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    hs1 = torch.randn(1, 4, 5, requires_grad=True)
    ht1 = torch.randn(1, 4, 5)
    L.mc_exploration_loss(p1, ht1, hs1, 1, 0.2).sum().backward()
    expected = torch.zeros(1, 4, 5)
    expected[0, 2] = 2 * (hs1[0, 2] - ht1[0, 2]).detach() / 5
    assert torch.allclose(hs1.grad, expected)


def test_mc_bf16_states_and_empty_batch() -> None:
    p = torch.softmax(torch.randn(3, 4), -1)
    out = L.mc_exploration_loss(p, torch.randn(3, 4, 2).bfloat16(), torch.randn(3, 4, 2).bfloat16(), 2, 0.2)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    hs = torch.zeros(0, 4, 2, requires_grad=True)
    empty = L.mc_exploration_loss(torch.zeros(0, 4), torch.zeros(0, 4, 2), hs, 3, 0.2)
    assert empty.shape == (0,)


@pytest.mark.parametrize(
    ("k", "alpha", "shape_p", "shape_ht", "shape_hs"),
    [
        (0, 0.2, (2, 4), (2, 4, 3), (2, 4, 3)),
        (1.5, 0.2, (2, 4), (2, 4, 3), (2, 4, 3)),
        (True, 0.2, (2, 4), (2, 4, 3), (2, 4, 3)),
        (5, 0.0, (2, 4), (2, 4, 3), (2, 4, 3)),  # alpha = 0 cannot draw 5 distinct experts of 4
        (3, 1.5, (2, 4), (2, 4, 3), (2, 4, 3)),
        (3, float("nan"), (2, 4), (2, 4, 3), (2, 4, 3)),
        (3, 0.2, (2, 4), (2, 4, 3), (2, 4, 5)),
        (3, 0.2, (2, 5), (2, 4, 3), (2, 4, 3)),
        (3, 0.2, (2, 4, 1), (2, 4, 3), (2, 4, 3)),
    ],
)
def test_mc_validation(k, alpha, shape_p, shape_ht, shape_hs) -> None:
    p = torch.rand(shape_p)
    with pytest.raises(ValueError):
        L.mc_exploration_loss(p, torch.randn(shape_ht), torch.randn(shape_hs), k, alpha)


def test_mc_rejects_invalid_gates() -> None:
    ht, hs = torch.randn(2, 3, 2), torch.randn(2, 3, 2)
    for bad in (torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([[1.5, -0.5, 0.0]] * 2)):
        with pytest.raises(ValueError, match="non-negative"):
            L.mc_exploration_loss(bad, ht, hs, 2, 0.2)


# ----------------------------------------------------------------------------------------------------------
# ERD
# ----------------------------------------------------------------------------------------------------------


def test_erd_matches_direct_formula() -> None:
    torch.manual_seed(2)
    pt = torch.softmax(torch.randn(6, 4, dtype=torch.float64), -1)
    ps = torch.softmax(torch.randn(6, 4, dtype=torch.float64), -1)
    beta = 0.1
    kl = (pt * (pt.log() - ps.log())).sum(-1)
    ent = -(ps * ps.log()).sum(-1)
    assert torch.allclose(L.erd_loss(pt, ps, beta), kl - beta * ent)
    assert torch.allclose(
        L.erd_loss(pt.float(), ps.float(), 0.0),
        F.kl_div(ps.float().log(), pt.float(), reduction="none").sum(-1),
        atol=1e-6,
    )


def test_erd_stable_with_zeros_and_gradient() -> None:
    pt = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    ps = torch.tensor([[0.0, 1.0, 0.0, 0.0]], requires_grad=True)
    out = L.erd_loss(pt, ps, 0.1)
    assert torch.isfinite(out).all() and out.item() > 50  # KL to an underflowed gate: large, finite
    out.sum().backward()
    assert torch.isfinite(ps.grad).all()
    logits = torch.randn(4, 4, requires_grad=True)
    L.erd_loss(torch.softmax(torch.randn(4, 4), -1), torch.softmax(logits, -1), 0.1).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_erd_validation() -> None:
    p = torch.softmax(torch.randn(3, 4), -1)
    with pytest.raises(ValueError):
        L.erd_loss(p, p, -0.1)
    with pytest.raises(ValueError):
        L.erd_loss(p, p[:, :3], 0.1)
    with pytest.raises(ValueError):
        L.erd_loss(p[0], p[0], 0.1)


# ----------------------------------------------------------------------------------------------------------
# Token-level losses: dense float64 references on the (k + 1)-bin distributions
# ----------------------------------------------------------------------------------------------------------


def _ref_bins(indices, logprobs, tail, student_logits, temperature=1.0):
    """Per row: float64 (P, Q) on [valid kept entries..., tail], computed densely and independently."""
    q = torch.softmax(student_logits.double() / temperature, -1)
    rows = []
    for r in range(indices.shape[0]):
        valid = torch.isfinite(logprobs[r])
        idx = indices[r][valid].long()
        p_bins = torch.cat([logprobs[r][valid].double().exp(), tail[r : r + 1].double().exp()])
        rest = torch.ones(q.shape[1], dtype=torch.bool)
        rest[idx] = False
        q_bins = torch.cat([q[r, idx], q[r, rest].sum().view(1)])
        rows.append((p_bins, q_bins))
    return rows


def _kl(p, q):
    pos = p > 0
    return (p[pos] * (p[pos].log() - q[pos].log())).sum()


def _ref_ab(p, q, a, b):
    return -((p**a) * (q**b) - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum() / (a * b)


REFERENCES = {
    "forward_kl": (T.forward_kl, {}, lambda p, q: _kl(p, q)),
    "reverse_kl": (T.reverse_kl, {}, lambda p, q: _kl(q, p)),
    "skew_forward_kl": (T.skew_forward_kl, {"alpha": 0.1}, lambda p, q: _kl(p, 0.1 * p + 0.9 * q)),
    "skew_reverse_kl": (T.skew_reverse_kl, {"alpha": 0.1}, lambda p, q: _kl(q, 0.1 * q + 0.9 * p)),
    "generalized_jsd": (
        T.generalized_jsd,
        {"beta": 0.3},
        lambda p, q: 0.3 * _kl(p, 0.3 * p + 0.7 * q) + 0.7 * _kl(q, 0.3 * p + 0.7 * q),
    ),
    "ab_divergence": (T.ab_divergence, {}, lambda p, q: _ref_ab(p, q, 0.2, 0.7)),
    "ab_divergence_hellinger": (
        T.ab_divergence,
        {"alpha": 0.5, "beta": 0.5},
        lambda p, q: 2 * ((p.sqrt() - q.sqrt()) ** 2).sum(),
    ),
}


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return 2 * torch.randn(6, 40, generator=g), 2 * torch.randn(6, 40, generator=g)


@pytest.mark.parametrize("name", list(REFERENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_token_losses_match_dense_reference_topk(name, temperature, logits) -> None:
    fn, kwargs, ref = REFERENCES[name]
    teacher, student = logits
    ix, lp, tail = T.topk_sparsify(teacher, 7)
    got = fn(ix, lp, tail, student, temperature=temperature, **kwargs)
    want = torch.stack([ref(p, q) for p, q in _ref_bins(ix, lp, tail, student, temperature)])
    assert got.shape == (6,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5), (got, want)


@pytest.mark.parametrize("name", [n for n in REFERENCES if n != "reverse_kl"])
def test_token_losses_match_dense_reference_sampled(name, logits) -> None:
    # reverse KL is +inf on the teacher's zero-mass tail here (floored instead: tested separately)
    fn, kwargs, ref = REFERENCES[name]
    teacher, student = logits
    ix, lp, tail = T.sample_sparsify(teacher, 16, torch.Generator().manual_seed(0))
    got = fn(ix, lp, tail, student, **kwargs)
    want = torch.stack([ref(p, q) for p, q in _ref_bins(ix, lp, tail, student)])
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5), (got, want)


def _dense(name, p, q):
    return torch.stack([REFERENCES[name][2](p[r], q[r]) for r in range(p.shape[0])])


@pytest.mark.parametrize("name", list(REFERENCES))
def test_token_losses_with_k_equal_v_are_full_vocabulary_divergences(name, logits) -> None:
    fn, kwargs, _ = REFERENCES[name]
    teacher, student = logits
    ix, lp, tail = T.topk_sparsify(teacher, teacher.shape[1])
    assert torch.isneginf(tail).all()
    got = fn(ix, lp, tail, student, **kwargs)
    want = _dense(name, torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1))
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)


def test_forward_kl_k_equal_v_equals_torch_kl_div(logits) -> None:
    teacher, student = logits
    ix, lp, tail = T.topk_sparsify(teacher, teacher.shape[1])
    dense = F.kl_div(
        torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True, reduction="none"
    ).sum(-1)
    assert torch.allclose(T.forward_kl(ix, lp, tail, student), dense, atol=1e-5)


def test_padding_that_reuses_a_valid_index_is_ignored() -> None:
    student = torch.randn(1, 10)
    q = torch.softmax(student.double(), -1)[0]
    ix = torch.tensor([[3, 0, 0]])
    lp = torch.tensor([[math.log(0.5), math.log(0.5), float("-inf")]])
    tail = torch.tensor([float("-inf")])
    t_log, s_log = T.coarsened_logprobs(ix, lp, tail, student)
    assert torch.isneginf(s_log[0, 2]) and torch.isneginf(t_log[0, 2])
    assert math.isclose(s_log[0, 3].exp().item(), (1 - q[3] - q[0]).item(), rel_tol=1e-5)
    want = 0.5 * math.log(0.5 / q[3].item()) + 0.5 * math.log(0.5 / q[0].item())
    assert math.isclose(T.forward_kl(ix, lp, tail, student).item(), want, rel_tol=1e-5)


def test_student_tail_is_exact_when_kept_mass_is_nearly_one() -> None:
    # tail mass 3 e^-30 ~ 2.8e-13, far below what 1 - (kept mass) resolves in fp32
    student = torch.tensor([[30.0, 0.0, 0.0, 0.0]])
    ix, lp, tail = torch.tensor([[0]]), torch.tensor([[-1e-3]]), torch.tensor([math.log(-math.expm1(-1e-3))])
    _, s_log = T.coarsened_logprobs(ix, lp, tail, student)
    assert math.isclose(s_log[0, 1].item(), math.log(3) - 30 - math.log1p(3 * math.exp(-30)), rel_tol=1e-6)
    assert torch.isfinite(T.forward_kl(ix, lp, tail, student)).all()


@pytest.mark.parametrize("name", list(T.TOKEN_LOSSES))
@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_token_loss_gradients_match_finite_differences(name, mode) -> None:
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(3, 12, generator=g)
    student = torch.randn(3, 12, generator=g, dtype=torch.float64).requires_grad_()
    if mode == "topk":
        ix, lp, tail = T.topk_sparsify(teacher, 4)
    else:
        ix, lp, tail = T.sample_sparsify(teacher, 6, g)
    fn = T.TOKEN_LOSSES[name]
    assert torch.autograd.gradcheck(lambda s: fn(ix, lp, tail, s), (student,))


@pytest.mark.parametrize("name", list(T.TOKEN_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_losses_stable_with_extreme_logits(name, dtype) -> None:
    v = 64
    teacher = torch.zeros(4, v)
    teacher[:, 0] = 1e4  # teacher one-hot up to e^-1e4
    student = torch.zeros(4, v)
    student[0, 5] = 1e4  # student confidently wrong
    student[1, 0] = 1e4  # student confidently right
    student[2] = torch.linspace(-6e4, 6e4, v)  # huge spread (fits fp16 range)
    student = student.to(dtype).requires_grad_()
    fn = T.TOKEN_LOSSES[name]
    targets = [
        T.topk_sparsify(teacher, 8),
        T.topk_sparsify(teacher, v),
        T.sample_sparsify(teacher, 8, torch.Generator().manual_seed(0)),
    ]
    for ix, lp, tail in targets:
        out = fn(ix, lp, tail, student)
        assert torch.isfinite(out).all() and (out > -1e-4).all(), out
        (grad,) = torch.autograd.grad(out.sum(), student)
        assert torch.isfinite(grad).all()


def test_reverse_kl_floors_zero_teacher_bins() -> None:
    teacher, student = torch.randn(2, 20), torch.randn(2, 20)
    ix, lp, tail = T.sample_sparsify(teacher, 4, torch.Generator().manual_seed(0))
    out = T.reverse_kl(ix, lp, tail, student)
    bins = _ref_bins(ix, lp, tail, student)
    floor = math.exp(T.DEFAULT_TEACHER_LOG_FLOOR)
    want = torch.stack([_kl(q, p.clamp_min(floor)) for p, q in bins])
    assert torch.isfinite(out).all() and torch.allclose(out.double(), want, rtol=1e-4)


def test_ab_divergence_special_and_limit_cases(logits) -> None:
    teacher, student = logits
    student64 = student.double()  # fp64 logits -> fp64 computation, so limits can be checked tightly
    ix, lp, tail = T.topk_sparsify(teacher, 7)
    ab = lambda a, b: T.ab_divergence(ix, lp, tail, student64, alpha=a, beta=b)  # noqa: E731
    assert torch.allclose(ab(1.0, 0.0), T.forward_kl(ix, lp, tail, student64), atol=1e-10)
    assert torch.allclose(ab(0.0, 1.0), T.reverse_kl(ix, lp, tail, student64), atol=1e-10)
    eps = 1e-5
    limits = [((0.0, 0.7), (eps, 0.7)), ((0.5, 0.0), (0.5, eps)), ((0.0, 0.0), (eps, eps))]
    for (a, b), (a_eps, b_eps) in limits:
        assert torch.allclose(ab(a, b), ab(a_eps, b_eps), rtol=1e-3), (a, b)
    # a = b = 0 by hand: 1/2 sum (log p - log q)^2
    bins = _ref_bins(ix, lp, tail, student64)
    want = torch.stack([0.5 * ((p.log() - q.log()) ** 2).sum() for p, q in bins])
    assert torch.allclose(ab(0.0, 0.0), want, rtol=1e-8)
    with pytest.raises(ValueError, match="alpha >= 0"):
        ab(0.5, -0.5)


def test_sft_loss_is_cross_entropy_with_ignore_index() -> None:
    logits = torch.randn(5, 11)
    targets = torch.tensor([1, 2, -100, 4, 10])
    out = T.sft_loss(logits, targets)
    assert torch.allclose(out, F.cross_entropy(logits, targets, reduction="none"))
    assert out[2] == 0
    assert T.sft_loss(logits.bfloat16(), targets).dtype == torch.float32
    with pytest.raises(ValueError):
        T.sft_loss(logits, targets[:3])


@pytest.mark.parametrize(
    ("fn", "kwargs"),
    [
        (T.skew_forward_kl, {"alpha": 0.0}),
        (T.skew_forward_kl, {"alpha": 1.0}),
        (T.skew_reverse_kl, {"alpha": 1.2}),
        (T.generalized_jsd, {"beta": 0.0}),
        (T.generalized_jsd, {"beta": 1.0}),
        (T.forward_kl, {"temperature": 0.0}),
        (T.ab_divergence, {"alpha": float("nan")}),
        (T.ab_divergence, {"beta": -0.1}),
    ],
)
def test_token_loss_hyperparameter_validation(fn, kwargs, logits) -> None:
    teacher, student = logits
    with pytest.raises(ValueError):
        fn(*T.topk_sparsify(teacher, 4), student, **kwargs)


def test_token_loss_shape_validation(logits) -> None:
    teacher, student = logits
    ix, lp, tail = T.topk_sparsify(teacher, 4)
    with pytest.raises(ValueError):
        T.forward_kl(ix, lp[:, :3], tail, student)
    with pytest.raises(ValueError):
        T.forward_kl(ix, lp, tail[:3], student)
    with pytest.raises(ValueError):
        T.forward_kl(ix.float(), lp, tail, student)
    with pytest.raises(ValueError):
        T.forward_kl(ix[:3], lp[:3], tail[:3], student)
    # int32 indices straight from the cache are fine
    assert torch.allclose(
        T.forward_kl(ix.int(), lp.half(), tail, student), T.forward_kl(ix, lp.half().float(), tail, student)
    )


# ----------------------------------------------------------------------------------------------------------
# Sparsification helpers
# ----------------------------------------------------------------------------------------------------------


def test_topk_sparsify(logits) -> None:
    teacher, _ = logits
    ix, lp, tail = T.topk_sparsify(teacher, 5)
    assert ix.shape == lp.shape == (6, 5) and ix.dtype == torch.long and lp.dtype == torch.float32
    p = torch.softmax(teacher.double(), -1)
    assert torch.allclose(lp.double().exp(), p.gather(1, ix), rtol=1e-5)
    assert torch.allclose(tail.double().exp(), 1 - p.gather(1, ix).sum(-1), rtol=1e-5)
    T.check_sparse_targets(ix, lp, tail, teacher.shape[1])
    with pytest.raises(ValueError):
        T.topk_sparsify(teacher, 0)
    with pytest.raises(ValueError):
        T.topk_sparsify(teacher, 41)


def test_sample_sparsify_weights_and_padding() -> None:
    teacher = torch.randn(50, 30)
    ix, lp, tail = T.sample_sparsify(teacher, 12, torch.Generator().manual_seed(1))
    assert ix.shape == lp.shape == (50, 12) and torch.isneginf(tail).all()
    assert torch.allclose(lp.exp().sum(-1), torch.ones(50))
    pad = torch.isneginf(lp)
    assert (ix[pad] == 0).all() and pad.any()
    counts = torch.round(lp.exp() * 12)
    assert torch.allclose(counts, lp.exp() * 12, atol=1e-5)  # weights are count / n
    T.check_sparse_targets(ix, lp, tail, 30)
    again = T.sample_sparsify(teacher, 12, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip((ix, lp), again[:2], strict=True))
    # a one-hot teacher samples the same token every time: one entry with weight 1, the rest padding
    peaked = torch.full((1, 30), -1e4)
    peaked[0, 17] = 0
    ix1, lp1, _ = T.sample_sparsify(peaked, 5)
    assert ix1[0, 0] == 17 and lp1[0, 0] == 0 and torch.isneginf(lp1[0, 1:]).all()


def test_sampled_forward_kl_cross_entropy_is_unbiased() -> None:
    g = torch.Generator().manual_seed(4)
    v, n, reps = 30, 8, 20000
    teacher, student = torch.randn(1, v, generator=g), torch.randn(1, v, generator=g)
    ix, lp, tail = T.sample_sparsify(teacher.expand(reps, v), n, g)
    p_hat = lp.exp()
    entropy_hat = -(p_hat * lp.masked_fill(torch.isneginf(lp), 0)).sum(-1)
    ce_hat = (T.forward_kl(ix, lp, tail, student.expand(reps, v)) + entropy_hat).double()
    exact = -(torch.softmax(teacher.double(), -1) * torch.log_softmax(student.double(), -1)).sum()
    tol = 5 * ce_hat.std().item() / math.sqrt(reps)  # 5 standard errors
    assert abs(ce_hat.mean().item() - exact.item()) <= tol


def test_check_sparse_targets_rejects_bad_rows() -> None:
    ix = torch.tensor([[1, 1, 0]])
    lp = torch.tensor([[math.log(0.5), math.log(0.5), float("-inf")]])
    tail = torch.tensor([float("-inf")])
    with pytest.raises(ValueError, match="repeats"):
        T.check_sparse_targets(ix, lp, tail, 5)
    with pytest.raises(ValueError, match="indices must lie"):
        T.check_sparse_targets(torch.tensor([[1, 7, 0]]), lp, tail, 5)
    with pytest.raises(ValueError, match="mass"):
        T.check_sparse_targets(torch.tensor([[1, 2, 0]]), lp, torch.tensor([0.0]), 5)
    T.check_sparse_targets(torch.tensor([[1, 2, 0]]), lp, tail, 5)  # padding may repeat index 0


# ----------------------------------------------------------------------------------------------------------
# Method registry
# ----------------------------------------------------------------------------------------------------------


# B-Distill presets beyond the paper's ablations (tests/distill/test_bdistill_presets.py covers them).
VARIANTS = (
    "b-distill-official",
    "b-distill-relative",
    "b-distill-cosine",
    "b-distill-experts",
    "b-distill-mc-warmup",
    "b-distill-alpha0",
    "b-distill-stable",
)


def test_method_registry_presets(logits) -> None:
    expected = {
        "sft",
        "kd",
        "seqkd",
        "distillm",
        "gkd",
        "abkd",
        "b-distill",
        "b-distill-no-mc",
        "b-distill-no-erd",
        "moe-kd",
        *VARIANTS,
    }
    assert set(method_names()) == expected
    teacher, student = logits
    sparse = T.topk_sparsify(teacher, 4)
    for name in method_names():
        spec = get_method(name)
        assert spec.name == name and spec.source and spec.deviation
        if spec.token_loss is not None:
            out = T.TOKEN_LOSSES[spec.token_loss](*sparse, student, **spec.token_loss_kwargs)
            assert out.shape == (6,) and torch.isfinite(out).all()
    flags = {n: (get_method(n).uses_mc, get_method(n).uses_erd) for n in method_names() if "b-distill" in n}
    assert flags == {
        "b-distill": (True, True),
        "b-distill-no-mc": (False, True),
        "b-distill-no-erd": (True, False),
        **dict.fromkeys(VARIANTS, (True, True)),
    }
    assert get_method("b-distill").token_loss == "forward_kl" and get_method("b-distill").uses_sft
    assert get_method("distillm").token_loss_kwargs == {"alpha": 0.1}
    assert get_method("gkd").token_loss_kwargs == {"beta": 0.5} and "on-policy" in get_method("gkd").deviation
    assert get_method("seqkd").uses_teacher_responses and get_method("seqkd").token_loss is None
    assert get_method("sft").token_loss is None and not get_method("sft").uses_teacher_responses
    d = B_DISTILL_DEFAULTS
    assert (d.mc_k, d.mc_alpha, d.erd_beta, d.lambda_mc, d.lambda_erd) == (3, 0.2, 0.1, 1.0, 1.0)


def test_get_method_returns_copies_and_unknown_names_fail() -> None:
    get_method("abkd").token_loss_kwargs["alpha"] = 99.0
    assert get_method("abkd").token_loss_kwargs["alpha"] == T.DEFAULT_AB_ALPHA
    with pytest.raises(ConfigError, match="b-distill-no-erd"):
        get_method("minillm")


def test_losses_module_reexports_token_losses() -> None:
    for name in (
        "forward_kl",
        "reverse_kl",
        "skew_forward_kl",
        "skew_reverse_kl",
        "generalized_jsd",
        "ab_divergence",
        "sft_loss",
        "topk_sparsify",
        "sample_sparsify",
    ):
        assert getattr(L, name) is getattr(T, name)
    assert list(itertools.islice(L.TOKEN_LOSSES, 1)) == ["forward_kl"]
