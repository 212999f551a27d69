"""MC exploration variants: per-draw state distances (mse / relative / cosine) and alpha = 0 (sampling without
replacement), against hand-computed values and the exact expectation over every draw path."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.distill import losses as L

# One token, two experts; a one-hot gate on expert 1 makes every draw expert 1 with weight 1.
H_S = torch.tensor([[[9.0, 9.0], [1.0, 2.0]]])
H_T = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
ONE_HOT = torch.tensor([[0.0, 1.0]])


@pytest.mark.parametrize(
    ("state_loss", "per_draw"),
    [
        ("mse", 5.0 / 2),  # ||(1, 2) - (2, 0)||^2 / D = 5 / 2
        ("relative", 5.0 / 4),  # ||(-1, 2)||^2 / ||(2, 0)||^2
        ("cosine", 1.0 - 2.0 / (math.sqrt(5.0) * 2.0)),  # 1 - <(1,2),(2,0)> / (|(1,2)| |(2,0)|)
    ],
)
def test_state_loss_by_hand_on_a_one_hot_gate(state_loss: str, per_draw: float) -> None:
    loss = L.mc_exploration_loss(ONE_HOT, H_T, H_S, 3, 0.2, state_loss=state_loss)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(3 * per_draw, rel=1e-6)


def test_default_is_mse_and_draws_do_not_depend_on_the_distance() -> None:
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(50, 4), -1)
    ht, hs = torch.randn(50, 4, 6), torch.randn(50, 4, 6)

    def run(**kw) -> torch.Tensor:
        return L.mc_exploration_loss(p, ht, hs, 3, 0.2, torch.Generator().manual_seed(5), **kw)

    assert torch.equal(run(), run(state_loss="mse"))
    experts, weights = L.mc_draws(p, 3, 0.2, torch.Generator().manual_seed(5))
    rel = (hs - ht).pow(2).sum(-1) / ht.pow(2).sum(-1)  # [N, E] by the definition
    cos = 1 - (hs * ht).sum(-1) / (hs.norm(dim=-1) * ht.norm(dim=-1))
    for name, dist in (("relative", rel), ("cosine", cos)):
        expected = (weights * dist.gather(1, experts)).sum(-1)
        assert torch.allclose(run(state_loss=name), expected, atol=1e-5), name


def test_relative_and_cosine_scale_invariance() -> None:
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(20, 4), -1)
    ht, hs = torch.randn(20, 4, 5), torch.randn(20, 4, 5)

    def run(h_t: torch.Tensor, h_s: torch.Tensor, state_loss: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        return L.mc_exploration_loss(p, h_t, h_s, 2, 0.5, g, state_loss=state_loss)

    # relative: invariant to scaling both states; cosine: invariant to scaling the student state alone
    assert torch.allclose(run(7 * ht, 7 * hs, "relative"), run(ht, hs, "relative"), rtol=1e-5)
    assert torch.allclose(run(ht, 3 * hs, "cosine"), run(ht, hs, "cosine"), atol=1e-6)
    assert not torch.allclose(run(ht, 3 * hs, "mse"), run(ht, hs, "mse"))


def test_variant_gradients_reach_the_student_only() -> None:
    p = torch.softmax(torch.randn(6, 4), -1)
    ht = torch.randn(6, 4, 3, requires_grad=True)
    for state_loss in L.STATE_LOSSES:
        hs = torch.randn(6, 4, 3, requires_grad=True)
        L.mc_exploration_loss(p, ht, hs, 3, 0.2, state_loss=state_loss).sum().backward()
        assert hs.grad is not None and torch.isfinite(hs.grad).all() and hs.grad.abs().sum() > 0
    assert ht.grad is None


def test_unknown_state_loss_is_refused() -> None:
    with pytest.raises(ValueError, match=r"distill\.mc_state_loss"):
        L.mc_exploration_loss(ONE_HOT, H_T, H_S, 1, 0.2, state_loss="huber")


# ----------------------------------------------------------------------------------------------------------
# alpha = 0: sampling without replacement
# ----------------------------------------------------------------------------------------------------------


def _exact_without_replacement(p: list[float], d: list[float], k: int) -> float:
    """E[sum_t w_t d(e_t)] over every ordered path of K distinct experts, each path with probability
    prod_t p[e_t] / (1 - mass drawn before t), and w_t equal to that same conditional probability."""
    z = sum(p)
    p = [x / z for x in p]
    total = 0.0
    for path in itertools.permutations(range(len(p)), k):
        prob, loss, used = 1.0, 0.0, 0.0
        for e in path:
            w = p[e] / (1.0 - used)
            prob *= w
            loss += w * d[e]
            used += p[e]
        total += prob * loss
    return total


def test_two_experts_alpha0_by_hand() -> None:
    # K = 2 over two experts draws both: path (0, 1) has loss p0 d0 + 1 * d1, path (1, 0) p1 d1 + d0.
    p = torch.tensor([[0.3, 0.7]])
    ht = torch.zeros(1, 2, 1)
    hs = torch.tensor([[[1.0], [2.0]]])  # mse distances d = (1, 4)
    loss = L.mc_exploration_loss(
        p.repeat(4000, 1), ht.repeat(4000, 1, 1), hs.repeat(4000, 1, 1), 2, 0.0,
        torch.Generator().manual_seed(0), allow_without_replacement=True,
    )  # fmt: skip
    values = sorted(torch.unique(loss.round(decimals=5)).tolist())
    assert values == pytest.approx(sorted([0.3 * 1 + 4.0, 0.7 * 4 + 1.0]))
    exact = 0.3 * (0.3 * 1 + 4) + 0.7 * (0.7 * 4 + 1)
    assert exact == pytest.approx(_exact_without_replacement([0.3, 0.7], [1.0, 4.0], 2))
    assert abs(loss.mean().item() - exact) < 5 * loss.std().item() / math.sqrt(4000)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_alpha0_mean_matches_exact_expectation_over_all_paths(k: int) -> None:
    torch.manual_seed(2)
    reps = 20000
    p_tok = torch.tensor([[0.6, 0.25, 0.1, 0.05], [0.0, 0.5, 0.3, 0.2]], dtype=torch.float64)
    ht = torch.randn(2, 4, 3, dtype=torch.float64)
    hs = torch.randn(2, 4, 3, dtype=torch.float64)
    dist = (hs - ht).pow(2).mean(-1)
    loss = L.mc_exploration_loss(
        p_tok.repeat_interleave(reps, 0), ht.repeat_interleave(reps, 0), hs.repeat_interleave(reps, 0),
        k, 0.0, torch.Generator().manual_seed(11), allow_without_replacement=True,
    ).view(2, reps)  # fmt: skip
    for tok in range(2):
        exact = _exact_without_replacement(p_tok[tok].tolist(), dist[tok].tolist(), k)
        tol = 5 * loss[tok].std().item() / math.sqrt(reps) + 1e-12  # false failure: p < 1e-6
        assert abs(loss[tok].mean().item() - exact) <= tol, (tok, k, loss[tok].mean().item(), exact)


def test_alpha0_draws_are_distinct_with_conditional_weights() -> None:
    p = torch.tensor([[0.0, 0.5, 0.3, 0.2]]).repeat(500, 1)
    experts, weights = L.mc_draws(p, 3, 0.0, torch.Generator().manual_seed(4))
    assert (experts != 0).all()  # zero-mass expert never drawn
    assert all(len(set(row)) == 3 for row in experts.tolist())
    drawn_mass = p.gather(1, experts)  # p[e_t]
    before = torch.cat([torch.zeros(500, 1), drawn_mass.cumsum(1)[:, :-1]], dim=1)
    assert torch.allclose(weights, drawn_mass / (1 - before), atol=1e-6)


def test_alpha0_refuses_k_above_positive_mass_experts() -> None:
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    ht, hs = torch.randn(2, 4, 2), torch.randn(2, 4, 2)
    with pytest.raises(ValueError, match=r"only 2 expert\(s\).*distill\.k <= 2 or distill\.alpha > 0"):
        L.mc_exploration_loss(p, ht, hs, 3, 0.0, allow_without_replacement=True)
    L.mc_exploration_loss(p, ht, hs, 2, 0.0, allow_without_replacement=True)  # K = 2 fits
    L.mc_exploration_loss(p, ht, hs, 3, 0.2)  # damping > 0 may redraw an expert


def test_alpha0_is_accepted_like_any_alpha_in_the_unit_interval() -> None:
    """The method defines alpha on [0, 1]: alpha = 0 needs no keyword (issue 21); only what cannot be drawn
    (K above the experts with mass, tested above) or an alpha outside [0, 1] is refused."""
    p = torch.softmax(torch.randn(2, 4), -1)
    ht, hs = torch.randn(2, 4, 2), torch.randn(2, 4, 2)
    plain = L.mc_exploration_loss(p, ht, hs, 2, 0.0, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    flagged = L.mc_exploration_loss(p, ht, hs, 2, 0.0, gen, allow_without_replacement=True)
    assert torch.equal(plain, flagged)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            L.mc_exploration_loss(p, ht, hs, 2, bad)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            L.mc_draws(p, 2, bad)
