"""Mass-truncated expert states (`cache.states_mass` m < 1): per token and per cached expert group, only the
teacher experts that carry the top m of the group's router mass are computed, and the group's state is their
p-weighted mean renormalised inside the group:

    h~_e = sum_{j in S_e} p_j h_j / sum_{j in S_e} p_j,
    S_e  = the fewest experts of group e, largest p first, whose mass reaches m * p~_e

m = 1 is the exact state (every expert of the group), which callers compute with the all-expert path
(`aggregate_expert_states`), so an exact cache's bytes never depend on this module.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.models.alignment import aggregate_expert_states, expert_mapping
from pipeline.models.moe_blocks import MoEBlockView


def check_states_mass(mass: float) -> list[str]:
    """Problems of a states_mass setting (empty when valid)."""
    if not 0.0 < float(mass) <= 1.0:
        return [f"states_mass={mass} must be in (0, 1] (1 = exact states: every expert's output)"]
    return []


def _group_index(num_experts: int, width: int, device: torch.device) -> Tensor:
    """[W, G] teacher-expert indices of each group (pi(j) = e), padded with E (a zero-mass dummy column)."""
    pi = expert_mapping(num_experts, width).to(device)
    size = int(torch.bincount(pi, minlength=width).max())
    rank = torch.arange(num_experts, device=device) - torch.searchsorted(pi, pi)  # position inside its group
    index = torch.full((width, size), num_experts, dtype=torch.long, device=device)
    index[pi, rank] = torch.arange(num_experts, device=device)
    return index


def mass_selection(probs: Tensor, width: int, mass: float) -> Tensor:
    """[N, E] bool: expert j is computed for token n (see the module docstring). A group with zero mass
    keeps nothing (its state is the zero state, as in aggregate_expert_states)."""
    n, num_experts = probs.shape
    p = torch.cat([probs.float(), probs.new_zeros(n, 1, dtype=torch.float32)], dim=1)
    index = _group_index(num_experts, width, probs.device)
    grouped = p[:, index]  # [N, W, G]
    sorted_p, order = torch.sort(grouped, dim=-1, descending=True, stable=True)
    cum = torch.cumsum(sorted_p, dim=-1)
    before = cum - sorted_p  # mass of the larger experts of the group
    keep_sorted = (before < mass * cum[..., -1:]) & (sorted_p > 0)
    keep_grouped = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    keep = torch.zeros(n, num_experts + 1, dtype=torch.bool, device=probs.device)
    keep[:, index.reshape(-1)] = keep_grouped.reshape(n, -1)
    return keep[:, :num_experts]


def truncated_states(
    view: MoEBlockView, x: Tensor, logits: Tensor, probs: Tensor, width: int, mass: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(states [N, W, D], kept mass [N], computed experts [N]) of MoE inputs x [N, H] at mass m: only the
    selected (token, expert) pairs run, batched per expert (MoEBlockView.routed_outputs)."""
    keep = mass_selection(probs, width, mass)
    tokens, experts = keep.nonzero(as_tuple=True)
    outputs = view.routed_outputs(x, tokens, experts, logits)
    dense = outputs.new_zeros(*keep.shape, outputs.shape[-1])
    dense[tokens, experts] = outputs
    kept_p = torch.where(keep, probs.float(), 0.0)
    # Zero p outside S_e: the group weights p_j / sum_{S_e} p renormalise inside the group.
    states = aggregate_expert_states(kept_p, dense.float(), width)
    return states, kept_p.sum(-1), keep.sum(-1)
