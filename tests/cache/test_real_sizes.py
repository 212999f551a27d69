"""Real model sizes past the small-number edges: a vocabulary above 65,536 (token and logit indices beyond
16 bits) and more than 64 experts (no 64-bit expert masks), through a real cache build, its reader, the
sparse-logit loss and mass truncation."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from support.tiny import teacher_assets, teacher_cache_spec, tiny_arch

from pipeline.cache import CacheRuntime, build_teacher_cache, open_cache
from pipeline.cache.build.teacher import TeacherShardStage, input_device, teacher_targets, tokenize_shard
from pipeline.data.collate import distill_positions, pad_batch
from pipeline.distill.token_losses import forward_kl
from pipeline.models.build import build_tiny_moe

VOCAB, EXPERTS, HIGH = 70_000, 72, 65_536


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A teacher with 72 experts and a 70,000-entry output vocabulary whose rows past 65,536 dominate its
    logits (so the cached top-k is mostly there), and a cache of it."""
    root = tmp_path_factory.mktemp("big")
    arch = tiny_arch(num_layers=2, num_experts=EXPERTS, top_k=8)
    a = teacher_assets(root, 6, records_seed=3, vocab_size=384, arch=arch, model_seed=0)
    model = build_tiny_moe(arch, VOCAB, a.tok.pad_token_id, a.tok.bos_token_id, a.tok.eos_token_id, seed=0)
    with torch.no_grad():
        model.get_output_embeddings().weight[HIGH:] *= 30.0
    model.save_pretrained(a.root / "teacher")
    spec = teacher_cache_spec(
        a, cached_layers=(0, 1), width=None, logits_k=16, states_dtype="float16", max_length=150
    )
    runtime = CacheRuntime(batch_size=2, rows_per_shard=3, executor="local", progress=False)
    path = build_teacher_cache(spec, a.records, str(root / "caches"), runtime).path
    return {"assets": a, "spec": spec, "path": path, "model": model}


def test_indices_past_16_bits_and_72_expert_gates_round_trip(big: dict[str, Any]) -> None:
    a, model = big["assets"], big["model"].eval()
    cache = open_cache(big["path"])
    assert cache.manifest["teacher"]["vocab_size"] == VOCAB and cache.width == EXPERTS
    rows = cache.read_shard(0, {"logits", "gates"})
    examples = tokenize_shard(a.tok, a.records[:3], 0, big["spec"].max_length)
    for ex, row in zip(examples, rows, strict=True):
        batch = pad_batch([ex], a.tok.pad_token_id)
        mask = distill_positions(batch["response_mask"])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask]
        idx = torch.as_tensor(row["logit_indices"])
        assert int(idx.max()) >= HIGH  # the indices above 16 bits are stored ...
        assert torch.equal(idx.long(), torch.topk(logits, 16).indices)  # ... and are the teacher's own top-k
        kl = forward_kl(
            idx, torch.as_tensor(row["logit_values"]), torch.as_tensor(row["logit_tail_logmass"]), logits
        )
        assert float(kl.abs().max()) < 1e-2  # the teacher against its own cached targets
        gates = torch.as_tensor(row["gates"])
        assert gates.shape[-1] == EXPERTS and torch.allclose(gates.float().sum(-1), torch.ones(1), atol=1e-2)
    regrouped = cache.read_shard(0, {"gates", "expert_states"}, num_student_experts=4)
    assert regrouped[0]["gates"].shape[-1] == 4 and regrouped[0]["expert_states"].shape[-2] == 4


def test_mass_truncation_at_72_experts_keeps_at_least_m(big: dict[str, Any]) -> None:
    spec = dataclasses.replace(big["spec"], states_mass=0.9)
    stage = TeacherShardStage(spec, 4, 2, 0.0)
    a = big["assets"]
    ex = tokenize_shard(a.tok, a.records[:1], 0, spec.max_length)
    batch = {k: v.to(input_device(stage.adapter.model)) for k, v in pad_batch(ex, 0).items()}
    t = teacher_targets(stage.adapter, batch, stage.out)
    assert float(t["states_kept_mass"].min()) >= 0.9 - 1e-6
    exact = teacher_targets(stage.adapter, batch, dataclasses.replace(stage.out, states_mass=1.0))
    assert torch.equal(t["gates"], exact["gates"])  # gates always come from the full distribution
    torch.testing.assert_close(t["gates"].sum(-1), torch.ones_like(t["gates"].sum(-1)))
