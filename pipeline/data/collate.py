"""Batching tokenised examples (docs/cache-format.md): right padding, labels, distillation positions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.errors import DataError

IGNORE_INDEX = -100  # the label value torch's cross_entropy ignores by default


def pad_batch(
    examples: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad examples into input_ids / attention_mask / labels / response_mask, all [B, T] long.

    `examples` is a list of rows whose "input_ids" / "response_mask" are lists, numpy arrays or tensors, or a
    columnar batch {"input_ids": [row, ...], ...} as Ray Data hands to a `collate_fn` (numpy object arrays).
    labels = input_ids on response tokens, -100 elsewhere (prompt and padding). When every row carries a
    "seq_id", it is passed through as a [B] long tensor so cached teacher targets can be matched to rows.
    """
    rows = _as_rows(examples)
    if not rows:
        raise DataError("pad_batch got an empty batch. Fix: drop empty batches before collating.")
    ids = [_as_1d(r["input_ids"], "input_ids") for r in rows]
    masks = [_as_1d(r["response_mask"], "response_mask") for r in rows]
    for i, (a, m) in enumerate(zip(ids, masks, strict=True)):
        if a.shape != m.shape:
            raise DataError(
                f"row {i}: input_ids has {a.numel()} tokens but response_mask {m.numel()}. "
                "Fix: build examples with pipeline.data.tokenize.tokenize_records."
            )
    bsz, seq_len = len(rows), max(a.numel() for a in ids)
    input_ids = torch.full((bsz, seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((bsz, seq_len), dtype=torch.long)
    response_mask = torch.zeros((bsz, seq_len), dtype=torch.long)
    for i, (a, m) in enumerate(zip(ids, masks, strict=True)):
        n = a.numel()
        input_ids[i, :n] = a
        attention_mask[i, :n] = 1
        response_mask[i, :n] = m
    labels = torch.where(response_mask == 1, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "response_mask": response_mask,
    }
    if all("seq_id" in r for r in rows):
        batch["seq_id"] = torch.tensor([int(r["seq_id"]) for r in rows], dtype=torch.long)
    return batch


def distill_positions(response_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: position p is True iff response_mask[:, p + 1] == 1 (its next token is a response token).

    The last position is always False (it predicts nothing inside the sequence).
    """
    out = torch.zeros(response_mask.shape, dtype=torch.bool, device=response_mask.device)
    out[..., :-1] = response_mask[..., 1:] == 1
    return out


def _as_rows(examples: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> list[Mapping[str, Any]]:
    if isinstance(examples, Mapping):  # columnar batch
        keys = list(examples)
        n = len(examples["input_ids"]) if "input_ids" in examples else 0
        return [{k: examples[k][i] for k in keys} for i in range(n)]
    return list(examples)


def _as_1d(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.to(torch.long)
    else:
        t = torch.from_numpy(np.array(value, dtype=np.int64))  # a copy: Ray hands out read-only views
    if t.dim() != 1:
        raise DataError(f"{name} must be one flat sequence per row, got shape {tuple(t.shape)}.")
    return t
