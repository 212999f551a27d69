"""Length bucketing of queued sequences into teacher micro-batches (pure; the dispatcher calls it)."""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], max_sequences: int, max_tokens: int) -> list[list[int]]:
    """Indices of `lengths` grouped into batches, longest first, so each batch holds sequences of similar
    length (little padding): a batch closes when one more sequence would exceed `max_sequences` or its padded
    size (count x longest) `max_tokens`. A sequence longer than `max_tokens` gets a batch of its own."""
    if max_sequences < 1 or max_tokens < 1:
        raise ValueError(f"max_sequences and max_tokens must be >= 1, got {max_sequences}, {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # sorted descending: the batch's first sequence is its longest, and sets its padded width
        if current and (
            len(current) + 1 > max_sequences or (len(current) + 1) * int(lengths[current[0]]) > max_tokens
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
