"""The real-shape benchmark's student steps (jobs/benchmarks/real_shape_student.py): the teacher's targets
laid out as the cache reader gives them, then sft / kd / b-distill steps of a student of another width,
timed interleaved. Tiny shapes here; the real ones are only configs. No Ray."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from support.paths import REPO
from transformers import Qwen3MoeConfig

from pipeline.cache.build.teacher import TeacherOutputSpec, teacher_targets
from pipeline.data.collate import distill_positions
from pipeline.models.adapter import MoEAdapter
from pipeline.models.build import TinyMoEConfig, build_tiny_moe

sys.path.insert(0, str(REPO / "jobs" / "benchmarks"))
from real_shape_student import (
    olmoe_small,
    print_student_steps,
    qwen3_06b_moe,
    student_step_trials,
    teacher_batch,
)

VOCAB = 96


def tiny_student(layers: int, vocab: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
        intermediate_size=8, max_position_embeddings=64,
    )  # fmt: skip


def test_student_steps_train_on_the_teachers_targets(capsys: pytest.CaptureFixture[str]) -> None:
    arch = TinyMoEConfig(hidden_size=32, num_layers=2, num_experts=8, top_k=2, moe_intermediate_size=8,
                         num_heads=2, num_kv_heads=1, head_dim=16)  # fmt: skip
    adapter = MoEAdapter(build_tiny_moe(arch, VOCAB, 0, 1, 2, seed=0).eval())
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    response = torch.cat([torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)], 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": response}
    out = TeacherOutputSpec((0, 1), 4, "topk", 8, "float16", True, "none", 1)
    exact = teacher_targets(adapter, batch, out)
    tokens = int(distill_positions(response).sum())

    full = teacher_batch(batch, exact, out.logits_k)
    assert "logits" not in full and "logits" in exact  # the sweep's reference is left as it was
    assert full["logit_indices"].shape == full["logit_values"].shape == (tokens, 8)
    assert full["expert_states"].shape == (tokens, 2, 4, 32) and full["gates"].shape == (tokens, 2, 4)

    dims = {"num_layers": 2, "vocab_size": VOCAB, "hidden_size": 32}
    trials, config, params = student_step_trials(tiny_student, dims, full, SimpleNamespace(trials=2))
    assert list(trials.seconds) == ["sft", "kd", "b-distill"]
    assert all(len(t) == 2 and min(t) > 0 for t in trials.seconds.values())
    assert all(rss > 0 for rss in trials.peak_rss.values())
    assert config.hidden_size == 16 and config.vocab_size == VOCAB and 0 < params < 1
    print_student_steps(trials, config, params, tokens, 2)
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.split()]
    assert {"sft", "kd", "b-distill"} <= set(rows)


def test_the_real_students_have_the_real_width_vocabulary_and_experts() -> None:
    qwen, olmoe = qwen3_06b_moe(2, 151_936), olmoe_small(2, 50_304)
    assert (qwen.hidden_size, qwen.vocab_size, qwen.num_experts) == (1024, 151_936, 4)
    assert qwen.num_hidden_layers == olmoe.num_hidden_layers == 2
    assert (olmoe.hidden_size, olmoe.vocab_size, olmoe.num_experts) == (1024, 50_304, 4)
