"""The loss terms a method preset can name: one function and one `TERMS` entry each (docs/method.md).

A term function takes the micro-batch's `TermInputs` (and the preset's keyword arguments for it) and
returns its unweighted scalar, averaged over distillation positions; a layer term (`per_pair`) is called
once per layer pair and summed over them by the objective. Its `Term` entry declares what it
needs, so nothing else has to know about it: the cache fields the distill stage reads (`reads`), the student
outputs the forward computes (`outputs`: "router_probs", "expert_states"), which part of Eq. 13 it is
(`kind`, what the run name's K/alpha/beta and the student checks go by) and whose formulas it follows.
A preset (pipeline.distill.methods) lists `TermUse`s: a term's name, its weight and its keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from pipeline.config import DistillConfig
from pipeline.distill.losses import double_softmax_erd_loss, erd_loss, mc_exploration_loss, router_mc_loss
from pipeline.distill.token_losses import TOKEN_LOSSES, SparseLoss, sft_loss
from pipeline.errors import ConfigError

if TYPE_CHECKING:  # why: the student module imports transformers; the registry stays importable without it
    from pipeline.distill.student import StudentForward

TermKind = Literal["sft", "token", "mc", "erd"]


@dataclass
class TermInputs:
    """What every term of one micro-batch reads: the student's forward, the batch's cached targets and the
    run's resolved distill settings. `logits` [N, V] and `next_tokens` [N]: at the distillation positions."""

    distill: DistillConfig
    forward: StudentForward
    batch: dict[str, Tensor]
    token_mask: Tensor
    logits: Tensor
    next_tokens: Tensor
    generator: torch.Generator | None = None
    state_basis: Tensor | None = None
    # Results shared by several terms of one micro-batch (the released router MC draws once for two terms).
    shared: dict[str, Any] = field(default_factory=dict)


TermFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Term:
    """A loss term's declaration: its function and what it needs (cache fields, student outputs)."""

    fn: TermFn
    kind: TermKind
    reads: frozenset[str] = frozenset()
    outputs: frozenset[str] = frozenset()
    formulas: Literal["paper", "released"] = "paper"
    # Called once per layer pair as fn(inputs, pair) and summed over the pairs (Eq. 8, Eq. 12).
    per_pair: bool = False


def lambda_mc_at(distill: DistillConfig, step: int) -> float:
    """lambda_1 at optimizer step `step` (0-based): a linear ramp from 0 over lambda_mc_warmup_steps."""
    warmup = distill.lambda_mc_warmup_steps
    return distill.lambda_mc * (min(1.0, step / warmup) if warmup > 0 else 1.0)


# A term's weight is a number or one of these names: a distill setting, read at every step.
WEIGHTS: dict[str, Callable[[DistillConfig, int], float]] = {
    "lambda_mc": lambda_mc_at,
    "lambda_erd": lambda distill, step: distill.lambda_erd,
}


@dataclass(frozen=True)
class TermUse:
    """One line of a preset: the term `name` (a key of TERMS) with its weight and keyword arguments."""

    name: str
    weight: float | str = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def weight_at(self, distill: DistillConfig, step: int) -> float:
        return WEIGHTS[self.weight](distill, step) if isinstance(self.weight, str) else self.weight


def sft_term(x: TermInputs) -> Tensor:
    """L_SFT (Eq. 2): cross-entropy of the dataset response."""
    return sft_loss(x.logits, x.next_tokens).mean()


def token_term(loss: SparseLoss, x: TermInputs, **kwargs: Any) -> Tensor:
    """A token-level KD loss (pipeline.distill.token_losses) against the cached sparse teacher rows."""
    batch = x.batch
    return loss(
        batch["logit_indices"],
        batch["logit_values"].float(),
        batch["logit_tail_logmass"].float(),
        x.logits,
        temperature=x.distill.temperature,
        **kwargs,
    ).mean()


def mc_term(x: TermInputs, pair: int) -> Tensor:
    """L_MC (Eq. 7) of one layer pair: MC expert exploration, averaged over the state-carrying tokens."""
    targets, basis = _mc_targets(x.distill, x.batch, x.state_basis)
    batch = x.batch
    p_teacher, h_student = batch["gates"][:, pair], x.forward.projected_states[pair]
    if "expert_state_mask" in batch:  # subsampled cache: the tokens that carry states only (unbiased mean)
        rows = batch["expert_state_mask"].nonzero().squeeze(1)
        p_teacher, h_student = p_teacher[rows], h_student[rows]
    per_token = mc_exploration_loss(
        p_teacher.float(),
        batch[targets][:, pair].float(),
        h_student.float(),
        x.distill.k,
        x.distill.alpha,
        generator=x.generator,
        state_loss=x.distill.mc_state_loss,
        allow_without_replacement=True,
        basis=None if basis is None else basis[pair],
    )
    # No state-carrying token in this micro-batch: a zero that is still attached to the graph.
    return per_token.mean() if per_token.numel() else per_token.sum()


def erd_term(x: TermInputs, pair: int) -> Tensor:
    """L_ERD (Eq. 10) of one layer pair: entropy-aware router distillation."""
    p_student = x.forward.router_probs[pair]
    return erd_loss(x.batch["gates"][:, pair].float(), p_student.float(), x.distill.beta).mean()


def _mc_targets(
    distill: DistillConfig, batch: dict[str, Tensor], state_basis: Tensor | None
) -> tuple[str, Tensor | None]:
    """The batch column holding the MC targets and the basis they are expressed in (None: full states)."""
    if distill.mc_state_space == "full":
        return "expert_states", None
    if state_basis is None or "expert_state_coeffs" not in batch:
        raise ConfigError(
            "distill.mc_state_space: subspace needs the cache's coefficients and basis (a low-rank cache, "
            "read with states_space='subspace'). Fix: set distill.mc_state_space: full, or train from a "
            "cache built with cache.states_rank set (a caller passing neither is a bug)."
        )
    return "expert_state_coeffs", state_basis


def _released_router_mc(x: TermInputs) -> tuple[Tensor, Tensor]:
    """The released code's router MC on the last layer pair: (cross-entropy, coverage KL), drawn once."""
    if "router_mc" not in x.shared:
        last = len(x.forward.router_probs) - 1
        p_teacher, p_student = x.batch["gates"][:, last].float(), x.forward.router_probs[last].float()
        draws = router_mc_loss(p_teacher, p_student, x.distill.k, x.distill.alpha, x.generator)
        x.shared["router_mc"] = draws
    return x.shared["router_mc"]


def router_mc_term(x: TermInputs) -> Tensor:
    """Released: router-level MC cross-entropy on the drawn experts (last layer pair)."""
    return _released_router_mc(x)[0]


def coverage_kl_term(x: TermInputs) -> Tensor:
    """Released: the coverage KL between the drawn experts' usage (last layer pair)."""
    return _released_router_mc(x)[1]


def released_erd_term(x: TermInputs) -> Tensor:
    """Released: router distillation on twice-softmaxed gates (last layer pair)."""
    last = len(x.forward.router_probs) - 1
    p_teacher, p_student = x.batch["gates"][:, last].float(), x.forward.router_probs[last].float()
    return double_softmax_erd_loss(p_teacher, p_student, x.distill.beta, num_sequences=x.token_mask.shape[0])


_LOGITS = frozenset({"logits"})
_GATES = frozenset({"gates"})
_ROUTERS = frozenset({"router_probs"})
_STATES = frozenset({"expert_states"})

# The one dispatch table of loss terms: a term name (the `loss_<name>` metric) -> its function and needs.
TERMS: dict[str, Term] = {
    "sft": Term(sft_term, "sft"),
    **{name: Term(partial(token_term, loss), "token", reads=_LOGITS) for name, loss in TOKEN_LOSSES.items()},
    "mc": Term(mc_term, "mc", reads=_GATES | {"expert_states"}, outputs=_STATES, per_pair=True),
    "erd": Term(erd_term, "erd", reads=_GATES, outputs=_ROUTERS, per_pair=True),
    "router_mc": Term(router_mc_term, "mc", reads=_GATES, outputs=_ROUTERS, formulas="released"),
    "coverage_kl": Term(coverage_kl_term, "mc", reads=_GATES, outputs=_ROUTERS, formulas="released"),
    "released_erd": Term(released_erd_term, "erd", reads=_GATES, outputs=_ROUTERS, formulas="released"),
}
