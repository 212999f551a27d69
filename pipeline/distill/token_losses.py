"""Token-level KD losses against a sparse cached teacher distribution.

The teacher cache keeps, per distillation position, ``indices [N, k]`` (token ids), ``logprobs [N, k]``
(teacher log-probabilities at T = 1) and ``tail_logmass [N]`` (log of the teacher mass outside the kept
entries; -inf when there is none). Every loss here compares the two (k + 1)-bin *coarsened* distributions:
the k kept tokens plus one "tail" bin holding all remaining mass. The student's tail is 1 - sum of its
probabilities at the kept indices, computed exactly as a logsumexp over the non-kept logits (no cancellation
when the kept mass is close to 1). With k = V (no tail) the losses equal their full-vocabulary versions.

Conventions, shared by every loss ``fn(indices, logprobs, tail_logmass, student_logits, ...) -> Tensor[N]``:

* Entries with teacher logprob -inf are padding (``sample_sparsify`` pads with index 0 and -inf): they are
  ignored, and the student's mass at their index stays in its tail bin. A row's valid indices must be
  distinct; ``check_sparse_targets`` verifies that (and index ranges) for data from outside.
* A bin where both distributions are exactly 0 contributes 0.
* Everything is computed in fp32 (or fp64 when given fp64 logits) in log space, so peaked distributions
  (logit gaps of 1e4) give finite losses and gradients.
* ``temperature`` divides the student logits only. The teacher stays at T = 1 as cached: tempering a
  coarsened teacher would need the shape of its tail, which the cache does not keep. There is no T^2 factor.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# The sparsifiers produce the targets these losses read; they live with the cache that stores them and are
# re-exported here because outside code imports them from this module.
from pipeline.cache.build.sparsify import NEG_INF, sample_sparsify, topk_sparsify

#: Floor for teacher log-probs in losses that divide by the teacher (reverse KL, AB with alpha = 0): a
#: teacher bin of exactly zero mass (sampled mode's tail, fp16 underflow) would make them infinite. exp(-23)
#: is about 1e-10.
DEFAULT_TEACHER_LOG_FLOOR = -23.0
#: ABKD default (alpha, beta) = (0.2, 0.7): our reading of ABKD's GPT-2 instruction-following setting (not
#: re-checked against the paper here). ABKD tunes the pair per task, so treat it as a starting point to sweep.
DEFAULT_AB_ALPHA = 0.2
DEFAULT_AB_BETA = 0.7

SparseLoss = Callable[..., Tensor]

__all__ = [
    "DEFAULT_AB_ALPHA",
    "DEFAULT_AB_BETA",
    "DEFAULT_TEACHER_LOG_FLOOR",
    "NEG_INF",
    "TOKEN_LOSSES",
    "ab_divergence",
    "check_sparse_targets",
    "coarsened_logprobs",
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "sample_sparsify",
    "sft_loss",
    "skew_forward_kl",
    "skew_reverse_kl",
    "topk_sparsify",
]


# ----------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _open_unit(value: object, name: str, hint: str) -> float:
    out = _real(value, name)
    if not 0.0 < out < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {out}; {hint}")
    return out


def _check_targets(indices: Tensor, logprobs: Tensor, tail_logmass: Tensor, n: int) -> None:
    if indices.dim() != 2 or indices.shape[0] != n or indices.shape[1] < 1:
        raise ValueError(f"indices must be [N, k] with N = {n} and k >= 1, got {tuple(indices.shape)}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    if logprobs.shape != indices.shape or not logprobs.is_floating_point():
        raise ValueError(
            f"logprobs must be a floating tensor shaped like indices {tuple(indices.shape)}, "
            f"got {tuple(logprobs.shape)} {logprobs.dtype}"
        )
    if tail_logmass.shape != (n,) or not tail_logmass.is_floating_point():
        raise ValueError(
            f"tail_logmass must be a floating tensor [N] with N = {n}, got "
            f"{tuple(tail_logmass.shape)} {tail_logmass.dtype}"
        )


def _check_shapes(indices: Tensor, logprobs: Tensor, tail_logmass: Tensor, student_logits: Tensor) -> None:
    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise ValueError(
            f"student_logits must be a floating tensor [N, V], got "
            f"{tuple(student_logits.shape)} {student_logits.dtype}"
        )
    _check_targets(indices, logprobs, tail_logmass, student_logits.shape[0])


def check_sparse_targets(indices: Tensor, logprobs: Tensor, tail_logmass: Tensor, vocab_size: int) -> None:
    """Raise ValueError if sparse teacher targets are malformed (costs a host sync; for readers and tests).

    Checks: index range, distinct valid indices per row (padding = logprob -inf may repeat), no NaN, no
    positive log-probabilities, and total mass (kept + tail) within 1e-2 of 1 (fp16 storage rounds).
    """
    _check_targets(indices, logprobs, tail_logmass, indices.shape[0] if indices.dim() else -1)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab_size):
        raise ValueError(
            f"indices must lie in [0, {vocab_size}), got range [{int(indices.min())}, {int(indices.max())}]"
        )
    lp = logprobs.float()
    tail = tail_logmass.float()
    if torch.isnan(lp).any() or torch.isnan(tail).any() or (lp > 1e-3).any() or (tail > 1e-3).any():
        raise ValueError("teacher log-probabilities must be <= 0 and not NaN")
    valid = lp > NEG_INF
    keyed = torch.where(valid, indices.long(), -1 - torch.arange(indices.shape[1], device=indices.device))
    ordered = keyed.sort(dim=1).values
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ValueError(
            "a row repeats a token index among its valid (finite log-prob) entries; sparse "
            "targets must hold each token at most once (merge duplicates before caching)"
        )
    total = torch.logsumexp(torch.cat([lp, tail.unsqueeze(1)], dim=1), dim=1).exp()
    if ((total - 1).abs() > 1e-2).any():
        raise ValueError(
            f"kept mass + tail mass must be 1 per row; rows range over "
            f"{float(total.min()):.4f} .. {float(total.max()):.4f}"
        )


# ----------------------------------------------------------------------------------------------------------
# Coarsening to k + 1 bins
# ----------------------------------------------------------------------------------------------------------


def coarsened_logprobs(
    indices: Tensor,
    logprobs: Tensor,
    tail_logmass: Tensor,
    student_logits: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probabilities on the k + 1 bins (k kept entries, then the tail): 2 x [N, k+1].

    Padded entries (teacher logprob -inf) are -inf on both sides; the student's mass at their index is in its
    tail. Differentiable in ``student_logits``; the teacher side is detached.
    """
    _check_shapes(indices, logprobs, tail_logmass, student_logits)
    temperature = _real(temperature, "temperature")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    n, v = student_logits.shape
    idx = indices.long()
    t_kept = logprobs.detach().to(dtype)
    valid = t_kept > NEG_INF

    z = student_logits.to(dtype)
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [N, 1]
    s_kept = (z.gather(1, idx) - lse).masked_fill(~valid, NEG_INF)

    # Mask of kept (valid) vocabulary entries; padding is routed to a dummy column V and dropped.
    kept = torch.zeros(n, v + 1, dtype=torch.bool, device=z.device)
    kept.scatter_(1, torch.where(valid, idx, v), True)
    rest = z.masked_fill(kept[:, :v], NEG_INF)
    # logsumexp over an all -inf row has a NaN gradient; give such rows a dummy 0 and put -inf back after.
    has_rest = (rest > NEG_INF).any(dim=-1, keepdim=True)
    rest.masked_fill_(~has_rest, 0.0)  # in place: `rest` is already a fresh [N, V] copy, avoid another
    rest_lse = torch.logsumexp(rest, dim=-1, keepdim=True)
    s_tail = torch.where(has_rest, rest_lse - lse, NEG_INF)

    t_log = torch.cat([t_kept, tail_logmass.detach().to(dtype).unsqueeze(1)], dim=1)
    s_log = torch.cat([s_kept, s_tail], dim=1)
    return t_log, s_log


def _bins(
    indices: Tensor, logprobs: Tensor, tail_logmass: Tensor, student_logits: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Coarsened (t_log, s_log) with both-zero bins replaced by 0.0 (so no -inf - -inf), plus their mask."""
    t_log, s_log = coarsened_logprobs(indices, logprobs, tail_logmass, student_logits, temperature)
    live = (t_log > NEG_INF) | (s_log > NEG_INF)
    return t_log.masked_fill(~live, 0.0), s_log.masked_fill(~live, 0.0), live


def _plogp_ratio(log_p: Tensor, log_r: Tensor) -> Tensor:
    """Elementwise p * (log p - log r), 0 where p = 0, with finite gradients there."""
    zero = log_p == NEG_INF
    lp = log_p.masked_fill(zero, 0.0)
    lr = log_r.masked_fill(zero, 0.0)
    return torch.where(zero, 0.0, lp.exp() * (lp - lr))


def _log_mix(weight: float, log_a: Tensor, log_b: Tensor) -> Tensor:
    """log(weight * a + (1 - weight) * b) for 0 < weight < 1; finite if either a or b > 0."""
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def _sum_live(terms: Tensor, live: Tensor) -> Tensor:
    return torch.where(live, terms, 0.0).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------


def forward_kl(
    indices: Tensor, logprobs: Tensor, tail_logmass: Tensor, student_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """KL(p || q) on the k + 1 bins (Hinton et al. 2015 KD; Eq. 1 of B-Distill) -> [N].

    In sampled mode (tail -inf, logprobs = log(count / n)) its cross-entropy part -sum p^ log q is an unbiased
    estimate of the full-vocabulary cross-entropy.
    """
    t, s, live = _bins(indices, logprobs, tail_logmass, student_logits, temperature)
    return _sum_live(_plogp_ratio(t, s), live)


def reverse_kl(
    indices: Tensor,
    logprobs: Tensor,
    tail_logmass: Tensor,
    student_logits: Tensor,
    temperature: float = 1.0,
    teacher_log_floor: float = DEFAULT_TEACHER_LOG_FLOOR,
) -> Tensor:
    """KL(q || p) on the k + 1 bins (MiniLLM's objective, off-policy here) -> [N].

    Teacher log-probs are floored at ``teacher_log_floor``: reverse KL is +inf wherever the student has mass
    and the teacher has none (the tail bin in sampled mode), and the floor keeps it finite with a gradient
    that still pushes student mass off such bins.
    """
    floor = _real(teacher_log_floor, "teacher_log_floor")
    t, s, live = _bins(indices, logprobs, tail_logmass, student_logits, temperature)
    return _sum_live(_plogp_ratio(s, t.clamp_min(floor)), live)


def skew_forward_kl(
    indices: Tensor,
    logprobs: Tensor,
    tail_logmass: Tensor,
    student_logits: Tensor,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """Skew KL of DistiLLM (Ko et al. 2024): KL(p || alpha p + (1 - alpha) q), alpha in (0, 1) -> [N]."""
    alpha = _open_unit(alpha, "alpha", "alpha = 0 is forward_kl and alpha = 1 is identically 0")
    t, s, live = _bins(indices, logprobs, tail_logmass, student_logits, temperature)
    return _sum_live(_plogp_ratio(t, _log_mix(alpha, t, s)), live)


def skew_reverse_kl(
    indices: Tensor,
    logprobs: Tensor,
    tail_logmass: Tensor,
    student_logits: Tensor,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """Skew reverse KL of DistiLLM: KL(q || alpha q + (1 - alpha) p), alpha in (0, 1) -> [N].

    Finite even where the teacher has no mass (the mixture contains alpha q).
    """
    alpha = _open_unit(alpha, "alpha", "alpha = 0 is reverse_kl and alpha = 1 is identically 0")
    t, s, live = _bins(indices, logprobs, tail_logmass, student_logits, temperature)
    return _sum_live(_plogp_ratio(s, _log_mix(alpha, s, t)), live)


def generalized_jsd(
    indices: Tensor,
    logprobs: Tensor,
    tail_logmass: Tensor,
    student_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Generalised JSD of GKD (Agarwal et al. 2024) -> [N].

    JSD_beta(p || q) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, beta in (0, 1);
    beta = 0.5 is the usual Jensen-Shannon divergence. (Both endpoints are identically 0 in this
    parametrisation; TRL's GKDTrainer uses a different one where beta = 0 / 1 mean forward / reverse KL.)
    """
    beta = _open_unit(beta, "beta", "use forward_kl / reverse_kl for the KL limits")
    t, s, live = _bins(indices, logprobs, tail_logmass, student_logits, temperature)
    m = _log_mix(beta, t, s)
    return _sum_live(beta * _plogp_ratio(t, m) + (1 - beta) * _plogp_ratio(s, m), live)


def ab_divergence(
    indices: Tensor,
    logprobs: Tensor,
    tail_logmass: Tensor,
    student_logits: Tensor,
    alpha: float = DEFAULT_AB_ALPHA,
    beta: float = DEFAULT_AB_BETA,
    temperature: float = 1.0,
    teacher_log_floor: float = DEFAULT_TEACHER_LOG_FLOOR,
) -> Tensor:
    """Alpha-beta divergence D_AB^(alpha, beta)(p || q) of ABKD (Wang et al. 2025) -> [N].

    D = -1 / (a b) * sum(p^a q^b - a / (a + b) p^(a+b) - b / (a + b) q^(a+b)) for a, b != 0, with the
    continuous limits of Cichocki, Cruces & Amari (2011):
        b = 0:      1 / a^2 * sum(p^a log(p^a / q^a) - p^a + q^a)     (a = 1: forward KL)
        a = 0:      1 / b^2 * sum(q^b log(q^b / p^b) - q^b + p^b)     (b = 1: reverse KL)
        a = b = 0:  1 / 2 * sum((log p - log q)^2)
    Requires a, b >= 0: a negative exponent turns every zero-probability bin into +inf. Defaults
    (a, b) = (0.2, 0.7). When a = 0 the teacher's log-probs are floored at ``teacher_log_floor`` (as in
    reverse_kl), since those forms take log p.
    """
    a = _real(alpha, "alpha")
    b = _real(beta, "beta")
    if a < 0 or b < 0:
        raise ValueError(
            f"ab_divergence needs alpha >= 0 and beta >= 0, got alpha={a}, beta={b}; negative "
            "exponents make zero-probability bins (padding, tails) infinite"
        )
    floor = _real(teacher_log_floor, "teacher_log_floor")
    t, s, live = _bins(indices, logprobs, tail_logmass, student_logits, temperature)
    if a == 0:
        t = t.clamp_min(floor)
    if a != 0 and b != 0:
        terms = (
            torch.exp(a * t + b * s)
            - a / (a + b) * torch.exp((a + b) * t)
            - b / (a + b) * torch.exp((a + b) * s)
        ) / (-a * b)
    elif b == 0 and a != 0:
        # p^a log(p^a / q^a) is _plogp_ratio on the scaled logs a*log p, a*log q.
        terms = (_plogp_ratio(a * t, a * s) - torch.exp(a * t) + torch.exp(a * s)) / a**2
    elif a == 0 and b != 0:
        terms = (_plogp_ratio(b * s, b * t) - torch.exp(b * s) + torch.exp(b * t)) / b**2
    else:
        terms = 0.5 * (t - s).pow(2)
    return _sum_live(terms, live)


def sft_loss(student_logits: Tensor, target_ids: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-position cross-entropy -log q(target) (Eq. 2) -> [N]; positions with ``ignore_index`` give 0."""
    if student_logits.dim() != 2 or target_ids.shape != student_logits.shape[:1]:
        raise ValueError(
            f"expected student_logits [N, V] and target_ids [N], got "
            f"{tuple(student_logits.shape)} and {tuple(target_ids.shape)}"
        )
    logits = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    return F.cross_entropy(logits, target_ids.long(), reduction="none", ignore_index=ignore_index)


TOKEN_LOSSES: dict[str, SparseLoss] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "generalized_jsd": generalized_jsd,
    "ab_divergence": ab_divergence,
}
