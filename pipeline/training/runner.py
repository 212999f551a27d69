"""Driver side of a Ray Train run: TorchTrainer with placement, storage, retries and readable errors."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.config import TrainConfig
from pipeline.errors import MoeDistillError
from pipeline.placement import check_placement, worker_resources
from pipeline.training.loop import FAIL_AT_STEP_ENV, LoopSpec, TrainingTask, run_training_loop
from pipeline.training.recovery import recover_checkpoints


def _worker_entry(loop_config: dict[str, Any]) -> None:
    task: TrainingTask = loop_config["task_factory"]()
    run_training_loop(task, loop_config["spec"])


def fit(
    task_factory: Callable[[], TrainingTask],
    spec: LoopSpec,
    run_name: str,
    storage_path: str,
    datasets: dict[str, Any],
    reserved_cpus: float = 0.0,
) -> Any:
    """Run (or resume: same run_name + storage_path) a training job; returns Ray's Result. `reserved_cpus`:
    CPUs other actors of the run hold meanwhile (pipeline.placement.worker_resources).

    Resuming is Ray Train's own mechanism: the rerun finds the run's checkpoints under
    storage_path/run_name and the workers restore from `ray.train.get_checkpoint()`.

    `train.num_workers: 0` trains in this process (Ray Train's local mode): no controller, worker group or
    collective start-up (~10 s per run saved), for debugging and for tests whose subject is not distribution.
    Its checkpoints are not persisted, so a killed in-process run starts over.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg: TrainConfig = spec.train
    if spec.fail_at_step is None and os.environ.get(FAIL_AT_STEP_ENV):
        spec = LoopSpec(**{**spec.__dict__, "fail_at_step": int(os.environ[FAIL_AT_STEP_ENV])})
    if cfg.num_workers == 0:
        scaling = ScalingConfig(num_workers=0)  # local mode: the loop runs right here
    else:
        for line in recover_checkpoints(storage_path, run_name):  # resume from the newest intact checkpoint
            print(f"[train] quarantined {line}", flush=True)
        check_placement(cfg.resources_per_worker, what="training workers (train.resources_per_worker)")
        scaling = ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=worker_resources(cfg, reserved_cpus),
        )
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"task_factory": task_factory, "spec": spec},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets=datasets,
    )
    try:
        with _ordered_ingest():
            return trainer.fit()
    except Exception as exc:  # translate Ray's wrapper into the user's own error where there is one
        user_error = find_user_error(exc)
        if user_error is not None:
            raise user_error from None
        raise


@contextlib.contextmanager
def _ordered_ingest() -> Iterator[None]:
    """Ray Data's default ingest hands blocks to training in completion order, which varies run to run (and
    with it every batch after the seeded local shuffle); preserve_order makes the same config give the same
    batches, hence bit-identical weights, at the cost of waiting for the slowest read task. Ray Train takes
    its ingest options from the driver's DataContext when fit() starts.

    Still free to differ: another train.num_workers (other rows per worker, other gradient sums), another
    torch thread count or CPU/BLAS build (float reduction order), GPUs (non-deterministic kernels, bf16
    autocast), and a cache rebuilt on other hardware (same key, other teacher floats)."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    saved, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = saved


def find_user_error(exc: BaseException) -> MoeDistillError | None:
    """Dig a MoeDistillError out of Ray Train's WorkerGroupError / TrainingFailedError wrappers."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, MoeDistillError):
            return current
        stack.extend([getattr(current, "_base_exc", None), current.__cause__, current.__context__])
        for attr in ("worker_failures",):
            failures = getattr(current, attr, None)
            if isinstance(failures, dict):
                stack.extend(failures.values())
        stack.append(getattr(current, "controller_failure", None))
    return None
