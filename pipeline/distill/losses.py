"""B-Distill losses: layer/expert alignment, MC expert exploration and entropy-aware router distillation.

The public functions below are the project's loss API (docs/method.md; 0-based indices), called by outside
code under these names and shapes:

* ``expert_mapping`` / ``layer_pairs``: the alignment of Eq. 6 and the linear layer rule.
* ``aggregate_gates`` / ``aggregate_expert_states``: teacher gates and expert outputs folded to the
  student's expert count.
* ``mc_exploration_loss``: Algorithm 1 / Eq. 7 per token (mean over hidden units instead of the paper's sum,
  so ``lambda_1 = 1`` does not scale with the hidden size -- a documented deviation).
* ``erd_loss``: Eq. 10, ``KL(p~T || p^S) - beta * H(p^S)`` per token.

Per-token losses are returned unreduced ([N]); the training loop sums them over layer pairs and averages over
response tokens (Eq. 13). Token-level KD losses live in ``pipeline.distill.token_losses`` and are re-exported
here, as are the alignment functions (their code lives in ``pipeline.models.alignment``, which the teacher
side uses too).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

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
    "TOKEN_LOSSES",
    "ab_divergence",
    "aggregate_expert_states",
    "aggregate_gates",
    "check_reaggregation",
    "erd_loss",
    "expert_mapping",
    "forward_kl",
    "generalized_jsd",
    "layer_pairs",
    "mc_exploration_loss",
    "reverse_kl",
    "sample_sparsify",
    "sft_loss",
    "skew_forward_kl",
    "skew_reverse_kl",
    "topk_sparsify",
]


def _check_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def mc_exploration_loss(
    p_teacher: Tensor,
    h_teacher: Tensor,
    h_student: Tensor,
    k: int,
    alpha: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Single-layer Monte Carlo expert exploration (Algorithm 1, Eq. 7) for each of N tokens -> [N].

    p(0) = p~T; for t = 1..K: e_t ~ p(t-1); w_t = p(t-1)[e_t]; add w_t * ||h^S_{e_t} - h~T_{e_t}||^2 / D;
    p(t) = NORMALIZE(p(t-1) with entry e_t multiplied by alpha).

    Args:
        p_teacher: [N, E] aggregated teacher gate (rows are renormalised first: a no-op up to the fp16
            rounding of a cached gate, and it makes w_1 a probability like every later w_t).
        h_teacher: [N, E, D] aggregated teacher expert states.
        h_student: [N, E, D] student expert outputs, already projected to D.
        k: exploration length K >= 1 (draws per token).
        alpha: damping in (0, 1]; 1 means plain sampling with replacement.
        generator: torch.Generator on p_teacher's device, for reproducible draws.

    Sampling and the weights w_t carry no gradient; h_teacher is a fixed target; the gradient flows into
    h_student only. Vectorised over tokens (one multinomial call per step). Computed in fp32 at least.
    """
    k = _positive_int(k, "k")
    alpha = _check_real(alpha, "alpha")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha (MC damping) must be in (0, 1], got {alpha}")
    if p_teacher.dim() != 2 or h_teacher.dim() != 3 or h_student.dim() != 3:
        raise ValueError(
            "expected p_teacher [N, E], h_teacher [N, E, D], h_student [N, E, D]; got "
            f"{tuple(p_teacher.shape)}, {tuple(h_teacher.shape)}, {tuple(h_student.shape)}"
        )
    if h_teacher.shape != h_student.shape or h_teacher.shape[:2] != p_teacher.shape:
        raise ValueError(
            "shape mismatch: p_teacher [N, E], h_teacher and h_student [N, E, D] must agree (project the "
            f"student states to the cached hidden size first); got {tuple(p_teacher.shape)}, "
            f"{tuple(h_teacher.shape)}, {tuple(h_student.shape)}"
        )
    n, e, d = h_student.shape
    if e == 0 or d == 0:
        raise ValueError(f"need at least one expert and one hidden unit, got E={e}, D={d}")
    dtype = torch.promote_types(h_student.dtype, torch.float32)
    if n == 0:
        return h_student.to(dtype).sum(dim=(1, 2))  # empty, but attached to the graph

    probs = p_teacher.detach().to(dtype)
    row_sum = probs.sum(dim=-1, keepdim=True)
    bad = ~torch.isfinite(probs).all() | (probs < 0).any() | (row_sum <= 0).any()
    if bool(bad):  # one host sync; multinomial would otherwise fail with an opaque error
        raise ValueError("p_teacher rows must be finite, non-negative and have positive mass")
    probs = probs / row_sum
    target = h_teacher.detach()
    loss = torch.zeros(n, dtype=dtype, device=h_student.device)
    for _ in range(k):
        drawn = torch.multinomial(probs, 1, replacement=True, generator=generator)  # [N, 1]
        weight = probs.gather(1, drawn).squeeze(1)  # w_t, no gradient
        idx = drawn.unsqueeze(-1).expand(n, 1, d)
        diff = h_student.gather(1, idx).squeeze(1).to(dtype) - target.gather(1, idx).squeeze(1).to(dtype)
        loss = loss + weight * diff.pow(2).mean(dim=-1)
        probs = probs.scatter(1, drawn, weight.unsqueeze(1) * alpha)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return loss


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
