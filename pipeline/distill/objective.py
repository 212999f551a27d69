"""B-Distill Eq. 13 and the baselines as one objective: L = L_SFT + L_token + l1 L_MC + l2 L_ERD.

Layer terms are summed over layer pairs and averaged over response tokens (docs/method.md). Every term is
logged separately (`loss_<term>`, unweighted), plus the student's gate entropy and per-expert load shares
per paired layer. `objective_terms` hands out the weighted terms themselves, for the gradient diagnostics
(pipeline.distill.diagnostics). A preset with `formulas = "released"` (b-distill-official) swaps the layer
terms for the released code's router terms (`released_terms`) and its fixed weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.config import DistillConfig
from pipeline.distill.losses import (
    double_softmax_erd_loss,
    erd_loss,
    mc_exploration_loss,
    router_mc_loss,
)
from pipeline.distill.methods import MethodSpec
from pipeline.distill.student import StudentForward, gate_entropy
from pipeline.distill.token_losses import TOKEN_LOSSES, sft_loss
from pipeline.errors import ConfigError

# The released code's fixed weights (b-distill-official): 0.8 SFT + 0.1 token KD + 0.1 expert terms, and
# 0.5 for the coverage KL inside the expert terms.
RELEASED_WEIGHTS = {"sft": 0.8, "token": 0.1, "expert": 0.1}
RELEASED_COVERAGE_WEIGHT = 0.5


def lambda_mc_at(distill: DistillConfig, step: int) -> float:
    """lambda_1 at optimizer step `step` (0-based): a linear ramp from 0 over lambda_mc_warmup_steps."""
    warmup = distill.lambda_mc_warmup_steps
    return distill.lambda_mc * (min(1.0, step / warmup) if warmup > 0 else 1.0)


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
    terms are on (its token_loss_kwargs already hold any distill.token_loss_kwargs, see `method_for`).

    Low-rank and subsampled caches: with weights.mc_state_space "subspace" the batch holds
    expert_state_coeffs [N', P, E, q] over `state_basis` V [P, E, D, q] instead of expert_states; with an
    expert_state_mask [N] (a token-subsampled cache) the state rows are those of the masked tokens only
    (N' = mask.sum(), see DistillTask.collate) and the MC term is their mean."""
    logits = forward.logits[token_mask].float()  # [N, V]
    next_tokens = batch["input_ids"][:, 1:][token_mask[:, :-1]]
    terms: dict[str, Tensor] = {}
    metrics: dict[str, float] = {"tokens": float(logits.shape[0])}
    if method.uses_sft:
        terms["sft"] = sft_loss(logits, next_tokens).mean()
    if method.token_loss is not None:
        token_fn = TOKEN_LOSSES[method.token_loss]
        terms[method.token_loss] = token_fn(
            batch["logit_indices"],
            batch["logit_values"].float(),
            batch["logit_tail_logmass"].float(),
            logits,
            temperature=weights.temperature,
            **method.token_loss_kwargs,
        ).mean()
    for pair, p_student in enumerate(forward.router_probs):
        metrics[f"gate_entropy/pair{pair}"] = float(gate_entropy(p_student.detach()))
        for expert, share in enumerate(p_student.detach().mean(0).tolist()):
            metrics[f"load/pair{pair}/e{expert}"] = share
    if method.formulas == "released":
        terms.update(released_terms(weights, forward, batch, token_mask, generator))
        expert = RELEASED_WEIGHTS["expert"]
        scale = {
            "sft": RELEASED_WEIGHTS["sft"],
            str(method.token_loss): RELEASED_WEIGHTS["token"],
            "router_mc": expert,
            "coverage_kl": expert * RELEASED_COVERAGE_WEIGHT,
            "released_erd": expert,
        }
    else:
        terms.update(_layer_terms(method, weights, forward, batch, generator, state_basis))
        if method.uses_mc and "expert_state_mask" in batch:
            metrics["state_tokens"] = float(batch["expert_state_mask"].sum())
        scale = {"mc": lambda_mc_at(weights, step), "erd": weights.lambda_erd}
        if method.uses_mc and weights.lambda_mc_warmup_steps > 0:
            metrics["lambda_mc"] = scale["mc"]
    for name, value in terms.items():
        metrics[f"loss_{name}"] = float(value.detach())
    return {name: scale.get(name, 1.0) * value for name, value in terms.items()}, metrics


def _layer_terms(
    method: MethodSpec,
    weights: DistillConfig,
    forward: StudentForward,
    batch: dict[str, Tensor],
    generator: torch.Generator | None,
    state_basis: Tensor | None = None,
) -> dict[str, Tensor]:
    """Eq. 13's layer terms, unweighted: MC (Eq. 8) and ERD (Eq. 12) summed over layer pairs."""
    terms: dict[str, Tensor] = {}
    targets, basis = _mc_targets(weights, batch, state_basis) if method.uses_mc else ("", None)
    # Subsampled cache: the MC term on the tokens that carry states only (an unbiased mean over them).
    rows = batch["expert_state_mask"].nonzero().squeeze(1) if "expert_state_mask" in batch else None
    for pair, p_student in enumerate(forward.router_probs):
        if method.uses_mc:
            p_teacher, h_student = batch["gates"][:, pair], forward.projected_states[pair]
            if rows is not None:
                p_teacher, h_student = p_teacher[rows], h_student[rows]
            per_token = mc_exploration_loss(
                p_teacher.float(),
                batch[targets][:, pair].float(),
                h_student.float(),
                weights.k,
                weights.alpha,
                generator=generator,
                state_loss=weights.mc_state_loss,
                allow_without_replacement=True,
                basis=None if basis is None else basis[pair],
            )
            # No state-carrying token in this micro-batch: a zero that is still attached to the graph.
            mc = per_token.mean() if per_token.numel() else per_token.sum()
            terms["mc"] = terms["mc"] + mc if "mc" in terms else mc
        if method.uses_erd:
            erd = erd_loss(batch["gates"][:, pair].float(), p_student.float(), weights.beta).mean()
            terms["erd"] = terms["erd"] + erd if "erd" in terms else erd
    return terms


def _mc_targets(
    weights: DistillConfig, batch: dict[str, Tensor], state_basis: Tensor | None
) -> tuple[str, Tensor | None]:
    """The batch column holding the MC targets and the basis they are expressed in (None: full states)."""
    if weights.mc_state_space == "full":
        return "expert_states", None
    if state_basis is None or "expert_state_coeffs" not in batch:
        raise ConfigError(
            "distill.mc_state_space: subspace needs the cache's coefficients and basis (a low-rank cache, "
            "read with states_space='subspace'). Fix: set distill.mc_state_space: full, or train from a "
            "cache built with cache.states_rank set (a caller passing neither is a bug)."
        )
    return "expert_state_coeffs", state_basis


def released_terms(
    weights: DistillConfig,
    forward: StudentForward,
    batch: dict[str, Tensor],
    token_mask: Tensor,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The released code's expert terms on the last layer pair, unweighted: router-MC cross-entropy,
    coverage KL and twice-softmaxed router distillation (objective_terms weights them 0.1, 0.05, 0.1)."""
    last = len(forward.router_probs) - 1
    p_teacher = batch["gates"][:, last].float()
    p_student = forward.router_probs[last].float()
    cross_entropy, coverage = router_mc_loss(p_teacher, p_student, weights.k, weights.alpha, generator)
    erd = double_softmax_erd_loss(p_teacher, p_student, weights.beta, num_sequences=token_mask.shape[0])
    return {"router_mc": cross_entropy, "coverage_kl": coverage, "released_erd": erd}
