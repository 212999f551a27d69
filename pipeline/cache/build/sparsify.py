"""Sparse teacher distributions for the cache: top-k entries + the tail's log-mass, or importance samples.

The token-level KD losses (pipeline.distill.token_losses) read exactly this format; the teacher service scores
with the same functions, so a cached target and a served one are identical.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------
# Sparsification (called by the teacher cache stage)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def topk_sparsify(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k sparse teacher distribution at T = 1: (indices [N, k] long, logprobs [N, k], tail [N]), fp32.

    ``tail`` is log(1 - kept mass), computed exactly as a logsumexp over the other tokens (-inf when k = V).
    """
    if teacher_logits.dim() != 2 or not teacher_logits.is_floating_point():
        raise ValueError(
            f"teacher_logits must be a floating tensor [N, V], got {tuple(teacher_logits.shape)}. Fix: pass "
            "the teacher's logits at the distillation positions, flattened to [N, V]."
        )
    v = teacher_logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= v:
        raise ValueError(f"k must be an integer in [1, V={v}], got {k!r}. Fix: set cache.logits_k to 1..{v}.")
    logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    values, indices = logp.topk(int(k), dim=-1)
    tail = torch.logsumexp(logp.scatter(1, indices, NEG_INF), dim=-1)  # all -inf row -> -inf (no grad here)
    return indices, values, tail


@torch.no_grad()
def sample_sparsify(
    teacher_logits: Tensor, num_samples: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Random-sampling KD target: draw ``num_samples`` tokens with replacement from p (T = 1) per row.

    Returns (indices [N, num_samples] long, logprobs [N, num_samples] fp32, tail [N] = -inf): the distinct
    drawn tokens in increasing id order with logprob log(count / num_samples), then padding (index 0, logprob
    -inf) up to the fixed width. The weights sum to 1, and E[count / n] = p, so a forward-KL cross-entropy on
    these targets is unbiased for the full one.
    """
    if teacher_logits.dim() != 2 or not teacher_logits.is_floating_point():
        raise ValueError(
            f"teacher_logits must be a floating tensor [N, V], got {tuple(teacher_logits.shape)}. Fix: pass "
            "the teacher's logits at the distillation positions, flattened to [N, V]."
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        raise ValueError(
            f"num_samples must be a positive integer, got {num_samples!r}. Fix: set cache.logits_k >= 1."
        )
    n_rows, width = teacher_logits.shape[0], int(num_samples)
    device = teacher_logits.device
    if n_rows == 0:
        return (
            torch.zeros(0, width, dtype=torch.long, device=device),
            torch.zeros(0, width, device=device),
            torch.zeros(0, device=device),
        )
    probs = torch.softmax(teacher_logits.float(), dim=-1)
    draws = torch.multinomial(probs, width, replacement=True, generator=generator).sort(dim=1).values
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    group = first.long().cumsum(dim=1) - 1  # slot of each draw's distinct token, 0..width-1
    ones = torch.ones(n_rows, width, device=device)
    counts = torch.zeros(n_rows, width, device=device).scatter_add_(1, group, ones)
    indices = torch.zeros_like(draws).scatter_(1, group, draws)  # equal values per slot: deterministic
    logprobs = torch.where(counts > 0, (counts / width).log(), NEG_INF)
    return indices, logprobs, torch.full((n_rows,), NEG_INF, device=device)


def sparsify_logits(
    logits: torch.Tensor, mode: str, k: int, seeds: Sequence[int], counts: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse teacher distribution for rows of `logits` [N, V] -> (indices [N,k], logprobs [N,k], tail [N]).

    Sampled mode draws per sequence from a generator seeded by its seq_id, so the draws do not depend on how
    sequences are grouped into micro-batches.
    """
    logits = logits.float()
    if mode == "topk":
        return topk_sparsify(logits, k)
    parts = []
    for rows, seed in zip(torch.split(logits, list(counts)), seeds, strict=True):
        gen = torch.Generator(device=logits.device).manual_seed(int(seed))
        parts.append(sample_sparsify(rows, k, generator=gen))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]
