"""Per-sequence sparse rows (as the cache reader and the teacher service hand them out) as loss tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

SPARSE_FIELDS = (
    ("logit_indices", torch.long),
    ("logit_values", torch.float32),
    ("logit_tail_logmass", torch.float32),
)


def sparse_tensors(rows: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices [N, k] long, logprobs [N, k] fp32, tail [N] fp32): the rows' logit_* arrays (any numeric
    dtype, fp16 as served) concatenated in order."""
    if not rows:
        raise ValueError("no sequences: at least one row of sparse targets is needed")
    a, b, c = (
        torch.from_numpy(np.concatenate([np.asarray(r[name]) for r in rows])).to(dtype)
        for name, dtype in SPARSE_FIELDS
    )
    return a, b, c
