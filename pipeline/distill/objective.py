"""B-Distill Eq. 13 and the baselines as one objective: L = L_SFT + L_token + l1 L_MC + l2 L_ERD.

Layer terms are summed over layer pairs and averaged over response tokens (DESIGN.md). Every term is
logged separately, plus the student's gate entropy and per-expert load shares per paired layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.distill.losses import erd_loss, mc_exploration_loss
from pipeline.distill.methods import MethodSpec
from pipeline.distill.student import StudentForward, gate_entropy
from pipeline.distill.token_losses import TOKEN_LOSSES, sft_loss


@dataclass(frozen=True)
class ObjectiveWeights:
    k: int = 3
    alpha: float = 0.2
    beta: float = 0.1
    lambda_mc: float = 1.0
    lambda_erd: float = 1.0
    temperature: float = 1.0


def distill_objective(
    method: MethodSpec,
    weights: ObjectiveWeights,
    forward: StudentForward,
    batch: dict[str, Tensor],
    token_mask: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Total loss and its parts for one micro-batch. `token_mask` [B, T] selects the distillation positions;
    the batch's per-token targets (logit_*, gates [N, P, E], expert_states [N, P, E, D]) are in that order."""
    logits = forward.logits[token_mask].float()  # [N, V]
    next_tokens = batch["input_ids"][:, 1:][token_mask[:, :-1]]
    total = logits.new_zeros(())
    metrics: dict[str, float] = {"tokens": float(logits.shape[0])}
    if method.uses_sft:
        sft = sft_loss(logits, next_tokens).mean()
        total = total + sft
        metrics["loss_sft"] = float(sft.detach())
    if method.token_loss is not None:
        token_fn = TOKEN_LOSSES[method.token_loss]
        token = token_fn(
            batch["logit_indices"],
            batch["logit_values"].float(),
            batch["logit_tail_logmass"].float(),
            logits,
            temperature=weights.temperature,
            **method.token_loss_kwargs,
        ).mean()
        total = total + token
        metrics[f"loss_{method.token_loss}"] = float(token.detach())
    mc_sum = logits.new_zeros(())
    erd_sum = logits.new_zeros(())
    for pair, p_student in enumerate(forward.router_probs):
        if method.uses_mc:
            mc_sum = (
                mc_sum
                + mc_exploration_loss(
                    batch["gates"][:, pair].float(),
                    batch["expert_states"][:, pair].float(),
                    forward.projected_states[pair].float(),
                    weights.k,
                    weights.alpha,
                    generator=generator,
                ).mean()
            )
        if method.uses_erd:
            erd_sum = (
                erd_sum + erd_loss(batch["gates"][:, pair].float(), p_student.float(), weights.beta).mean()
            )
        metrics[f"gate_entropy/pair{pair}"] = float(gate_entropy(p_student.detach()))
        for expert, share in enumerate(p_student.detach().mean(0).tolist()):
            metrics[f"load/pair{pair}/e{expert}"] = share
    if method.uses_mc:
        total = total + weights.lambda_mc * mc_sum
        metrics["loss_mc"] = float(mc_sum.detach())
    if method.uses_erd:
        total = total + weights.lambda_erd * erd_sum
        metrics["loss_erd"] = float(erd_sum.detach())
    metrics["loss"] = float(total.detach())
    return total, metrics
