"""The CUDA paths: bf16 teacher forward, MC sampling on the GPU, bf16-autocast training steps, FSDP2 on nccl,
a device_map teacher and the cache's shard computation on a GPU, each against its CPU / fp32 counterpart.

    python -m pytest -m cuda tests/training/test_cuda.py  # on a GPU machine; skipped (collected) without CUDA

Needs only torch, transformers, accelerate, numpy and pytest (no Ray, zarr or datasets).
"""

from __future__ import annotations

import contextlib
import copy
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pipeline.cache.build.teacher import TeacherOutputSpec, compute_shard, load_teacher
from pipeline.cache.format.codecs import decode_states
from pipeline.cache.format.shard import ShardData
from pipeline.config import DistillConfig, TrainConfig
from pipeline.data.collate import distill_positions, pad_batch
from pipeline.distill.losses import mc_exploration_loss
from pipeline.distill.methods import get_method
from pipeline.distill.objective import distill_objective
from pipeline.distill.student import DistillStudent
from pipeline.models.adapter import MoEAdapter
from pipeline.models.alignment import layer_pairs
from pipeline.models.build import TinyMoEConfig, build_tiny_moe
from pipeline.placement import (
    DEVICE_MAP_WEIGHT_FRACTION,
    TeacherPlacement,
    teacher_placement,
    visible_gpu_memory,
)
from pipeline.training.optim import build_optimizer
from pipeline.training.parallel import clip_gradients, decoder_layers, full_state, is_fsdp, load_full_state

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)"),
]

DEVICE = torch.device("cuda")
BACKEND = "nccl"
VOCAB = 128
# Built here, not through tests/support/tiny.py: the GPU image has no Ray, zarr or datasets to import.
TEACHER = TinyMoEConfig(hidden_size=64, num_layers=4, num_experts=4, top_k=2)
STUDENT = TinyMoEConfig(hidden_size=32, num_layers=2, num_experts=2, top_k=1)
PAIRS = layer_pairs(TEACHER.num_layers, STUDENT.num_layers)
OUT = TeacherOutputSpec(
    cached_layers=tuple(t for _, t in PAIRS),
    width=STUDENT.num_experts,
    logits_mode="topk",
    logits_k=16,
    states_dtype="float16",
    store_expert_states=True,
    teacher_responses="none",
    max_new_tokens=0,
)
# bf16 keeps 8 mantissa bits (unit roundoff 2^-9 = 0.2%). On CPU the bf16 forward of this 4-layer teacher is
# 0.7% (layer 0) to 1.5% (layer 3) off in relative (Frobenius) error and its router probabilities up to 2e-3:
# 5% and 1e-2 leave a 3x margin for other kernels while a wrong layout or dtype path is off by O(1).
BF16_REL_TOL = 5e-2
BF16_PROB_ATOL = 1e-2
# One fp16 step: a value in fp16 moves by at most 2^-10 of its magnitude (2^-24 absolute when subnormal).
FP16_RTOL, FP16_ATOL = 2.0**-10, 2.0**-24


def make_examples(n: int, seed: int) -> list[dict[str, Any]]:
    """Random prompt + response token sequences of varying length, as tokenize_records produces them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = int(torch.randint(4, 12, (1,), generator=g))
        response = int(torch.randint(4, 16, (1,), generator=g))
        ids = [1, *torch.randint(3, VOCAB, (prompt + response - 2,), generator=g).tolist(), 2]
        out.append({"seq_id": i, "input_ids": ids, "response_mask": [0] * prompt + [1] * response})
    return out


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().float().cpu()
    return float((actual.detach().float().cpu() - expected).norm() / expected.norm())


def targets_batch(shard: ShardData, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A student micro-batch as the distillation stage collates it: padded tokens + the shard's targets."""
    batch = {k: v for k, v in pad_batch(list(examples), 0).items() if k != "labels"}
    for name, arr in shard.arrays.items():
        batch[name] = torch.from_numpy(np.array(arr))
    batch["expert_states"] = decode_states(shard.arrays["expert_states"], OUT.states_dtype)
    return batch


def assert_same_shard(actual: ShardData, expected: ShardData) -> None:
    """Equal up to one fp16 rounding step per stored value; top-k ids may differ only between near-ties."""
    assert actual.seq_ids == expected.seq_ids and actual.num_tokens == expected.num_tokens
    for name in ("logit_values", "gates", "expert_states"):
        a, e = actual.arrays[name].astype(np.float32), expected.arrays[name].astype(np.float32)
        np.testing.assert_allclose(a, e, rtol=FP16_RTOL, atol=FP16_ATOL, err_msg=name)
    np.testing.assert_allclose(
        actual.arrays["logit_tail_logmass"], expected.arrays["logit_tail_logmass"], rtol=1e-4, atol=1e-5
    )
    # Values (sorted) already agree; a differing id is a swap of two entries whose values agree.
    same = actual.arrays["logit_indices"] == expected.arrays["logit_indices"]
    assert same.mean() > 0.95, f"only {same.mean():.1%} of cached top-k ids agree"


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return build_tiny_moe(TEACHER, VOCAB, 0, 1, 2, seed=0)


@pytest.fixture(scope="module")
def teacher_dir(teacher: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def examples() -> list[dict[str, Any]]:
    return make_examples(8, seed=0)


@pytest.fixture(scope="module")
def cpu_shard(teacher: torch.nn.Module, examples: list[dict[str, Any]]) -> ShardData:
    return compute_shard(MoEAdapter(teacher), examples, 0, len(examples), OUT, micro_batch=4, pad_id=0)


def test_all_expert_forward_in_bf16_on_cuda_matches_fp32_on_cpu(
    teacher: torch.nn.Module, examples: list[dict[str, Any]]
) -> None:
    batch = pad_batch(examples, 0)
    mask = distill_positions(batch["response_mask"])
    layers = list(range(TEACHER.num_layers))
    with torch.no_grad():
        ref = MoEAdapter(teacher).forward_with_experts(
            batch["input_ids"], batch["attention_mask"], layers, mask
        )
        gpu = MoEAdapter(copy.deepcopy(teacher).to(DEVICE, torch.bfloat16))
        out = gpu.forward_with_experts(
            batch["input_ids"].to(DEVICE), batch["attention_mask"].to(DEVICE), layers, mask.to(DEVICE)
        )
    assert out.logits.device.type == DEVICE.type and out.logits.dtype == torch.bfloat16
    assert rel_err(out.logits, ref.logits) < BF16_REL_TOL
    for layer in layers:
        assert out.router_probs[layer].dtype == torch.float32  # softmax in fp32, as the model routes
        assert (out.router_probs[layer].cpu() - ref.router_probs[layer]).abs().max() < BF16_PROB_ATOL, layer
        assert rel_err(out.expert_outputs[layer], ref.expert_outputs[layer]) < BF16_REL_TOL, layer


def test_mc_loss_with_a_cuda_generator_is_reproducible_per_seed() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(256, 4, generator=g), -1).to(DEVICE)
    h_teacher = torch.randn(256, 4, 32, generator=g).to(DEVICE)
    h_student = torch.randn(256, 4, 32, generator=g).to(DEVICE).requires_grad_()

    def loss(seed: int, k: int = 3, alpha: float = 0.2) -> torch.Tensor:
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        return mc_exploration_loss(p, h_teacher, h_student, k, alpha, generator=gen)

    a, b, c = loss(0), loss(0), loss(1)
    assert a.device.type == DEVICE.type and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    (grad_a,) = torch.autograd.grad(a.sum(), h_student)
    (grad_b,) = torch.autograd.grad(loss(0).sum(), h_student)
    assert torch.equal(grad_a, grad_b)
    # K = 1 draws e ~ p with weight p_e: E[loss] = sum_e p_e^2 ||h^S_e - h^T_e||^2 / D, over 200 seeds.
    exact = (p.pow(2) * (h_student.detach() - h_teacher).pow(2).mean(-1)).sum(-1).mean()
    estimate = torch.stack([loss(s, k=1).mean() for s in range(200)]).mean()
    assert abs(float(estimate / exact) - 1) < 0.05
    with pytest.raises(RuntimeError):  # a CPU generator cannot drive CUDA sampling: the stage must pass one
        mc_exploration_loss(p, h_teacher, h_student, 1, 0.2, generator=torch.Generator().manual_seed(0))


def training_step(
    method_name: str, batch: dict[str, torch.Tensor], bf16: bool
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One optimiser step as the training loop runs it on a GPU worker -> (loss parts, gradients)."""
    torch.manual_seed(0)  # identical student and projections for every call
    student = build_tiny_moe(STUDENT, VOCAB, 0, 1, 2, seed=1).train()
    model = DistillStudent(student, [s for s, _ in PAIRS], TEACHER.hidden_size).to(DEVICE)
    method = get_method(method_name)
    optimizer = build_optimizer(model, TrainConfig())
    on = {k: v.to(DEVICE) for k, v in batch.items()}
    mask = distill_positions(on["response_mask"])
    gen = torch.Generator(device=DEVICE).manual_seed(0) if method.uses_mc else None
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:  # as pipeline.training.loop: forward, loss and backward under autocast
        forward = model(on["input_ids"], on["attention_mask"], mask, with_experts=method.uses_mc)
        loss, parts = distill_objective(method, DistillConfig(), forward, on, mask, gen)
        loss.backward()
    parts["grad_norm"] = clip_gradients(model, 1.0)
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return parts, grads


@pytest.mark.parametrize("method", ["b-distill", "kd"])
def test_training_step_under_bf16_autocast_matches_the_fp32_step(
    method: str, cpu_shard: ShardData, examples: list[dict[str, Any]]
) -> None:
    batch = targets_batch(cpu_shard, examples)
    ref_parts, ref_grads = training_step(method, batch, bf16=False)
    parts, grads = training_step(method, batch, bf16=True)
    losses = [k for k in ref_parts if k.startswith("loss")]
    assert {"loss_sft", "loss_forward_kl"} <= set(losses)
    assert ("loss_mc" in losses) == (method == "b-distill")
    for key in [*losses, "grad_norm"]:
        assert abs(parts[key] - ref_parts[key]) <= BF16_REL_TOL * abs(ref_parts[key]) + 1e-6, key
    assert grads.keys() == ref_grads.keys()
    flat = torch.cat([grads[n].flatten() for n in ref_grads])
    ref_flat = torch.cat([ref_grads[n].flatten() for n in ref_grads])
    assert rel_err(flat, ref_flat) < 2 * BF16_REL_TOL  # backward runs in bf16 too: twice the budget


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def single_process_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """World size 1 on the GPU backend, initialised from the environment as a launcher would."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    if DEVICE.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(BACKEND, init_method="env://")
    try:
        yield
    finally:
        dist.destroy_process_group()


def sharded_student(seed: int) -> torch.nn.Module:
    """The KD student sharded by FSDP2 over a 1-rank mesh. wrap_model keeps a lone worker plain, so the
    sharding is applied here the same way: every decoder layer its own unit, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    student = build_tiny_moe(STUDENT, VOCAB, 0, 1, 2, seed=seed).train()
    model = DistillStudent(student, [s for s, _ in PAIRS], TEACHER.hidden_size).to(DEVICE)
    mesh = init_device_mesh(DEVICE.type, (1,))
    for unit in decoder_layers(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def kd_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]
) -> float:
    on = {k: v.to(DEVICE) for k, v in batch.items()}
    mask = distill_positions(on["response_mask"])
    forward = model(on["input_ids"], on["attention_mask"], mask, with_experts=False)
    loss, _ = distill_objective(get_method("kd"), DistillConfig(), forward, on, mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(model, 1.0)
    optimizer.step()
    return float(loss.detach())


def test_fsdp2_on_nccl_saves_and_reloads_a_full_state_checkpoint(
    cpu_shard: ShardData, examples: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = targets_batch(cpu_shard, examples)
    with single_process_group(monkeypatch):
        model = sharded_student(seed=1)
        assert is_fsdp(model)
        optimizer = build_optimizer(model, TrainConfig())
        kd_step(model, optimizer, batch)
        model_state, optim_state = full_state(model, optimizer)
        assert all(t.device.type == "cpu" and type(t) is torch.Tensor for t in model_state.values())
        torch.save({"model": model_state, "optimizer": optim_state}, tmp_path / "state.pt")

        restored = sharded_student(seed=2)  # other weights until the checkpoint is loaded
        restored_opt = build_optimizer(restored, TrainConfig())
        saved = torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=False)
        load_full_state(restored, restored_opt, saved["model"], saved["optimizer"])
        again, _ = full_state(restored, restored_opt)
        assert again.keys() == model_state.keys()
        assert all(torch.equal(again[k], model_state[k]) for k in model_state)
        # Same weights and Adam moments: the next step is the same step.
        assert kd_step(restored, restored_opt, batch) == pytest.approx(
            kd_step(model, optimizer, batch), rel=1e-6
        )


def test_device_map_teacher_on_one_gpu_computes_the_same_shard(
    teacher_dir: Path, examples: list[dict[str, Any]], cpu_shard: ShardData
) -> None:
    memory = visible_gpu_memory()
    assert teacher_placement(1, memory).kind == "cuda"
    # teacher_placement reserves device_map for > 1 GPU; the same weight budget on GPU 0 alone:
    placement = TeacherPlacement("device_map", {0: int(memory[0] * DEVICE_MAP_WEIGHT_FRACTION)})
    model = load_teacher(str(teacher_dir), "float32", placement)
    assert set(model.hf_device_map.values()) == {0}, model.hf_device_map
    shard = compute_shard(MoEAdapter(model), examples, 0, len(examples), OUT, micro_batch=4, pad_id=0)
    assert_same_shard(shard, cpu_shard)


def test_shard_computation_on_cuda_equals_the_cpu_one_within_fp16_rounding(
    teacher_dir: Path, examples: list[dict[str, Any]], cpu_shard: ShardData
) -> None:
    model = load_teacher(str(teacher_dir), "float32", teacher_placement(1, visible_gpu_memory()))
    assert next(model.parameters()).device.type == "cuda"
    shard = compute_shard(MoEAdapter(model), examples, 0, len(examples), OUT, micro_batch=4, pad_id=0)
    assert_same_shard(shard, cpu_shard)
