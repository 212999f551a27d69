"""FSDP2 against DDP on two real gloo processes: one B-Distill step must give the same weights, gradient norm
and optimizer state, and a full-state round trip must restore a sharded model exactly.

No Ray here (tests/distill/test_distill.py runs FSDP through Ray Train); two processes on one machine, because
the parts under test are the collectives: sharding, gradient reduction, clipping, state gathering.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support.ports import free_port

from pipeline.config import DistillConfig
from pipeline.data.collate import distill_positions
from pipeline.distill.methods import get_method
from pipeline.distill.objective import distill_objective
from pipeline.distill.student import DistillStudent
from pipeline.models.build import TinyMoEConfig, build_tiny_moe
from pipeline.training.parallel import (
    clip_gradients,
    decoder_layers,
    exportable_model,
    full_state,
    is_fsdp,
    load_full_state,
    wrap_model,
)

VOCAB, TEACHER_HIDDEN, PAIRED = 64, 48, 1  # student layer 1 is paired (MC reads its experts); layer 0 not


def _student() -> DistillStudent:
    moe = build_tiny_moe(
        TinyMoEConfig(hidden_size=32, num_layers=2, num_experts=2, top_k=1, moe_intermediate_size=32),
        VOCAB,
        0,
        1,
        2,
        seed=1,
    )
    return DistillStudent(moe.train(), [PAIRED], teacher_hidden_size=TEACHER_HIDDEN)


def _unpaired_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    paired = model.student.model.layers[PAIRED]
    return [layer for layer in decoder_layers(model) if layer is not paired]


def _batch(rank: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rank-specific inputs with cache-shaped teacher targets (same token count on every rank)."""
    g = torch.Generator().manual_seed(100 + rank)
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    response = torch.zeros_like(input_ids)
    response[:, 4:] = 1
    token_mask = distill_positions(response)
    n = int(token_mask.sum())
    top = torch.log_softmax(torch.randn(n, VOCAB, generator=g), -1).topk(8, dim=-1)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "logit_indices": top.indices,
        "logit_values": top.values,
        "logit_tail_logmass": torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6)),
        "gates": torch.softmax(torch.randn(n, 1, 2, generator=g), -1),
        "expert_states": torch.randn(n, 1, 2, TEACHER_HIDDEN, generator=g),
    }
    return batch, token_mask


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum: stateful like AdamW, but linear in the gradient, so weights compare tightly
    (AdamW's first step is lr * sign(grad) where a gradient is ~0, which amplifies rounding noise)."""
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _step(model, optimizer, rank: int) -> float:
    batch, token_mask = _batch(rank)
    forward = model(batch["input_ids"], batch["attention_mask"], token_mask)
    generator = torch.Generator().manual_seed(7 + rank)  # the same MC draws under both strategies
    loss, _ = distill_objective(
        get_method("b-distill"), DistillConfig(), forward, batch, token_mask, generator
    )
    loss.backward()
    norm = clip_gradients(model, max_norm=0.05)  # small: clipping must actually scale the update
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _worker(rank: int, world: int, port: int, strategy: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(1000 + rank)  # ranks initialise their projections differently; rank 0's must win
    try:
        units = _unpaired_layers if strategy == "fsdp" else None
        model = wrap_model(_student(), strategy, torch.device("cpu"), world, fsdp_units=units)
        assert is_fsdp(model) == (strategy == "fsdp")
        optimizer = _optimizer(model)
        norm = _step(model, optimizer, rank)
        model_state, optim_state = full_state(model, optimizer)
        result = {"norm": norm, "model": model_state, "optim": optim_state}
        if strategy == "fsdp":
            # Round trip: a fresh sharded model + optimizer loaded from the full state continues identically.
            fresh = wrap_model(_student(), strategy, torch.device("cpu"), world, fsdp_units=units)
            fresh_optimizer = _optimizer(fresh)
            # Like a resume: every rank reads the whole checkpoint (only rank 0 received it from full_state).
            # set_state_dict distributes the dicts in place, so it gets a copy of the state compared below.
            shared = copy.deepcopy([model_state, optim_state])
            dist.broadcast_object_list(shared, src=0)
            load_full_state(fresh, fresh_optimizer, *shared)
            _step(model, optimizer, rank)
            _step(fresh, fresh_optimizer, rank)
            result["continued"] = full_state(model, optimizer)[0]
            result["continued_fresh"] = full_state(fresh, fresh_optimizer)[0]
            exported = exportable_model(fresh, _student)
            if rank == 0:
                result["exported"] = {k: v.clone() for k, v in exported.state_dict().items()}
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def _run(strategy: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{strategy}.pt"
    mp.spawn(_worker, args=(2, free_port(), strategy, str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("parallel")
    return {strategy: _run(strategy, tmp) for strategy in ("ddp", "fsdp")}


def test_fsdp_step_matches_ddp_with_the_mc_term(runs: dict[str, dict]) -> None:
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert ddp["norm"] > 0.05  # clipping was active
    assert fsdp["norm"] == pytest.approx(ddp["norm"], rel=1e-4)
    assert ddp["model"].keys() == fsdp["model"].keys()
    initial = _student().state_dict()
    moved = 0
    for name, value in ddp["model"].items():
        torch.testing.assert_close(fsdp["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
        moved += not torch.equal(value, initial[name])
    assert moved >= len(initial) - 1  # the step changed (almost) every tensor: a real update was compared
    for name, state in ddp["optim"]["state"].items():
        torch.testing.assert_close(
            fsdp["optim"]["state"][name]["momentum_buffer"], state["momentum_buffer"], rtol=1e-4, atol=1e-7
        )


def test_fsdp_full_state_round_trip_and_export(runs: dict[str, dict]) -> None:
    fsdp = runs["fsdp"]
    for name, value in fsdp["continued"].items():
        torch.testing.assert_close(fsdp["continued_fresh"][name], value, rtol=0, atol=0, msg=name)
    for name, value in fsdp["exported"].items():
        torch.testing.assert_close(value, fsdp["continued_fresh"][name], rtol=0, atol=0, msg=name)


def test_a_lone_worker_stays_unwrapped() -> None:
    model = _student()
    assert wrap_model(model, "fsdp", torch.device("cpu"), world=1) is model
    assert len(decoder_layers(model)) == 2
