"""Data-parallel strategies for the training loop: DDP, or FSDP2 (`torch.distributed.fsdp.fully_shard`).

FSDP is wrapped here rather than by `ray.train.torch.prepare_model`, which offers only FSDP1 and only on
GPUs; FSDP2 runs on gloo too, so the same code path is tested on CPU workers.

Sharding units. A decoder layer may be its own FSDP unit only when nothing reads its weights outside its
own forward: FSDP2 frees a unit's gathered weights after the unit's forward and re-gathers them for its
backward, triggered by gradients flowing into the unit's outputs. B-Distill's MC term evaluates every expert
of the paired layers after the model forward (pipeline.models.adapter), so a task that does this names the
layers that are safe (`fsdp_units`); the rest stay in the root unit, gathered for the whole step.

State is always exchanged as full, unsharded dicts keyed by parameter name
(`torch.distributed.checkpoint.state_dict`): a checkpoint does not depend on strategy or world size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

UnitPicker = Callable[[nn.Module], list[nn.Module]]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of the Hugging Face model(s) inside `model` (their `_no_split_modules`)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def _distributed(world: int) -> bool:
    return world > 1 and dist.is_available() and dist.is_initialized()


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap_model(
    model: nn.Module,
    strategy: str,
    device: torch.device,
    world: int,
    fsdp_units: UnitPicker | None = None,
) -> nn.Module:
    """Move `model` to `device` and wrap it for `strategy` ("ddp" or "fsdp"); a lone worker stays plain."""
    model = model.to(device)
    if not _distributed(world):
        return model
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            # An MoE layer leaves unchosen experts without gradient in some steps; DDP must tolerate that.
            find_unused_parameters=True,
        )
    if strategy != "fsdp":
        raise ValueError(f"unknown parallel strategy {strategy!r}; use 'ddp' or 'fsdp'")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    _broadcast_from_rank0(model)
    mesh = init_device_mesh(device.type, (world,))
    for unit in (fsdp_units or decoder_layers)(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Start every rank from rank 0's weights, as DDP does: FSDP2 shards each rank's own local copy, and
    ranks seed differently (fresh projections, upcycling noise), so unsynchronised shards would mix
    initialisations."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-steps that are not the last."""
    if is_fsdp(model):
        model.set_requires_gradient_sync(sync)
        yield
    elif not sync and isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip to `max_norm` over ALL parameters (sharded ones included); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor; the value is the global norm
        norm = norm.full_tensor()
    return float(norm)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state on CPU, keyed by parameter name. Collective: every rank calls it;
    under FSDP only rank 0 receives the dicts (the others get empty ones)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    return get_state_dict(model, optimizer, options=options)


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict
) -> None:
    """Inverse of `full_state`: every rank passes the full dicts; FSDP keeps its own shard of them.

    The model must match exactly. The optimizer may lack state for parameters that never received a
    gradient (the paired-layer projections of a method without the MC term): AdamW creates none for them.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(
        model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True, strict=False)
    )


def exportable_model(model: nn.Module, build_fresh: Callable[[], nn.Module]) -> Any:
    """A plain module holding the trained weights, for `save_pretrained` on rank 0.

    Collective under FSDP (the weights are gathered into a freshly built, unsharded copy on rank 0; other
    ranks get None); otherwise simply the unwrapped model.
    """
    if not is_fsdp(model):
        return unwrap_model(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    fresh = build_fresh()
    fresh.load_state_dict(state)
    return fresh
