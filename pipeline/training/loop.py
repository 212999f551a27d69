"""The Ray Train worker loop shared by teacher fine-tuning and student distillation.

A `TrainingTask` says what is trained (model, loss, collation, export); this module owns everything
else: DDP/FSDP wrapping (pipeline.training.parallel), gradient accumulation, AdamW + cosine, checkpoints
through `ray.train.report` (model, optimiser, scheduler, RNG, data position, the task's own state), resume
from `ray.train.get_checkpoint()`, periodic validation for a task that asks for it, metrics on rank 0 and the
Hugging Face export at the end.

Checkpoints hold full, unsharded state keyed by parameter name, so a run checkpointed under one strategy
or worker count resumes under another.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.errors import MoeDistillError
from pipeline.training.metrics import MetricsLogger
from pipeline.training.optim import build_optimizer, build_scheduler
from pipeline.training.parallel import (
    clip_gradients,
    exportable_model,
    full_state,
    gradient_sync,
    load_full_state,
    wrap_model,
)

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
FAIL_AT_STEP_ENV = "MOEDISTILL_FAIL_AT_STEP"  # failure injection for resume tests: the worker dies once


class TrainingTask(Protocol):
    """What a concrete stage plugs into the shared loop (built inside each worker).

    Optional, looked up by name (a task without them trains as before):
    * `fsdp_units(model)`: the submodules FSDP may shard on their own (pipeline.training.parallel);
    * `validation_every` (int, 0: never) with `validation_loss(model) -> float` and
      `on_validation(val_loss, step) -> dict[str, float]`: every `validation_every` optimizer steps each
      worker computes the validation loss, the loop averages it over the workers (so every rank hands its
      task the same value), calls the hook and logs `val_loss` plus the metrics the hook returns;
    * `task_state() -> dict` and `load_task_state(state)`: state the task changes while training (e.g.
      what its validation hook decided), stored per rank in every checkpoint and restored on resume;
      tensors and plain containers only (checkpoints load with weights_only=True).
    """

    def build_model(self) -> torch.nn.Module: ...

    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]: ...

    def compute_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def export(self, model: torch.nn.Module, export_dir: str) -> None: ...


@dataclass(frozen=True)
class LoopSpec:
    train: TrainConfig
    total_steps: int
    rows_per_epoch: int  # rows of the training dataset (all workers together)
    export_dir: str
    metrics_dir: str
    fail_at_step: int | None = None


def plan_total_steps(cfg: TrainConfig, num_rows: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_step = max(1, cfg.num_workers) * cfg.batch_size * cfg.grad_accum_steps  # 0 workers: in-process
    return max(1, math.ceil(cfg.epochs * num_rows / per_step))


def run_training_loop(task: TrainingTask, spec: LoopSpec) -> None:
    """Body of `train_loop_per_worker`: every worker runs it; rank 0 writes metrics and the export."""
    import ray.train
    import ray.train.torch

    cfg = spec.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _seed_everything(cfg.seed + rank)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    device = ray.train.torch.get_device()

    model = wrap_model(task.build_model(), cfg.strategy, device, world, fsdp_units=_fsdp_units(task))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, spec.total_steps)

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_training_state(Path(ckpt_dir) / STATE_FILE)
        load_full_state(model, optimizer, state["model"], state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(_own_entry(state["rng"], rank))
        if "task" in state:
            task.load_task_state(_own_entry(state["task"], rank))  # type: ignore[attr-defined]
        start_step = int(state["step"])
        if rank == 0:
            print(f"[train] resumed from checkpoint at step {start_step}/{spec.total_steps}", flush=True)
            Path(spec.metrics_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(spec.metrics_dir) / "resumes.log", "a") as fh:
                fh.write(f"resumed at step {start_step}\n")

    metrics_log = MetricsLogger(spec.metrics_dir, enabled=rank == 0)
    micro_per_epoch = max(1, spec.rows_per_epoch // world // cfg.batch_size)
    batches = _micro_batches(task, cfg, start_step * cfg.grad_accum_steps, micro_per_epoch)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    progress = _progress_bar(rank, start_step, spec.total_steps)
    validation_every = _validation_every(task)
    model.train()
    window: dict[str, float] = {}
    counts: dict[str, int] = {}  # steps that reported each key (diagnostics come on logging steps only)
    window_steps, data_wait, step_time = 0, 0.0, 0.0
    for step in range(start_step, spec.total_steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_metrics: dict[str, float] = {}
        for micro in range(cfg.grad_accum_steps):
            t_data = time.perf_counter()
            batch = {k: v.to(device) for k, v in next(batches).items()}
            data_wait += time.perf_counter() - t_data
            with autocast, gradient_sync(model, micro == cfg.grad_accum_steps - 1):
                loss, parts = task.compute_loss(model, batch, step)
                (loss / cfg.grad_accum_steps).backward()
            for k, v in parts.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v / cfg.grad_accum_steps
        grad_norm = clip_gradients(model, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step_time += time.perf_counter() - t0
        step_metrics["grad_norm"] = float(grad_norm)
        step_metrics["lr"] = scheduler.get_last_lr()[0]
        done = step + 1
        if validation_every and done % validation_every == 0:
            step_metrics.update(_validate(task, model, done, device, world))
        for k, v in step_metrics.items():
            window[k] = window.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
        window_steps += 1
        if progress is not None:
            progress.step(step_metrics.get("loss", float("nan")))
        if done % cfg.log_every == 0 or done == spec.total_steps:
            averaged = {k: v / counts[k] for k, v in window.items()}
            averaged["step_time_s"] = step_time / window_steps
            averaged["data_wait_frac"] = data_wait / max(step_time, 1e-9)
            metrics_log.log(done, averaged)
            window, counts, window_steps, data_wait, step_time = {}, {}, 0, 0.0, 0.0
        if spec.fail_at_step is not None and done == spec.fail_at_step and rank == 0:
            _die_once(spec.metrics_dir, done, in_process=cfg.num_workers == 0)
        if done % cfg.checkpoint_every == 0 or done == spec.total_steps:
            _report_checkpoint(task, model, optimizer, scheduler, done, step_metrics, rank, world)
    if progress is not None:
        progress.close()
    metrics_log.close()
    exportable = exportable_model(model, task.build_model)  # collective under FSDP: every rank calls it
    if rank == 0:
        task.export(exportable, spec.export_dir)
        print(f"[train] exported Hugging Face checkpoint to {spec.export_dir}", flush=True)


def _fsdp_units(task: TrainingTask) -> Callable[[torch.nn.Module], list[torch.nn.Module]] | None:
    """A task may say which submodules are safe to shard on their own (see pipeline.training.parallel)."""
    return getattr(task, "fsdp_units", None)


def _validation_every(task: TrainingTask) -> int:
    """The task's validation cadence in optimizer steps (0: it never validates)."""
    every = int(getattr(task, "validation_every", 0) or 0)
    if every <= 0:
        return 0
    missing = [m for m in ("validation_loss", "on_validation") if not callable(getattr(task, m, None))]
    if missing:
        raise TypeError(
            f"{type(task).__name__} sets validation_every={every} but has no {' or '.join(missing)}. Fix: "
            "define both methods, or set validation_every = 0."
        )
    return every


def _validate(
    task: TrainingTask, model: torch.nn.Module, step: int, device: torch.device, world: int
) -> dict[str, float]:
    """The task's validation loss averaged over the workers, handed to its hook on every rank."""
    value = float(task.validation_loss(model))  # type: ignore[attr-defined]
    model.train()  # a validation pass leaves the model in eval mode
    if world > 1 and torch.distributed.is_initialized():
        # The replicas hold the same weights, but reduction order or kernels may still differ by a bit:
        # one average makes every rank's hook decide the same thing.
        total = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        value = float(total.item()) / world
    metrics = {"val_loss": value}
    metrics.update(task.on_validation(value, step) or {})  # type: ignore[attr-defined]
    return metrics


def _micro_batches(
    task: TrainingTask, cfg: TrainConfig, start_micro: int, micro_per_epoch: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless stream of collated micro-batches; resumes at the recorded position of its epoch."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    collate = _numpy_collate(task)
    epoch, skip = divmod(start_micro, micro_per_epoch)
    while True:
        emitted = 0
        # collate_fn turns Ray Data's numpy batches (ragged per-sequence arrays) into padded tensors; it
        # runs on iter_torch_batches' prefetch thread, overlapping with the step. Skipped batches (resume
        # inside an epoch) are collated too: cheap next to a training step.
        iterator = shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            collate_fn=collate,
            drop_last=True,
            local_shuffle_buffer_size=max(4 * cfg.batch_size, 64),
            local_shuffle_seed=cfg.seed + epoch,
            prefetch_batches=2,
        )
        for index, batch in enumerate(iterator):
            if index < skip:
                continue
            emitted += 1
            yield batch
        if emitted == 0 and skip == 0:
            raise RuntimeError(
                "a training worker received no complete batch: the dataset has fewer rows than "
                "num_workers x batch_size. Fix: lower train.batch_size or train.num_workers."
            )
        epoch, skip = epoch + 1, 0


def _numpy_collate(task: TrainingTask) -> Any:
    """The task's collate as the Ray Data collate class for numpy batches (plain functions are deprecated
    since Ray 2.47)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class TaskCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return task.collate(batch)

    return TaskCollate()


def load_training_state(path: Path) -> dict[str, Any]:
    """A checkpoint's training state, loaded with weights_only=True: tensors and plain containers only, so a
    crafted pickle on shared checkpoint storage cannot run code here."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoeDistillError(
            f"refusing to load checkpoint {path}: it holds objects other than tensors and plain containers "
            f"({first}), which could run code on load. Fix: rerun the same command (it moves that checkpoint "
            "to the run's quarantine/ folder and resumes from the newest intact one), and check who can "
            "write the checkpoint storage."
        ) from None


def _report_checkpoint(
    task: TrainingTask,
    model,
    optimizer,
    scheduler,
    step: int,
    metrics: dict[str, float],
    rank: int,
    world: int,
):
    import ray.train

    rng_states = _gather_from_ranks(_rng_state(), world)
    get_task_state = getattr(task, "task_state", None)
    task_states = _gather_from_ranks(get_task_state(), world) if callable(get_task_state) else None
    model_state, optimizer_state = full_state(model, optimizer)  # collective under FSDP
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save(
                {
                    "model": model_state,
                    "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "rng": rng_states,
                    **({"task": task_states} if task_states is not None else {}),
                },
                Path(tmp) / STATE_FILE,
            )
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain lists (what weights_only loading accepts)."""
    py_version, py_words, py_gauss = random.getstate()
    np_kind, np_words, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, torch.tensor(py_words, dtype=torch.int64), py_gauss],
        "numpy": [np_kind, torch.from_numpy(np_words.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py_version, py_words, py_gauss = state["python"]
    random.setstate((py_version, tuple(int(w) for w in py_words.tolist()), py_gauss))
    np_kind, np_words, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_words.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_from_ranks(own: Any, world: int) -> list[Any]:
    """Every rank's `own`, in rank order (a collective: every rank calls it)."""
    if world == 1 or not torch.distributed.is_initialized():
        return [own]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, own)
    return gathered


def _own_entry(per_rank: list[Any], rank: int) -> Any:
    """This rank's entry of a per-rank checkpoint list; rank 0's when the run resumes on more workers."""
    return per_rank[rank] if rank < len(per_rank) else per_rank[0]


def _die_once(metrics_dir: str, step: int, in_process: bool = False) -> None:
    """Simulate a killed worker exactly once per run directory (the marker survives the restart). In-process
    (num_workers: 0) the loop shares the driver's process, so the failure is raised, not an exit."""
    marker = Path(metrics_dir) / f".injected-failure-{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("failure injected\n")
    if in_process:
        raise RuntimeError(f"injected failure at step {step} (in-process run)")
    print(f"[train] injected failure at step {step} (worker process exits)", flush=True)
    # Give the controller time to register the checkpoint already reported, so a test knows which one is
    # "the last"; a real crash may lose an unregistered checkpoint and then resumes from the one before.
    time.sleep(3.0)
    os._exit(1)


def _progress_bar(rank: int, start: int, total: int) -> StepBar | None:
    return StepBar(start, total) if rank == 0 else None


class StepBar:
    """Rank 0's bar over optimizer steps with the last loss. In a Ray worker it is a `tqdm_ray` bar, which
    the driver draws once (a plain tqdm there prints a prefixed console line per refresh); in-process
    (`num_workers: 0`) a plain tqdm."""

    def __init__(self, start: int, total: int) -> None:
        import ray

        self._in_worker = ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
        if self._in_worker:
            from ray.experimental.tqdm_ray import tqdm as ray_tqdm

            self._bar: Any = ray_tqdm(desc="train steps", total=total, unit="step", flush_interval_s=2.0)
            self._bar.update(start)
        else:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc="train steps", unit="step", mininterval=2.0)

    def step(self, loss: float) -> None:
        if self._in_worker:  # tqdm_ray has no postfix: the loss rides in the description
            self._bar.set_description(f"train steps (loss {loss:.3f})")
            self._bar.update(1)
        else:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.3f}")

    def close(self) -> None:
        self._bar.close()
