"""Expert-state codecs of the teacher cache: row codecs, low-rank bases, re-aggregation and the subspace
MC distance in coefficient space, and deterministic token subsampling. Pure torch/numpy (no zarr, no Ray):
writers, readers, verify and the benchmark all call this one module.

Row codecs (a row = the last axis: one token x layer pair x expert slot vector, D values or r coefficients):

  float16   2 B/value   |x - x^| <= 2^-11 |x| + 2^-25 elementwise (round to nearest; 2^-25 covers subnormals)
  bfloat16  2 B/value   |x - x^| <= 2^-8 |x| + 2^-134 (stored as its uint16 bit pattern: zarr has no bf16)
  fp8       1 B/value   e4m3 (torch.float8_e4m3fn bits in uint8), one scale s per row with max|x| / s <= 448:
                        |x - x^| <= 2^-4 |x| + 2^-10 s   (3 mantissa bits; 2^-10 s is half the subnormal step)
  int8      1 B/value   symmetric, round to nearest, one scale s per row, max|x| / s <= 127 (bits in uint8):
                        |x - x^| <= s / 2

Scales are stored as float16 (2 B per row, not 4): with low rank a row is only r = 16..64 values, so a float32
scale would add 6-25 % to every row. The scale is rounded *up* to the next float16 before encoding and the
stored value is the one used to encode, so float16 rounding never widens the bounds above (they hold for the
stored s, and s <= (1 + 2^-10) max|x| / qmax for every row with max|x| >= 2^-14 qmax). Non-finite inputs are
refused: a NaN in teacher states is a bug upstream, not something to quantise.

Low rank (per layer pair p and slot w): an orthonormal basis U [D, r] and a mean [D], the sample's top-r
principal directions; coefficients c = U^T (h - mean) are stored with a row codec; h^ = U c + mean (exact when
r = D: the basis is then complete).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.models.alignment import aggregate_expert_states, check_reaggregation, expert_mapping

ROW_CODECS: tuple[str, ...] = ("float16", "bfloat16", "fp8", "int8")
SCALED_CODECS: tuple[str, ...] = ("fp8", "int8")
SCALE_DTYPE = np.float16
_QMAX = {"fp8": 448.0, "int8": 127.0}  # largest finite e4m3fn magnitude; symmetric int8 range


def _check_codec(codec: str) -> None:
    if codec not in ROW_CODECS:
        raise ValueError(
            f"unknown expert-state codec {codec!r}. Fix: set cache.states_codec to one of {list(ROW_CODECS)}."
        )


def payload_dtype(codec: str) -> np.dtype:
    """numpy dtype the payload is stored in (zarr has neither bfloat16 nor float8)."""
    _check_codec(codec)
    return np.dtype({"float16": np.float16, "bfloat16": np.uint16}.get(codec, np.uint8))


def bytes_per_value(codec: str) -> int:
    return payload_dtype(codec).itemsize


def scale_bytes_per_row(codec: str) -> int:
    return SCALE_DTYPE().itemsize if codec in SCALED_CODECS else 0


def encode_rows(x: Tensor, codec: str) -> tuple[np.ndarray, np.ndarray | None]:
    """x [..., n] (any float dtype/device) -> (payload [..., n] in payload_dtype(codec), scales [...] float16
    for fp8/int8 else None)."""
    _check_codec(codec)
    x = x.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            "expert states contain NaN or inf; they cannot be encoded. Fix: check the teacher checkpoint "
            "and its compute dtype -- the cache never stores non-finite states."
        )
    if codec == "float16":
        return x.to(torch.float16).cpu().numpy(), None
    if codec == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16), None
    scales = _row_scales(x, _QMAX[codec])
    y = x / scales.float().unsqueeze(-1)
    if codec == "fp8":
        q = y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        q = torch.round(y).clamp(-127, 127).to(torch.int8).view(torch.uint8)
    return q.cpu().numpy(), scales.cpu().numpy()


def _row_scales(x: Tensor, qmax: float) -> Tensor:
    """float16 scales s >= max|x| / qmax (rounded up); 1 for all-zero rows (decoded exactly whatever s)."""
    amax = x.abs().amax(dim=-1) if x.shape[-1] else torch.zeros(x.shape[:-1])
    want = amax / qmax
    if bool((want > torch.finfo(torch.float16).max).any()):
        raise ValueError(
            f"an expert-state row has max |x| = {float(amax.max()):.3g}, beyond what a float16 scale can "
            "encode. Fix: use cache.states_codec: bfloat16 for this teacher."
        )
    s = want.to(torch.float16)
    up = torch.nextafter(s, torch.tensor(float("inf"), dtype=torch.float16))
    s = torch.where(s.float() < want, up, s)
    return torch.where(amax > 0, s, torch.ones_like(s))


def decode_rows(payload: np.ndarray, scales: np.ndarray | None, codec: str) -> Tensor:
    """Inverse of encode_rows, to float32 (CPU)."""
    _check_codec(codec)
    p = torch.from_numpy(np.ascontiguousarray(payload))
    if codec == "float16":
        return p.float()
    if codec == "bfloat16":
        return p.view(torch.int16).view(torch.bfloat16).float()
    if scales is None:
        raise ValueError(
            f"codec {codec} needs its per-row scales to decode; none were given. Fix: pass the shard's "
            "expert_state_scales rows (a caller bug)."
        )
    q = p.view(torch.float8_e4m3fn).float() if codec == "fp8" else p.view(torch.int8).float()
    return q * torch.from_numpy(np.ascontiguousarray(scales)).float().unsqueeze(-1)


def encode_states(states: Tensor, dtype: str) -> np.ndarray:
    """float tensor -> numpy in the schema-1 storage dtype (bfloat16 as uint16 bits: zarr has no bfloat16)."""
    return encode_rows(states, dtype)[0]


def decode_states(arr: np.ndarray, logical: str) -> Tensor:
    """Inverse of encode_states, to float32."""
    return decode_rows(arr, None, logical)


def error_bound(x: Tensor, codec: str, scales: np.ndarray | None = None) -> Tensor:
    """Elementwise bound on |x - decode(encode(x))| (see the module docstring); scales: the stored ones."""
    _check_codec(codec)
    ax = x.detach().float().abs()
    if codec == "float16":
        return ax * 2.0**-11 + 2.0**-25
    if codec == "bfloat16":
        return ax * 2.0**-8 + 2.0**-134
    if scales is None:
        raise ValueError(
            f"the {codec} error bound depends on the stored per-row scales. Fix: pass the scales encode_rows "
            "returned."
        )
    s = torch.from_numpy(np.ascontiguousarray(scales)).float().unsqueeze(-1)
    if codec == "fp8":
        return ax * 2.0**-4 + s * 2.0**-10
    return (s / 2).expand_as(ax)


# --- low rank -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StateBasis:
    """Per (layer pair, slot) orthonormal bases U [P, W, D, r] and means [P, W, D], float32."""

    u: Tensor
    mean: Tensor

    @property
    def rank(self) -> int:
        return int(self.u.shape[-1])

    def select(self, positions: list[int]) -> StateBasis:
        """The bases of the layer pairs at `positions` of the cached layer axis, in that order."""
        idx = torch.as_tensor(positions, dtype=torch.long)
        return StateBasis(self.u.index_select(0, idx), self.mean.index_select(0, idx))


class BasisAccumulator:
    """Streaming fit of StateBasis: per (p, w) the sum and Gram matrix of the sample in float64, so fitting
    on 65,536 tokens needs O(P W D^2) memory instead of the sample itself (75 GB of fp32 states for a
    28-pair, 4-slot, D = 2560 teacher). The same batches in the same order give the same basis."""

    def __init__(self) -> None:
        self.n = 0
        self.total: Tensor | None = None
        self.gram: Tensor | None = None

    def update(self, states: Tensor) -> None:
        """Add states [n, P, W, D] (any device; accumulated where they are)."""
        x = states.detach().to(torch.float64)
        total, gram = x.sum(dim=0), torch.einsum("npwd,npwe->pwde", x, x)
        self.total = total if self.total is None else self.total + total
        self.gram = gram if self.gram is None else self.gram + gram
        self.n += int(x.shape[0])

    def finish(self, rank: int) -> StateBasis:
        """The top-`rank` principal directions (eigenvectors of the centred Gram matrix, largest first; signs
        fixed so each vector's largest-magnitude entry is positive) and the sample mean."""
        if self.n < 1 or self.total is None or self.gram is None:
            raise ValueError(
                "cannot fit a state basis on an empty sample. Fix: raise cache.states_basis_tokens."
            )
        d = int(self.total.shape[-1])
        if isinstance(rank, bool) or not 1 <= int(rank) <= d:
            raise ValueError(
                f"cache.states_rank={rank} is outside 1..{d} (the teacher hidden size). Fix: set "
                f"cache.states_rank in 1..{d}, or null for full states."
            )
        mean = self.total / self.n
        cov = self.gram - self.n * torch.einsum("pwd,pwe->pwde", mean, mean)
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues; a complete orthonormal basis
        u = vecs[..., -int(rank) :].flip(-1)  # [P, W, D, r]
        pivot = u.abs().argmax(dim=-2, keepdim=True)
        sign = torch.sign(u.gather(-2, pivot))
        u = u * torch.where(sign == 0, torch.ones_like(sign), sign)
        return StateBasis(u.float().cpu().contiguous(), mean.float().cpu().contiguous())


def fit_basis(sample: Tensor, rank: int) -> StateBasis:
    """The basis of one in-memory sample [N, P, W, D] (BasisAccumulator on a single batch)."""
    acc = BasisAccumulator()
    acc.update(sample)
    return acc.finish(rank)


def project(h: Tensor, basis: StateBasis) -> Tensor:
    """c = U^T (h - mean): [..., P, W, D] -> [..., P, W, r]."""
    return torch.einsum("...pwd,pwdr->...pwr", h.float() - basis.mean, basis.u)


def reconstruct(c: Tensor, basis: StateBasis) -> Tensor:
    """h^ = U c + mean: [..., P, W, r] -> [..., P, W, D]."""
    return torch.einsum("...pwr,pwdr->...pwd", c.float(), basis.u) + basis.mean


@dataclass(frozen=True)
class GroupBasis:
    """Targets at width E_S in coefficient form: per (pair, group) an orthonormal V [P, E, D, q] and the
    small maps a = V^T U_j [P, W, q, r], b = V^T mean_j [P, W, q] of each cached slot j into its group's
    basis. q = min(D, m (r + 1)) with m = W / E_S slots per group."""

    v: Tensor
    a: Tensor
    b: Tensor

    @property
    def dim(self) -> int:
        return int(self.v.shape[-1])


def group_basis(basis: StateBasis, num_student_experts: int) -> GroupBasis:
    """V_e = orthonormal basis (reduced QR, float64) of span{U_j, mean_j : j in group e}, computed once per
    cache and E_S; h~_e = V_e c~_e is then exact for every gate-weighted combination of the group's slots."""
    p, w, d, _ = basis.u.shape
    check_reaggregation(w, num_student_experts)
    pi = expert_mapping(w, num_student_experts)
    u, mean = basis.u.double(), basis.mean.double()
    vs, maps_a, maps_b = [], [], []
    for e in range(num_student_experts):
        slots = (pi == e).nonzero().squeeze(1)
        cols = torch.cat([u[:, slots], mean[:, slots].unsqueeze(-1)], dim=-1)  # [P, m, D, r+1]
        cols = cols.permute(0, 2, 1, 3).reshape(p, d, -1)  # [P, D, m(r+1)]
        q, _ = torch.linalg.qr(cols, mode="reduced")  # [P, D, min(D, m(r+1))]
        vs.append(q)
        maps_a.append(torch.einsum("pdq,pmdr->pmqr", q, u[:, slots]))
        maps_b.append(torch.einsum("pdq,pmd->pmq", q, mean[:, slots]))
    a = torch.cat(maps_a, dim=1)  # slots are grouped consecutively (pi is non-decreasing)
    b = torch.cat(maps_b, dim=1)
    return GroupBasis(torch.stack(vs, dim=1).float(), a.float(), b.float())


def aggregate_coefficients(gates_w: Tensor | None, c: Tensor, gb: GroupBasis) -> Tensor:
    """c~_e = sum_{j in e} (p_j / p~_e) (V_e^T U_j c_j + V_e^T mean_j): gates [..., P, W], coefficients
    [..., P, W, r] -> [..., P, E_S, q], never decoding to D per token (aggregate_expert_states does the
    weighting, with its zero-mass guard). At E_S = W there is nothing to weight and the gates may be None."""
    in_group = torch.einsum("pwqr,...pwr->...pwq", gb.a, c.float()) + gb.b
    if gb.v.shape[1] == gb.a.shape[1]:
        return in_group
    if gates_w is None:
        raise ValueError(
            "re-aggregating coefficients to fewer experts needs the W-width gates. Fix: pass the cached "
            "gates (a caller bug)."
        )
    return aggregate_expert_states(gates_w.float(), in_group, int(gb.v.shape[1]))


def expand_group(c_tilde: Tensor, gb: GroupBasis) -> Tensor:
    """h~ = V c~: [..., P, E, q] -> [..., P, E, D]."""
    return torch.einsum("...peq,pedq->...ped", c_tilde, gb.v)


def subspace_sq_distance(s: Tensor, v: Tensor, c: Tensor) -> Tensor:
    """||s - V c||^2 / D without forming V c: (||V^T s - c||^2 + ||s||^2 - ||V^T s||^2) / D.

    s [..., D] (student state projected to D), v [..., D, q] (broadcast over the leading dims), c [..., q].
    The out-of-subspace part ||s||^2 - ||V^T s||^2 is clamped at 0 (>= 0 exactly; rounding can dip it)."""
    vs = torch.einsum("...dq,...d->...q", v, s)
    inside = (vs - c).pow(2).sum(dim=-1)
    outside = (s.pow(2).sum(dim=-1) - vs.pow(2).sum(dim=-1)).clamp_min(0.0)
    return (inside + outside) / s.shape[-1]


# --- token subsampling --------------------------------------------------------------------------------------
_M64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic is what numpy uint64 arrays do)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def token_hash(seq_id: np.ndarray, position: np.ndarray, seed: int) -> np.ndarray:
    """uint64 hash of (seed, seq_id, position), chained through splitmix64: the same on every machine and
    process (unlike Python's hash())."""
    s = np.asarray(seq_id, dtype=np.int64).astype(np.uint64)
    pos = np.asarray(position, dtype=np.int64).astype(np.uint64)
    h = _splitmix64(np.full(np.broadcast(s, pos).shape, np.uint64(int(seed) & _M64), dtype=np.uint64))
    h = _splitmix64(h ^ s)
    return _splitmix64(h ^ pos)


def keep_tokens(seq_id: np.ndarray, position: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Bool mask: which (seq_id, position) tokens keep expert states. position = the token's index among its
    sequence's distillation positions. Kept iff the top 53 bits of the hash, as a uniform in [0, 1), are
    < fraction; fraction 1 keeps every token."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"cache.states_token_fraction={fraction} is outside (0, 1]. Fix: set it in (0, 1] (1 keeps "
            "every token)."
        )
    h = token_hash(seq_id, position, seed)
    if fraction == 1.0:
        return np.ones(h.shape, dtype=bool)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def keep_rows(seq_ids: list[int], num_tokens: list[int], seed: int, fraction: float) -> np.ndarray:
    """keep_tokens for a shard's rows: sequences in order, each with its distillation positions 0..n-1."""
    counts = np.asarray(num_tokens, dtype=np.int64)
    seq = np.repeat(np.asarray(seq_ids, dtype=np.int64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    pos = np.arange(int(counts.sum()), dtype=np.int64) - starts
    return keep_tokens(seq, pos, seed, fraction)


# --- the settings of one cache ------------------------------------------------------------------------------
STATES_SEED = 0  # seed of the basis sample and of token subsampling (recorded in the key and every shard)


@dataclass(frozen=True)
class StatesCodec:
    """How a cache stores expert states: row codec, optional rank, basis sample size, kept token fraction."""

    codec: str = "float16"
    rank: int | None = None
    basis_tokens: int = 65536
    token_fraction: float = 1.0
    seed: int = STATES_SEED

    def problems(self) -> list[str]:
        out = []
        if self.codec not in ROW_CODECS:
            out.append(f"states_codec={self.codec!r} must be one of {list(ROW_CODECS)}")
        if self.rank is not None and (isinstance(self.rank, bool) or int(self.rank) < 1):
            out.append(f"states_rank={self.rank!r} must be a positive integer or null (full hidden size)")
        if int(self.basis_tokens) < 1:
            out.append(f"states_basis_tokens={self.basis_tokens} must be >= 1")
        if not 0.0 < float(self.token_fraction) <= 1.0:
            out.append(f"states_token_fraction={self.token_fraction} must be in (0, 1]")
        return out

    @property
    def schema_version(self) -> int:
        """1 when schema 1 can express the layout (float16/bfloat16, full rank, every token), else 2."""
        plain = self.codec in ("float16", "bfloat16") and self.rank is None and self.token_fraction == 1.0
        return 1 if plain else 2

    @property
    def scaled(self) -> bool:
        return self.codec in SCALED_CODECS

    @property
    def subsampled(self) -> bool:
        return self.token_fraction < 1.0

    def key_inputs(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "rank": self.rank,
            "basis_tokens": self.basis_tokens if self.rank is not None else None,
            "token_fraction": float(self.token_fraction),
            "seed": self.seed,
        }

    @classmethod
    def from_key_inputs(cls, inputs: dict[str, Any] | None, states_dtype: str | None) -> StatesCodec:
        """The codec of a manifest's key inputs (schema 1: the plain states dtype)."""
        if not inputs:
            return cls(codec=states_dtype or "float16")
        return cls(
            codec=str(inputs["codec"]),
            rank=None if inputs["rank"] is None else int(inputs["rank"]),
            basis_tokens=int(inputs["basis_tokens"] or 65536),
            token_fraction=float(inputs["token_fraction"]),
            seed=int(inputs["seed"]),
        )

    def row_length(self, hidden_size: int) -> int:
        """S: values per stored row (D, or r coefficients)."""
        return hidden_size if self.rank is None else int(self.rank)

    def stored_bytes_per_token(self, pairs: int, width: int, hidden_size: int) -> float:
        """Logical (uncompressed) expert-state bytes per distillation token, incl. scales and row index."""
        row = self.row_length(hidden_size) * bytes_per_value(self.codec) + scale_bytes_per_row(self.codec)
        index = 4 if self.subsampled else 0
        return float(self.token_fraction) * (pairs * width * row + index)

    def encode(self, states: Tensor, basis: StateBasis | None) -> dict[str, np.ndarray]:
        """fp32 states [n, P, W, D] -> the stored arrays {expert_states, expert_state_scales (fp8/int8)}."""
        if self.rank is not None:
            if basis is None:
                raise ValueError(
                    "a low-rank states codec needs the cache's basis to encode. Fix: pass the basis the "
                    "build wrote (a caller bug)."
                )
            states = project(states.to(basis.u.device), basis)
        payload, scales = encode_rows(states, self.codec)
        out = {"expert_states": payload}
        if scales is not None:
            out["expert_state_scales"] = scales
        return out

    def decode(self, payload: np.ndarray, scales: np.ndarray | None) -> Tensor:
        """Stored rows -> float32 states [.., D] (rank null) or coefficients [.., r]."""
        return decode_rows(payload, scales, self.codec)


class ShardStateRows:
    """One shard's stored expert-state arrays under a schema-2 codec, filled micro-batch by micro-batch:
    only the kept rows (token subsampling), encoded (projected onto the basis when low rank)."""

    def __init__(
        self,
        states: StatesCodec,
        basis: StateBasis | None,
        seq_ids: list[int],
        num_tokens: list[int],
        trailing: tuple[int, int, int],
    ) -> None:
        pairs, width, hidden = trailing
        total = int(sum(num_tokens))
        self.states, self.basis = states, basis
        self.keep = keep_rows(seq_ids, num_tokens, states.seed, states.token_fraction)
        self.kept_before = np.concatenate([[0], np.cumsum(self.keep)]).astype(np.int64)
        kept = int(self.kept_before[-1]) if total else 0
        s = states.row_length(hidden)
        self.arrays = {"expert_states": np.empty((kept, pairs, width, s), dtype=payload_dtype(states.codec))}
        if states.scaled:
            self.arrays["expert_state_scales"] = np.empty((kept, pairs, width), dtype=SCALE_DTYPE)
        if states.subsampled:
            self.arrays["expert_state_rows"] = np.flatnonzero(self.keep).astype(np.int32)

    def put(self, first_row: int, h: Tensor) -> None:
        """Fp32 states [n, P, W, D] of shard rows first_row .. first_row + n - 1."""
        mask = self.keep[first_row : first_row + h.shape[0]]
        a, b = int(self.kept_before[first_row]), int(self.kept_before[first_row + h.shape[0]])
        if b > a:
            for name, arr in self.states.encode(h[torch.from_numpy(mask)], self.basis).items():
                self.arrays[name][a:b] = arr
