"""Loss-term gradient diagnostics: which term of a multi-term objective moves which part of the student.

For every term (as weighted in the total loss) and every parameter group of a ``DistillStudent``:

* ``grad/<term>/<group>/norm``: the L2 norm of that term's gradient on the group's parameters;
* ``grad/<term>/<group>/cos_rest``: the cosine between that gradient and the sum of the other terms'
  gradients on the same group (-1: the term fights the rest, 0: orthogonal, 1: aligned; NaN where either
  gradient is zero, e.g. the SFT term on the projections P).

Group ``all`` is the whole model. Gradients are taken with ``torch.autograd.grad`` on each term separately,
from the graph of the step's own forward (no extra forward): one extra backward per term, and one gradient
copy per term held at once, so call it on logging steps only (on the demo student a step with four terms
and diagnostics took about 4x a plain step: some 15% more training time at log_every 20, which is why
`distill.diagnostics` is off by default). They are this worker's micro-batch gradients before any
data-parallel averaging (enough to compare terms; the norms of a multi-worker step's averaged gradient are
smaller). The distill task skips them under multi-worker FSDP, whose parameters are sharded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

#: Parameter groups, in report order. "norms" holds the RMSNorm scales, which belong to no other group.
PARAMETER_GROUPS = ("embeddings", "attention", "routers", "experts", "projections", "lm_head", "norms")
ALL = "all"


def parameter_group(name: str) -> str:
    """The group of a ``DistillStudent`` parameter, from its name (a DDP ``module.`` prefix is fine)."""
    parts = name.split(".")
    if "projections" in parts[:2]:  # DistillStudent.projections (P), not a submodule named so
        return "projections"
    if "embed_tokens" in parts:
        return "embeddings"
    if "lm_head" in parts:
        return "lm_head"
    if "self_attn" in parts:
        return "attention"
    if "mlp" in parts:
        after = parts[parts.index("mlp") + 1] if parts.index("mlp") + 1 < len(parts) else ""
        if after == "experts":
            return "experts"
        if after == "gate":
            return "routers"
    return "norms"


def grouped_parameters(model: nn.Module) -> dict[str, list[Tensor]]:
    """Trainable parameters by group (groups with none left out; tied weights counted once)."""
    groups: dict[str, list[Tensor]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(parameter_group(name), []).append(param)
    return {g: groups[g] for g in PARAMETER_GROUPS if g in groups}


def term_gradient_metrics(model: nn.Module, terms: Mapping[str, Tensor]) -> dict[str, float]:
    """Per-term, per-group gradient norms and cosines with the other terms (see the module docstring).

    ``terms`` maps a term name to its scalar loss as it enters the total (weights applied), all from one
    forward whose graph must still be alive; the graph is retained for the step's own backward. Returns {}
    for fewer than two terms (nothing to compare).
    """
    if len(terms) < 2:
        return {}
    groups = grouped_parameters(model)
    params = [p for members in groups.values() for p in members]
    grads: list[tuple[Tensor | None, ...]] = []
    for loss in terms.values():
        if loss.requires_grad:
            raw = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            grads.append(tuple(None if g is None else g.detach() for g in raw))
        else:  # a term with no path to the model: zero gradient everywhere
            grads.append((None,) * len(params))
    # Gram matrix of the term gradients per parameter, in fp64: the norms and the dot products with the sum
    # of the other terms follow from it without forming that sum (no cancellation between large vectors).
    n_terms = len(grads)
    device = params[0].device
    gram = torch.zeros(len(params), n_terms, n_terms, dtype=torch.float64, device=device)
    for i in range(n_terms):
        for j in range(i, n_terms):
            dots = torch.stack([_dot(a, b, device) for a, b in zip(grads[i], grads[j], strict=True)])
            gram[:, i, j] = dots
            gram[:, j, i] = dots
    spans: dict[str, slice] = {}
    start = 0
    for group, members in groups.items():
        spans[group] = slice(start, start + len(members))
        start += len(members)
    spans[ALL] = slice(0, len(params))
    per_group = torch.stack([gram[span].sum(0) for span in spans.values()]).tolist()  # one host sync
    metrics: dict[str, float] = {}
    for group, g in zip(spans, per_group, strict=True):
        for i, term in enumerate(terms):
            others = [j for j in range(n_terms) if j != i]
            norm = math.sqrt(max(g[i][i], 0.0))
            rest_norm = math.sqrt(max(sum(g[j][k] for j in others for k in others), 0.0))
            dot = sum(g[i][j] for j in others)
            cos = dot / (norm * rest_norm) if norm > 0 and rest_norm > 0 else math.nan
            metrics[f"grad/{term}/{group}/norm"] = norm
            metrics[f"grad/{term}/{group}/cos_rest"] = max(-1.0, min(1.0, cos)) if cos == cos else cos
    return metrics


def _dot(a: Tensor | None, b: Tensor | None, device: torch.device) -> Tensor:
    if a is None or b is None:
        return torch.zeros((), dtype=torch.float64, device=device)
    return (a.double() * b.double()).sum().to(device)
