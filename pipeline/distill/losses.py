"""B-Distill losses: layer/expert alignment, MC expert exploration and entropy-aware router distillation.

The public functions below are the project's loss API (docs/method.md; 0-based indices), called by outside
code under these names and shapes:

* ``expert_mapping`` / ``layer_pairs``: the alignment of Eq. 6 and the linear layer rule.
* ``aggregate_gates`` / ``aggregate_expert_states``: teacher gates and expert outputs folded to the
  student's expert count.
* ``mc_exploration_loss``: Algorithm 1 / Eq. 7 per token (mean over hidden units instead of the paper's sum,
  so ``lambda_1 = 1`` does not scale with the hidden size -- a documented deviation). It is built from
  ``mc_draws`` (the sampling and weights w_t) and ``state_distance`` (a per-(token, expert) distance), so
  other distances can reuse the draws: ``sum_t w_t * distance(e_t)``. ``subspace_state_distance`` is the
  same distance against coefficient targets h~T = V c~ of a low-rank cache (``distill.mc_state_space``).
* ``erd_loss``: Eq. 10, ``KL(p~T || p^S) - beta * H(p^S)`` per token.
* ``router_mc_loss`` / ``double_softmax_erd_loss``: the router terms of the paper's released code (MC as a
  cross-entropy on the drawn experts plus a coverage KL; ERD on twice-softmaxed gates), batch-reduced as
  released, for the ``b-distill-official`` preset.

Per-token losses are returned unreduced ([N]); the training loop sums them over layer pairs and averages over
response tokens (Eq. 13). Token-level KD losses live in ``pipeline.distill.token_losses`` and are re-exported
here, as are the alignment functions (their code lives in ``pipeline.models.alignment``, which the teacher
side uses too).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.cache.format.codecs import subspace_sq_distance
from pipeline.distill.token_losses import (
    TOKEN_LOSSES,
    ab_divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sample_sparsify,
    sft_loss,
    skew_forward_kl,
    skew_reverse_kl,
    topk_sparsify,
)
from pipeline.models.alignment import (
    _positive_int,
    aggregate_expert_states,
    aggregate_gates,
    check_reaggregation,
    expert_mapping,
    layer_pairs,
)

__all__ = [
    "STATE_LOSSES",
    "TOKEN_LOSSES",
    "ab_divergence",
    "aggregate_expert_states",
    "aggregate_gates",
    "check_reaggregation",
    "double_softmax_erd_loss",
    "erd_loss",
    "expert_mapping",
    "forward_kl",
    "gather_experts",
    "generalized_jsd",
    "layer_pairs",
    "mc_draws",
    "mc_exploration_loss",
    "reverse_kl",
    "router_mc_loss",
    "sample_sparsify",
    "sft_loss",
    "skew_forward_kl",
    "skew_reverse_kl",
    "state_distance",
    "subspace_state_distance",
    "topk_sparsify",
]


def _check_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


#: Per-draw distances of ``state_distance`` (``distill.mc_state_loss``); "mse" is the paper's Eq. 7.
STATE_LOSSES = ("mse", "relative", "cosine")
# Floor for the teacher state's mean square in the relative distance: a drawn expert always has teacher mass,
# but an all-zero cached state (fp16 underflow) must give a large finite loss, never inf.
_RELATIVE_FLOOR = 1e-12


def mc_draws(
    p_teacher: Tensor, k: int, alpha: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Algorithm 1's sampling for each of N tokens -> (experts [N, K] long, weights [N, K]).

    p(0) = p~T; for t = 1..K: e_t ~ p(t-1); w_t = p(t-1)[e_t]; p(t) = NORMALIZE(p(t-1) with entry e_t
    multiplied by alpha). alpha = 1 is sampling with replacement; alpha = 0 is sampling without replacement
    (a drawn expert's mass is removed), which needs K experts with positive teacher mass in every row.

    Args:
        p_teacher: [N, E] aggregated teacher gate (rows are renormalised first: a no-op up to the fp16
            rounding of a cached gate, and it makes w_1 a probability like every later w_t).
        k: exploration length K >= 1 (draws per token).
        alpha: damping in [0, 1].
        generator: torch.Generator on p_teacher's device, for reproducible draws.

    Neither output carries gradient. Weights are in fp32 at least. One multinomial call per draw, vectorised
    over tokens.
    """
    k = _positive_int(k, "k")
    alpha = _check_real(alpha, "alpha")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (MC damping) must be in [0, 1], got {alpha}")
    if p_teacher.dim() != 2 or p_teacher.shape[1] == 0:
        raise ValueError(f"expected p_teacher [N, E] with E >= 1, got {tuple(p_teacher.shape)}")
    n = p_teacher.shape[0]
    dtype = torch.promote_types(p_teacher.dtype, torch.float32)
    probs = p_teacher.detach().to(dtype)
    if n == 0:
        return probs.new_zeros((0, k), dtype=torch.long), probs.new_zeros((0, k))
    row_sum = probs.sum(dim=-1, keepdim=True)
    bad = ~torch.isfinite(probs).all() | (probs < 0).any() | (row_sum <= 0).any()
    if bool(bad):  # one host sync; multinomial would otherwise fail with an opaque error
        raise ValueError("p_teacher rows must be finite, non-negative and have positive mass")
    if alpha == 0.0:
        fewest = int((probs > 0).sum(dim=-1).min())
        if fewest < k:
            raise ValueError(
                f"alpha = 0 samples K = {k} distinct experts per token, but some token's teacher gate has "
                f"only {fewest} expert(s) with positive mass. Fix: set distill.k <= {fewest} or "
                "distill.alpha > 0."
            )
    probs = probs / row_sum
    experts, weights = [], []
    for _ in range(k):
        drawn = torch.multinomial(probs, 1, replacement=True, generator=generator)  # [N, 1]
        weight = probs.gather(1, drawn)  # w_t
        experts.append(drawn)
        weights.append(weight)
        probs = probs.scatter(1, drawn, weight * alpha)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.cat(experts, dim=1), torch.cat(weights, dim=1)


def gather_experts(states: Tensor, experts: Tensor) -> Tensor:
    """The drawn experts' states: states [N, E, D] at experts [N, K] -> [N, K, D] (differentiable)."""
    n, k = experts.shape
    return states.gather(1, experts.unsqueeze(-1).expand(n, k, states.shape[-1]))


def state_distance(h_student: Tensor, h_teacher: Tensor, state_loss: str = "mse") -> Tensor:
    """Distance between student and teacher expert states over the last dimension D -> [...].

    * ``mse``: ||h_S - h~T||^2 / D (Eq. 7 with the mean over D instead of the sum).
    * ``relative``: ||h_S - h~T||^2 / ||h~T||^2, scale-free in the teacher state (its mean square is floored
      at 1e-12).
    * ``cosine``: 1 - cos(h_S, h~T), blind to the norm of h_S.

    The teacher side is a fixed target (detached). Computed in fp32 at least.
    """
    if state_loss not in STATE_LOSSES:
        raise ValueError(
            f"unknown MC state loss {state_loss!r}; valid: {', '.join(STATE_LOSSES)} (distill.mc_state_loss)"
        )
    dtype = torch.promote_types(h_student.dtype, torch.float32)
    hs = h_student.to(dtype)
    ht = h_teacher.detach().to(dtype)
    if state_loss == "cosine":
        return 1.0 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8)
    mse = (hs - ht).pow(2).mean(dim=-1)
    if state_loss == "relative":
        return mse / ht.pow(2).mean(dim=-1).clamp_min(_RELATIVE_FLOOR)
    return mse


def subspace_state_distance(
    h_student: Tensor, c_teacher: Tensor, basis: Tensor, experts: Tensor, state_loss: str = "mse"
) -> Tensor:
    """``state_distance(h_S, V_e c)`` without forming V_e c, for the drawn experts -> [N, K].

    h_student [N, K, D] (projected to D), c_teacher [N, K, q] coefficients, basis V [E, D, q] with
    orthonormal columns per expert, experts [N, K] the expert each row was drawn from. Draws are grouped by
    expert (one host sync) so only V_e^T h_S of the drawn rows is computed: O(N K D q), never [N, K, D, q].
    With orthonormal V, ||V c||^2 = ||c||^2 and <h_S, V c> = <V^T h_S, c>, so every STATE_LOSSES entry is
    exact in coefficient form.
    """
    if state_loss not in STATE_LOSSES:
        raise ValueError(
            f"unknown MC state loss {state_loss!r}; valid: {', '.join(STATE_LOSSES)} (distill.mc_state_loss)"
        )
    dtype = torch.promote_types(h_student.dtype, torch.float32)
    n, k, d = h_student.shape
    flat_experts = experts.reshape(-1)
    order = flat_experts.argsort()
    hs = h_student.to(dtype).reshape(n * k, d)[order]
    ct = c_teacher.detach().to(dtype).reshape(n * k, -1)[order]
    v = basis.detach().to(dtype)
    counts = torch.bincount(flat_experts, minlength=v.shape[0]).tolist()
    parts = []
    for e, (s_e, c_e) in enumerate(zip(hs.split(counts), ct.split(counts), strict=True)):
        if state_loss == "cosine":
            dot = ((s_e @ v[e]) * c_e).sum(dim=-1)  # <h_S, V c> = <V^T h_S, c>
            norms = s_e.norm(dim=-1).clamp_min(1e-8) * c_e.norm(dim=-1).clamp_min(1e-8)
            parts.append(1.0 - dot / norms)
        else:
            parts.append(subspace_sq_distance(s_e, v[e], c_e))
    distance = torch.cat(parts)[order.argsort()].reshape(n, k)
    if state_loss == "relative":  # ||h~T||^2 / D = ||c||^2 / D
        distance = distance / (c_teacher.detach().to(dtype).pow(2).sum(-1) / d).clamp_min(_RELATIVE_FLOOR)
    return distance


def mc_exploration_loss(
    p_teacher: Tensor,
    h_teacher: Tensor,
    h_student: Tensor,
    k: int,
    alpha: float,
    generator: torch.Generator | None = None,
    *,
    state_loss: str = "mse",
    allow_without_replacement: bool = False,
    basis: Tensor | None = None,
) -> Tensor:
    """Single-layer Monte Carlo expert exploration (Algorithm 1, Eq. 7) for each of N tokens -> [N].

    sum_t w_t * state_distance(h^S_{e_t}, h~T_{e_t}) over the K draws of ``mc_draws``.

    Args:
        p_teacher: [N, E] aggregated teacher gate.
        h_teacher: [N, E, D] aggregated teacher expert states.
        h_student: [N, E, D] student expert outputs, already projected to D.
        k: exploration length K >= 1 (draws per token).
        alpha: damping in [0, 1]; 1 means plain sampling with replacement, 0 sampling without replacement
            (refused only when a token's gate has fewer than K experts with positive mass: see ``mc_draws``).
        generator: torch.Generator on p_teacher's device, for reproducible draws.
        state_loss: the per-draw distance, one of STATE_LOSSES ("mse" = the paper as written).
        allow_without_replacement: kept so existing callers still work; alpha = 0 needs no flag.
        basis: V [E, D, q] of a low-rank cache; h_teacher is then the coefficients [N, E, q] of h~T = V c~
            and the distance is ``subspace_state_distance`` (the same value, same draws).

    Sampling and the weights w_t carry no gradient; h_teacher is a fixed target; the gradient flows into
    h_student only. Computed in fp32 at least.
    """
    del allow_without_replacement  # alpha is defined on [0, 1]; mc_draws refuses what cannot be drawn
    if p_teacher.dim() != 2 or h_teacher.dim() != 3 or h_student.dim() != 3:
        raise ValueError(
            "expected p_teacher [N, E], h_teacher [N, E, D], h_student [N, E, D]; got "
            f"{tuple(p_teacher.shape)}, {tuple(h_teacher.shape)}, {tuple(h_student.shape)}"
        )
    if basis is not None:
        want = (*h_student.shape[1:], h_teacher.shape[2])  # V [E, D, q] for coefficients [N, E, q]
        if tuple(basis.shape) != want or h_teacher.shape[:2] != p_teacher.shape:
            raise ValueError(
                f"subspace MC: expected p_teacher [N, E], coefficients [N, E, q] and basis [E, D, q] = "
                f"{list(want)}; got {tuple(p_teacher.shape)}, {tuple(h_teacher.shape)}, "
                f"{tuple(basis.shape)} (the cache's group basis for this student's experts and layer pair)"
            )
    elif h_teacher.shape != h_student.shape or h_teacher.shape[:2] != p_teacher.shape:
        raise ValueError(
            "shape mismatch: p_teacher [N, E], h_teacher and h_student [N, E, D] must agree (project the "
            f"student states to the cached hidden size first); got {tuple(p_teacher.shape)}, "
            f"{tuple(h_teacher.shape)}, {tuple(h_student.shape)}"
        )
    n, e, d = h_student.shape
    if e == 0 or d == 0:
        raise ValueError(f"need at least one expert and one hidden unit, got E={e}, D={d}")
    experts, weights = mc_draws(p_teacher, k, alpha, generator)
    if n == 0:  # empty, but attached to the graph
        return h_student.to(torch.promote_types(h_student.dtype, torch.float32)).sum(dim=(1, 2))
    drawn_student, drawn_teacher = gather_experts(h_student, experts), gather_experts(h_teacher, experts)
    if basis is None:
        distance = state_distance(drawn_student, drawn_teacher, state_loss)
    else:
        distance = subspace_state_distance(drawn_student, drawn_teacher, basis, experts, state_loss)
    return (weights.to(distance.dtype) * distance).sum(dim=-1)


def erd_loss(p_teacher: Tensor, p_student: Tensor, beta: float) -> Tensor:
    """Entropy-aware router distillation (Eq. 10) per token: KL(p~T || p^S) - beta * H(p^S) -> [N].

    Args:
        p_teacher: [N, E] aggregated teacher gate (a fixed target, detached).
        p_student: [N, E] the student's full softmax gate over its E experts.
        beta: entropy weight >= 0.

    0 * log 0 = 0 on both sides; student probabilities are clamped to the smallest positive normal before the
    log so an underflowed gate gives a large finite loss, never inf or NaN. Computed in fp32 at least.
    """
    beta = _check_real(beta, "beta")
    if beta < 0:
        raise ValueError(f"beta (entropy weight) must be >= 0, got {beta}")
    if p_teacher.dim() != 2 or p_teacher.shape != p_student.shape:
        raise ValueError(
            f"expected p_teacher and p_student of the same shape [N, E], got {tuple(p_teacher.shape)} and "
            f"{tuple(p_student.shape)}"
        )
    dtype = torch.promote_types(p_student.dtype, torch.float32)
    pt = p_teacher.detach().to(dtype)
    ps = p_student.to(dtype)
    log_ps = ps.clamp_min(torch.finfo(dtype).tiny).log()
    kl = (torch.xlogy(pt, pt) - pt * log_ps).sum(dim=-1)
    entropy = -(ps * log_ps).sum(dim=-1)
    return kl - beta * entropy


# ----------------------------------------------------------------------------------------------------------
# The paper's released code (its "method A" / "method B" router terms), for the b-distill-official preset
# ----------------------------------------------------------------------------------------------------------

#: Probability floor of the released code's coverage distributions (added, then renormalised).
_COVERAGE_EPS = 1e-8


def router_mc_loss(
    p_teacher: Tensor, p_student: Tensor, k: int, alpha: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The released code's router-level MC term -> (cross-entropy, coverage KL), two scalars.

    Draws e_t and weights w_t as Algorithm 1 (``mc_draws``), then, over all N tokens and K draws:

    * cross-entropy: sum w_t * (-log p^S[e_t]) / sum w_t (a KL against the one-hot of the drawn expert);
    * coverage KL: KL(u_T || u_S) / E between the usage of the drawn experts, u_T[e] = sum of w_t over draws
      of e and u_S[e] = sum of the student's p^S[e] at those draws, each normalised, floored at 1e-8 and
      renormalised (the division by E is ``batchmean`` on a 1-D tensor).

    Args:
        p_teacher: [N, E] aggregated teacher gate (no gradient).
        p_student: [N, E] the student's full softmax gate.
    """
    if p_teacher.dim() != 2 or p_teacher.shape != p_student.shape:
        raise ValueError(
            f"expected p_teacher and p_student of the same shape [N, E], got {tuple(p_teacher.shape)} and "
            f"{tuple(p_student.shape)}"
        )
    dtype = torch.promote_types(p_student.dtype, torch.float32)
    ps = p_student.to(dtype)
    if ps.shape[0] == 0:
        zero = ps.sum()  # attached to the graph
        return zero, zero
    experts, weights = mc_draws(p_teacher, k, alpha, generator)
    weights = weights.to(dtype)
    drawn = ps.gather(1, experts)  # p^S[e_t], [N, K]
    cross_entropy = (weights * -drawn.clamp_min(torch.finfo(dtype).tiny).log()).sum() / weights.sum()
    e = ps.shape[1]
    usage_t = torch.zeros(e, dtype=dtype, device=ps.device).index_add(0, experts.flatten(), weights.flatten())
    usage_s = torch.zeros(e, dtype=dtype, device=ps.device).index_add(0, experts.flatten(), drawn.flatten())
    usage_t, usage_s = (_floored(u / u.sum()) for u in (usage_t, usage_s))
    coverage = (usage_t * (usage_t.log() - usage_s.log())).sum() / e
    return cross_entropy, coverage


def _floored(p: Tensor) -> Tensor:
    p = p + _COVERAGE_EPS
    return p / p.sum()


def double_softmax_erd_loss(
    p_teacher: Tensor, p_student: Tensor, beta: float, num_sequences: int, temperature: float = 1.0
) -> Tensor:
    """The released code's router distillation -> scalar: KL(a_T || a_S) summed over tokens / num_sequences
    - beta * mean over tokens of H(a_S), with a_T = softmax(p~T) and a_S = softmax(p^S / temperature).

    The softmax is applied to tensors that are already router probabilities (as released, which flattens
    both toward uniform), and the KL is divided by the number of sequences, not tokens (``batchmean`` over a
    [B, T, E] tensor).
    """
    beta = _check_real(beta, "beta")
    temperature = _check_real(temperature, "temperature")
    if temperature <= 0 or beta < 0 or isinstance(num_sequences, bool) or int(num_sequences) < 1:
        raise ValueError(
            f"need temperature > 0, beta >= 0 and num_sequences >= 1, got {temperature}, {beta}, "
            f"{num_sequences}"
        )
    if p_teacher.dim() != 2 or p_teacher.shape != p_student.shape:
        raise ValueError(
            f"expected p_teacher and p_student of the same shape [N, E], got {tuple(p_teacher.shape)} and "
            f"{tuple(p_student.shape)}"
        )
    dtype = torch.promote_types(p_student.dtype, torch.float32)
    log_t = torch.log_softmax(p_teacher.detach().to(dtype), dim=-1)
    log_s = torch.log_softmax(p_student.to(dtype) / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum() / int(num_sequences)
    entropy = -(log_s.exp() * log_s).sum(dim=-1).mean() if p_student.shape[0] else log_s.sum()
    return kl - beta * entropy
