"""The teacher service's counters: throughput, utilisation, batching efficiency, retries, queue bounds."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServiceCounters:
    """Kept by the dispatcher; `summary()` is what `TeacherService.stats()` reports."""

    num_actors: int
    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    sequences: int = 0  # sequences scored
    scored_tokens: int = 0  # distillation positions scored (rows of sparse targets)
    input_tokens: int = 0  # real (unpadded) tokens through the teacher
    padded_tokens: int = 0  # batch x longest, summed over batches: what the teacher computed
    batches: int = 0
    retries: int = 0  # batches re-sent after an actor failure surfaced to the dispatcher
    actor_restarts: int = 0  # actor incarnations replaced (seen as a new incarnation id answering)
    busy_s: float = 0.0  # teacher compute seconds, all actors together
    in_flight: int = 0  # requests admitted, not yet answered
    waiting: int = 0  # requests waiting for admission (the bound is full)
    peak_in_flight: int = 0
    peak_waiting: int = 0
    first_request: float | None = None

    def admit_wait(self) -> None:
        self.waiting += 1
        self.peak_waiting = max(self.peak_waiting, self.waiting)

    def admitted(self) -> None:
        self.waiting -= 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self.requests += 1
        if self.first_request is None:
            self.first_request = time.monotonic()

    def answered(self) -> None:
        self.in_flight -= 1

    def record_batch(
        self, sequences: int, input_tokens: int, padded_tokens: int, scored_tokens: int, busy_s: float
    ) -> None:
        self.batches += 1
        self.sequences += sequences
        self.input_tokens += input_tokens
        self.padded_tokens += padded_tokens
        self.scored_tokens += scored_tokens
        self.busy_s += busy_s

    def summary(self, queued_sequences: int = 0) -> dict[str, Any]:
        now = time.monotonic()
        active = now - (self.first_request if self.first_request is not None else now)
        out: dict[str, Any] = {
            k: getattr(self, k)
            for k in (
                "num_actors", "requests", "sequences", "scored_tokens", "input_tokens", "padded_tokens",
                "batches", "retries", "actor_restarts", "busy_s", "in_flight", "waiting",
                "peak_in_flight", "peak_waiting",
            )
        }  # fmt: skip
        out["queued_sequences"] = queued_sequences
        out["active_s"] = active
        # utilisation: share of the actors' time since the first request spent computing
        out["utilisation"] = self.busy_s / (active * self.num_actors) if active > 0 else 0.0
        out["sequences_per_s"] = self.sequences / active if active > 0 else 0.0
        out["scored_tokens_per_s"] = self.scored_tokens / active if active > 0 else 0.0
        out["sequences_per_batch"] = self.sequences / self.batches if self.batches else 0.0
        # batching efficiency: real tokens over computed ones (1.0 = no padding)
        out["padding_efficiency"] = self.input_tokens / self.padded_tokens if self.padded_tokens else 0.0
        return out
