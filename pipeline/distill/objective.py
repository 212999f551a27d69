"""B-Distill Eq. 13 and the baselines as one objective: the weighted sum of a preset's loss terms.

A preset (pipeline.distill.methods) lists its terms with their weights; each term's function and needs are
in pipeline.distill.terms.TERMS. Layer terms are summed over layer pairs and every term is averaged over
response tokens (docs/method.md). Every term is logged separately (`loss_<term>`, unweighted), plus the
student's gate entropy and per-expert load shares per paired layer. `objective_terms` hands out the weighted
terms themselves, for the gradient diagnostics (pipeline.distill.diagnostics).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.config import DistillConfig
from pipeline.distill.methods import MethodSpec
from pipeline.distill.student import StudentForward, gate_entropy
from pipeline.distill.terms import TERMS, TermInputs, lambda_mc_at

__all__ = ["combine_terms", "distill_objective", "lambda_mc_at", "objective_terms"]


def distill_objective(
    method: MethodSpec,
    weights: DistillConfig,
    forward: StudentForward,
    batch: dict[str, Tensor],
    token_mask: Tensor,
    generator: torch.Generator | None = None,
    step: int = 0,
    state_basis: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Total loss and its parts for one micro-batch (the sum of `objective_terms`)."""
    return combine_terms(
        *objective_terms(method, weights, forward, batch, token_mask, generator, step, state_basis)
    )


def combine_terms(terms: dict[str, Tensor], metrics: dict[str, float]) -> tuple[Tensor, dict[str, float]]:
    """The total loss of weighted terms, with `loss` added to the metrics."""
    if not terms:
        raise ValueError("a method needs at least one loss term (every preset has the SFT term)")
    total = torch.stack(list(terms.values())).sum()
    metrics["loss"] = float(total.detach())
    return total, metrics


def objective_terms(
    method: MethodSpec,
    weights: DistillConfig,
    forward: StudentForward,
    batch: dict[str, Tensor],
    token_mask: Tensor,
    generator: torch.Generator | None = None,
    step: int = 0,
    state_basis: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The loss terms as they enter the total (weights applied; name -> scalar) and the metrics, whose
    `loss_<name>` are the unweighted values. `token_mask` [B, T] selects the distillation positions; the
    batch's per-token targets (logit_*, gates [N, P, E], expert_states [N, P, E, D]) are in that order.

    `weights` supplies K, alpha, beta, lambda_mc (ramped by `step`, see lambda_mc_at), lambda_erd, the
    temperature and mc_state_loss, already resolved for the method (`resolved_distill`); `method` says which
    terms are on (its token loss's kwargs already hold any distill.token_loss_kwargs, see `method_for`).

    Low-rank and subsampled caches: with weights.mc_state_space "subspace" the batch holds
    expert_state_coeffs [N', P, E, q] over `state_basis` V [P, E, D, q] instead of expert_states; with an
    expert_state_mask [N] (a token-subsampled cache) the state rows are those of the masked tokens only
    (N' = mask.sum(), see DistillTask.collate) and the MC term is their mean."""
    logits = forward.logits[token_mask].float()  # [N, V]
    next_tokens = batch["input_ids"][:, 1:][token_mask[:, :-1]]
    inputs = TermInputs(weights, forward, batch, token_mask, logits, next_tokens, generator, state_basis)
    metrics: dict[str, float] = {"tokens": float(logits.shape[0])}
    for pair, p_student in enumerate(forward.router_probs):
        metrics[f"gate_entropy/pair{pair}"] = float(gate_entropy(p_student.detach()))
        for expert, share in enumerate(p_student.detach().mean(0).tolist()):
            metrics[f"load/pair{pair}/e{expert}"] = share
    if method.needs_expert_states and "expert_state_mask" in batch:
        metrics["state_tokens"] = float(batch["expert_state_mask"].sum())
    scale = {t.name: t.weight_at(weights, step) for t in method.terms}
    if "mc" in scale and weights.lambda_mc_warmup_steps > 0:
        metrics["lambda_mc"] = scale["mc"]
    terms: dict[str, Tensor] = {}
    for use in method.terms:
        if not TERMS[use.name].per_pair:
            terms[use.name] = TERMS[use.name].fn(inputs, **use.kwargs)
    # Layer terms pair by pair, in the preset's order within a pair (the order the sums were always built in).
    for pair in range(len(forward.router_probs)):
        for use in method.terms:
            if TERMS[use.name].per_pair:
                value = TERMS[use.name].fn(inputs, pair, **use.kwargs)
                terms[use.name] = terms[use.name] + value if use.name in terms else value
    for name, value in terms.items():
        metrics[f"loss_{name}"] = float(value.detach())
    return {name: scale[name] * value for name, value in terms.items()}, metrics
