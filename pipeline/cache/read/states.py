"""Reading schema-2 expert states (pipeline/cache/format/codecs.py): decode the stored rows, re-aggregate
W -> E_S in coefficient space when low rank, and put subsampled rows back at their tokens.

Per-token output (rows [lo, hi) of a shard, aligned with the other per-token arrays):
  states_space "full":      expert_states        float32 [n, P', E_S, D]
  states_space "subspace":  expert_state_coeffs  float32 [n, P', E_S, q]  (h~ = V c~, V from `group_basis`)
  token fraction < 1:       expert_state_mask    bool    [n]  (rows without states are zero: the MC term
                                                               averages over the masked tokens only)
`decode_sample` reads the held-out fidelity sample (pipeline/cache/format/side_files.py) the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline.cache.format.codecs import (
    GroupBasis,
    StateBasis,
    StatesCodec,
    aggregate_coefficients,
    expand_group,
)
from pipeline.cache.format.codecs import group_basis as _group_basis
from pipeline.cache.format.side_files import BASIS_FILES, FidelitySample, read_basis
from pipeline.errors import CacheError
from pipeline.models.alignment import aggregate_expert_states

STATES_SPACES = ("full", "subspace")

_BASES: dict[tuple[str, str], StateBasis] = {}  # (cache path, u sha256) -> basis: once per process
_LOCK = threading.Lock()


def cache_basis(path: str, manifest: dict[str, Any]) -> StateBasis:
    """The cache's basis, read and checked once per process."""
    record = manifest.get("state_basis") or {}
    token = (path, str(record.get("files", {}).get(BASIS_FILES["u"], {}).get("sha256")))
    with _LOCK:
        if token not in _BASES:
            _BASES[token] = read_basis(path, manifest)
        return _BASES[token]


def group_basis_for(
    path: str, manifest: dict[str, Any], positions: list[int], num_student_experts: int
) -> GroupBasis:
    """V, V^T U_j, V^T mean_j for the layer pairs at `positions` of the cached axis, at E_S experts."""
    return _group_basis(cache_basis(path, manifest).select(positions), num_student_experts)


def read_states(
    states: StatesCodec,
    read: Callable[[str, slice], np.ndarray],
    read_rows: Callable[[], np.ndarray],
    lo: int,
    hi: int,
    gates_w: torch.Tensor | None,
    num_student_experts: int,
    width: int,
    basis: Callable[[], GroupBasis],
    space: str,
) -> dict[str, np.ndarray]:
    """Expert states of shard rows [lo, hi) (see the module docstring). read(name, rows): an array's stored
    rows for the requested layers; read_rows(): the shard's expert_state_rows; gates_w: W-width gates of
    rows [lo, hi) (None when E_S = W); basis(): the group basis (low rank only)."""
    if space not in STATES_SPACES:
        raise CacheError(
            f"states space {space!r} is unknown. Fix: set distill.mc_state_space to full or subspace."
        )
    if space == "subspace" and states.rank is None:
        raise CacheError(
            "distill.mc_state_space: subspace needs a low-rank cache, but this one stores full states. Fix: "
            "use mc_state_space: full, or rebuild the cache with cache.states_rank set."
        )
    if states.subsampled:
        kept = read_rows()
        a, b = (int(i) for i in np.searchsorted(kept, [lo, hi]))
        local = torch.from_numpy(kept[a:b].astype(np.int64) - lo)
    else:
        a, b, local = lo, hi, None
    decoded = states.decode(
        read("expert_states", slice(a, b)),
        read("expert_state_scales", slice(a, b)) if states.scaled else None,
    )
    gates = gates_w if gates_w is None or local is None else gates_w[local]
    if states.rank is None:
        if num_student_experts != width:
            assert gates is not None
            decoded = aggregate_expert_states(gates, decoded, num_student_experts)
        name, value = "expert_states", decoded
    else:
        gb = basis()
        c_tilde = aggregate_coefficients(gates, decoded, gb)
        name, value = (
            ("expert_state_coeffs", c_tilde)
            if space == "subspace"
            else ("expert_states", expand_group(c_tilde, gb))
        )
    if local is None:
        return {name: value.numpy()}
    full = torch.zeros((hi - lo, *value.shape[1:]), dtype=value.dtype)
    full[local] = value
    mask = np.zeros(hi - lo, dtype=bool)
    mask[local.numpy()] = True
    return {name: full.numpy(), "expert_state_mask": mask}


def decode_sample(
    cache_url: str, manifest: dict[str, Any], sample: FidelitySample
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache's reader makes of the held-out fidelity sample's encoded rows at the cached width:
    (states float32 [n, P, W, D], zeros where token subsampling dropped them; keep bool [n])."""
    inputs = manifest["key_inputs"]
    states = StatesCodec.from_key_inputs(inputs.get("states_codec"), inputs["dtypes"]["expert_states"])
    width, n, a = int(inputs["width"]), sample.num_tokens, sample.arrays
    positions = list(range(len(inputs["cached_layers"])))
    out = read_states(
        states,
        lambda name, rows: a[name][rows],
        lambda: a["expert_state_rows"],
        0,
        n,
        None,
        width,
        width,
        lambda: group_basis_for(cache_url, manifest, positions, width),
        "full",
    )
    keep = out.get("expert_state_mask", np.ones(n, dtype=bool))
    return torch.from_numpy(out["expert_states"]), torch.from_numpy(keep)
