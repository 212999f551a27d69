"""One teacher replica of the service: scores a batch of token sequences into the cache's sparse format.

The scoring is the cache stage's own (`pipeline.cache.build.teacher.score_sequences`, loaded and placed by
`TeacherShardStage`), so a served target equals a cached one up to the float rounding of a different batch
composition. Arrays come back in their storage dtypes (`to_storage`: fp16 log-probs and gates), as a shard
holds them, which also halves what travels back to the students.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from pipeline.cache.build.teacher import (
    KEPT_MASS,
    TeacherShardStage,
    input_device,
    score_sequences,
    to_storage,
)
from pipeline.cache.format.spec import CacheSpec
from pipeline.data.collate import pad_batch
from pipeline.errors import MoeDistillError
from pipeline.teacher_service.rows import sparse_tensors
from pipeline.teacher_service.sar import RouterTrainer, dense_routing


class TeacherScorer:
    """A Ray actor class (also usable in-process). Each example: {"seq_id", "input_ids", "response_mask"};
    seq_id seeds sampled-mode draws (any int the caller picks; the cache uses the record index)."""

    def __init__(
        self,
        spec: CacheSpec,
        width: int,
        num_gpus: float,
        cpu_threads: int | None = None,
        fail_at_batch: int | None = None,
    ) -> None:
        """`fail_at_batch`: failure injection for tests (TeacherServiceConfig.fail_at_batch)."""
        # micro_batch is unused here: the dispatcher has already cut the batch
        self.stage = TeacherShardStage(spec, width, 1, num_gpus, cpu_threads)
        # a new id per process start: the dispatcher counts restarts by seeing a new one answer
        self.incarnation = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.router_trainer: RouterTrainer | None = None  # SAR: set by the first router_step
        self.fail_at_batch, self.batches = fail_at_batch, 0

    def score(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """{"results": one {array name: rows} per example, in order; "incarnation"; "busy_s";
        "input_tokens"; "padded_tokens"}."""
        if not examples:
            raise MoeDistillError("the teacher service got an empty batch (the dispatcher never sends one)")
        self.batches += 1
        if self.batches == self.fail_at_batch and not _restarted_actor():
            os._exit(1)  # injected failure: this process dies mid-request, once (a restart carries on)
        t0 = time.perf_counter()
        stage = self.stage
        device = input_device(stage.adapter.model)
        batch = {k: v.to(device) for k, v in pad_batch(list(examples), stage.pad_id).items()}
        seeds = [int(ex["seq_id"]) for ex in examples]
        # after SAR steps the teacher routes densely, as it was trained to
        routing = dense_routing(stage.adapter) if self.router_trainer is not None else nullcontext()
        with torch.no_grad(), routing:
            targets = score_sequences(stage.adapter, batch, stage.out, seeds)
        targets.pop(KEPT_MASS, None)  # a build's per-shard record, never a scored field
        stored = {name: to_storage(name, t, stage.out.states_dtype) for name, t in targets.items()}
        counts = [int(np.sum(np.asarray(ex["response_mask"])[1:])) for ex in examples]
        bounds = np.concatenate([[0], np.cumsum(counts)])
        results = [
            {name: arr[bounds[i] : bounds[i + 1]] for name, arr in stored.items()} for i in range(len(counts))
        ]
        return {
            "results": results,
            "incarnation": self.incarnation,
            "busy_s": time.perf_counter() - t0,
            "input_tokens": int(batch["attention_mask"].sum()),
            "padded_tokens": int(batch["input_ids"].numel()),
        }

    def router_step(
        self,
        examples: Sequence[dict[str, Any]],
        student_rows: Sequence[dict[str, Any]],
        loss_fn: Callable[..., torch.Tensor],
        lr: float = 1e-3,
    ) -> float:
        """One SAR update of the routers (pipeline.teacher_service.sar) on student samples; `student_rows`:
        the student's sparse distribution per example (logit_indices / logit_values / logit_tail_logmass)."""
        stage = self.stage
        if self.router_trainer is None:
            self.router_trainer = RouterTrainer(stage.adapter, lr)
        device = input_device(stage.adapter.model)
        batch = {k: v.to(device) for k, v in pad_batch(list(examples), stage.pad_id).items()}
        return self.router_trainer.step(batch, sparse_tensors(student_rows), loss_fn)

    def ping(self) -> str:
        """The incarnation id; awaiting it waits until the teacher is loaded."""
        return self.incarnation


def _restarted_actor() -> bool:
    """Whether this process is a Ray restart of the actor (False in-process, without Ray)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
