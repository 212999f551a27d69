"""student.init: upcycle without Ray: the dense counterpart, its upcycled MoE, and the config rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.paths import TINY

from pipeline.config import ArchitectureConfig, ModelConfig, load_config
from pipeline.data.demo_tokenizer import train_demo_tokenizer
from pipeline.errors import ConfigError
from pipeline.models.build import build_tiny_dense
from pipeline.models.dims import model_dims
from pipeline.models.upcycle import upcycle_dense_to_moe


def test_upcycled_dense_student_computes_the_dense_function(tmp_path: Path) -> None:
    tok = train_demo_tokenizer(["a tiny corpus for a tiny tokenizer"] * 4, tmp_path / "tok", vocab_size=300)
    arch = ArchitectureConfig(
        hidden_size=32, num_layers=2, num_experts=4, top_k=2, moe_intermediate_size=48, num_heads=2,
        num_kv_heads=1, head_dim=16,
    )  # fmt: skip
    dense = build_tiny_dense(arch, tok, seed=3)
    assert dense.config.model_type == "qwen3" and dense.config.intermediate_size == 48
    moe = upcycle_dense_to_moe(dense, num_experts=arch.num_experts, top_k=arch.top_k, seed=3)
    ids = torch.randint(0, len(tok), (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moe_logits, dense_logits = moe(input_ids=ids).logits, dense(input_ids=ids).logits
    torch.testing.assert_close(moe_logits, dense_logits, atol=1e-5, rtol=1e-5)
    # Same shape as the from-scratch student it stands in for.
    dense.save_pretrained(tmp_path / "dense")
    dims = model_dims(ModelConfig(upcycle_from=str(tmp_path / "dense"), num_experts=4, top_k=2))
    assert (dims.num_layers, dims.num_experts, dims.hidden_size) == (2, 4, 32)


def test_upcycle_init_needs_a_built_student() -> None:
    with pytest.raises(ConfigError, match=r"teacher.init: upcycle .* Fix: set teacher.init: random"):
        load_config(TINY, {"teacher.init": "upcycle"})
    assert load_config(TINY, {"student.init": "upcycle"}).student.init == "upcycle"
    with pytest.raises(ConfigError, match=r"student\.init"):
        load_config(TINY, {"student.init": "pretrained"})
