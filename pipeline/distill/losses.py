"""B-Distill losses: layer/expert alignment, MC expert exploration and entropy-aware router distillation.

The public functions below are the contract of DESIGN.md "The method, precisely" (0-based indices):

* ``expert_mapping`` / ``layer_pairs``: the alignment of Eq. 6 and the linear layer rule.
* ``aggregate_gates`` / ``aggregate_expert_states``: teacher gates and expert outputs folded to the
  student's expert count.
* ``mc_exploration_loss``: Algorithm 1 / Eq. 7 per token (mean over hidden units instead of the paper's sum,
  so ``lambda_1 = 1`` does not scale with the hidden size -- a documented deviation).
* ``erd_loss``: Eq. 10, ``KL(p~T || p^S) - beta * H(p^S)`` per token.

Per-token losses are returned unreduced ([N]); the training loop sums them over layer pairs and averages over
response tokens (Eq. 13). Token-level KD losses live in ``pipeline.distill.token_losses`` and are re-exported
here, because CONTRACTS.md lists them under this module.
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


def _positive_int(value: object, name: str) -> int:
    # bool is an int subclass; a True here is always a caller bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def expert_mapping(num_teacher_experts: int, num_student_experts: int) -> torch.LongTensor:
    """pi(j) = floor(j * E_S / E_T) for teacher experts j = 0..E_T-1 (Eq. 6 in 0-based form).

    Any 1 <= E_S <= E_T is allowed; when E_S does not divide E_T the groups differ in size by at most one
    (e.g. 6 -> 4 gives [0, 0, 1, 2, 2, 3]). Every student expert receives at least one teacher expert.
    """
    e_t = _positive_int(num_teacher_experts, "num_teacher_experts")
    e_s = _positive_int(num_student_experts, "num_student_experts")
    if e_s > e_t:
        raise ValueError(
            f"the student has more experts per layer ({e_s}) than the teacher ({e_t}); B-Distill maps "
            "teacher experts onto student experts, so some student experts would get no teacher expert. "
            "Use num_student_experts <= num_teacher_experts."
        )
    return torch.div(torch.arange(e_t, dtype=torch.long) * e_s, e_t, rounding_mode="floor")


def layer_pairs(num_teacher_layers: int, num_student_layers: int) -> list[tuple[int, int]]:
    """(s, t) pairs, t = ceil((s + 1) * L_T / L_S) - 1, for every student MoE layer s = 0..L_S-1.

    In 1-based terms t is the smallest teacher layer whose linear-rule image floor(l_T * L_S / L_T) is l_S.
    Integer arithmetic only, so there is no float rounding for large layer counts.
    """
    l_t = _positive_int(num_teacher_layers, "num_teacher_layers")
    l_s = _positive_int(num_student_layers, "num_student_layers")
    if l_s > l_t:
        raise ValueError(
            f"the student has more MoE layers ({l_s}) than the teacher ({l_t}); the linear layer rule pairs "
            "each student layer with a distinct teacher layer. Use num_student_layers <= num_teacher_layers."
        )
    return [(s, -(-(s + 1) * l_t // l_s) - 1) for s in range(l_s)]


def check_reaggregation(cached_width: int, num_student_experts: int) -> None:
    """Raise ValueError unless a cache aggregated to ``cached_width`` experts can be folded to E_S.

    Folding W -> E_S equals folding E_T -> E_S directly exactly when E_S divides W
    (floor(floor(j W / E_T) / m) == floor(j E_S / E_T) for W = m * E_S).
    """
    w = _positive_int(cached_width, "cached_width")
    e_s = _positive_int(num_student_experts, "num_student_experts")
    if w % e_s != 0:
        divisors = [d for d in range(1, w + 1) if w % d == 0]
        raise ValueError(
            f"a cache stored at expert width {w} cannot be re-aggregated to {e_s} student experts: the "
            f"student expert count must divide the cached width (valid: {divisors}). "
            "Pick such a student expert count or rebuild the cache at a width it divides."
        )


def _mapping_matrix(num_teacher_experts: int, num_student_experts: int, like: Tensor) -> Tensor:
    """One-hot [E_T, E_S] matrix M with M[j, pi(j)] = 1, on ``like``'s device and dtype."""
    pi = expert_mapping(num_teacher_experts, num_student_experts).to(like.device)
    eye = torch.eye(num_student_experts, dtype=like.dtype, device=like.device)
    return eye[pi]


def aggregate_gates(p_teacher: Tensor, num_student_experts: int) -> Tensor:
    """p~_e = sum_{j: pi(j) = e} p_j over the last dim: [..., E_T] -> [..., E_S].

    ``p_teacher`` must be the full softmax over all teacher experts (not only the routed top-k).
    """
    if p_teacher.dim() < 1 or not p_teacher.is_floating_point():
        raise ValueError(
            f"p_teacher must be a floating tensor [..., E_T], got {tuple(p_teacher.shape)} {p_teacher.dtype}"
        )
    mapping = _mapping_matrix(p_teacher.shape[-1], num_student_experts, p_teacher)
    return p_teacher @ mapping


def aggregate_expert_states(p_teacher: Tensor, h_teacher: Tensor, num_student_experts: int) -> Tensor:
    """h~_e = sum_{j: pi(j) = e} (p_j / p~_e) h_j: [..., E_T], [..., E_T, D] -> [..., E_S, D].

    A group whose gate mass p~_e is exactly 0 (e.g. fp16 underflow of a very peaked router) gets the zero
    state: its weights are 0/0, and MC exploration never draws an expert with zero probability, so the value
    is never used. The division is guarded so neither the result nor its gradient is NaN.
    """
    if p_teacher.dim() < 1 or h_teacher.shape[:-1] != p_teacher.shape:
        raise ValueError(
            f"expected p_teacher [..., E_T] and h_teacher [..., E_T, D] with the same leading dims, got "
            f"{tuple(p_teacher.shape)} and {tuple(h_teacher.shape)}"
        )
    if not (p_teacher.is_floating_point() and h_teacher.is_floating_point()):
        raise ValueError(
            f"p_teacher and h_teacher must be floating tensors, got {p_teacher.dtype}, {h_teacher.dtype}"
        )
    dtype = torch.promote_types(p_teacher.dtype, h_teacher.dtype)
    # Weights in fp32 at least: p_j / p~_e in bf16 would lose most of its mantissa.
    wdtype = torch.promote_types(dtype, torch.float32)
    p = p_teacher.to(wdtype)
    mapping = _mapping_matrix(p.shape[-1], num_student_experts, p)  # [E_T, E_S]
    group_mass = p @ mapping  # [..., E_S]
    per_expert_mass = group_mass @ mapping.T  # [..., E_T]: p~_{pi(j)}
    positive = per_expert_mass > 0
    weights = torch.where(positive, p / torch.where(positive, per_expert_mass, torch.ones_like(p)), 0.0)
    # [..., E_S, E_T] @ [..., E_T, D]: a batched matmul, never materialising weights * h ([..., E_T, D]).
    combine = (weights.unsqueeze(-1) * mapping).transpose(-1, -2).to(dtype)
    return combine @ h_teacher.to(dtype)


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
