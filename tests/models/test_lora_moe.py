"""MoE-KD's LoRA-MoE student (pipeline.models.lora_moe): its forward against a hand computation, which
layers it changes, its export (loaded by the pipeline, and by a user with trust_remote_code alone), and the
config switch `student.init: lora-moe`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.paths import CONFIGS

from pipeline.config import ArchitectureConfig, LoraMoEConfig, load_config, with_overrides
from pipeline.distill.methods import check_method_student
from pipeline.distill.stage import default_run_name
from pipeline.errors import ConfigError
from pipeline.models.build import build_tiny_dense, load_causal_lm, lora_moe_from_dense
from pipeline.models.lora_moe import LoraMoEMLP, Qwen3LoraMoEForCausalLM

ARCH = ArchitectureConfig(
    hidden_size=16, num_layers=3, num_experts=4, top_k=2, moe_intermediate_size=24, num_heads=2,
    num_kv_heads=1, head_dim=8, max_position_embeddings=64,
)  # fmt: skip
RANK, CHOSEN = 3, [1]


class _Tokenizer:
    """What build_tiny_dense reads of a tokenizer: its size and special ids."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 50


def _dense() -> torch.nn.Module:
    return build_tiny_dense(ARCH, _Tokenizer(), seed=0)


def _student(alpha: float = 0.5, layers: list[int] | None = CHOSEN) -> Qwen3LoraMoEForCausalLM:
    lora = LoraMoEConfig(layers=layers, rank=RANK, alpha=alpha)
    return lora_moe_from_dense(_dense(), lora, ARCH.num_experts, ARCH.top_k, seed=3)


def test_mixture_layer_equals_a_hand_computation() -> None:
    """y = MLP(x) + a * sum over the top-2 experts of the renormalised softmax weight times
    W2 (LeakyReLU(W1 x) * W3 x), each W = B A; in float64, token by token."""
    student = _student(alpha=0.5).double()
    mlp = student.model.layers[1].mlp
    assert isinstance(mlp, LoraMoEMLP)
    x = torch.randn(2, 5, ARCH.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = mlp(x)

    def low_rank(proj, v):
        return proj.lora_b @ (proj.lora_a @ v)

    for b in range(2):
        for t in range(5):
            v = x[b, t]
            dense = mlp.down_proj.weight @ (F.silu(mlp.gate_proj.weight @ v) * (mlp.up_proj.weight @ v))
            p = torch.softmax(mlp.lora_router.weight @ v, dim=0)
            top = sorted(range(ARCH.num_experts), key=lambda e: -p[e].item())[:2]
            mixture = torch.zeros_like(v)
            for e in top:
                ex = mlp.lora_experts[e]
                hidden = F.leaky_relu(low_rank(ex.w1, v), 0.01) * low_rank(ex.w3, v)
                mixture += p[e] / (p[top[0]] + p[top[1]]) * low_rank(ex.w2, hidden)
            torch.testing.assert_close(got[b, t], dense + 0.5 * mixture, rtol=1e-10, atol=1e-12)
    assert mixture.abs().max() > 1e-3  # the experts contribute (their B is not zero, as released)


def test_only_the_chosen_layers_change_and_a_zero_scale_is_the_dense_model() -> None:
    dense, student = _dense(), _student(alpha=0.0)
    dense_sd, student_sd = dense.state_dict(), student.state_dict()
    for key, tensor in dense_sd.items():  # every dense weight, under its own name, unchanged
        assert torch.equal(student_sd[key], tensor), key
    h, f, e = ARCH.hidden_size, ARCH.moe_intermediate_size, ARCH.num_experts
    expected = {"model.layers.1.mlp.lora_router.weight": (e, h)}
    for i in range(e):
        prefix = f"model.layers.1.mlp.lora_experts.{i}"
        for proj, (n_in, n_out) in {"w1": (h, f), "w3": (h, f), "w2": (f, h)}.items():
            expected[f"{prefix}.{proj}.lora_a"] = (RANK, n_in)
            expected[f"{prefix}.{proj}.lora_b"] = (n_out, RANK)
    added = {k: tuple(v.shape) for k, v in student_sd.items() if k not in dense_sd}
    assert added == expected
    mlps = [type(layer.mlp).__name__ for layer in student.model.layers]
    assert mlps == ["Qwen3MLP", "LoraMoEMLP", "Qwen3MLP"]
    ids = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(student(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=0, atol=0)
    every = _student(layers=None)
    assert all(isinstance(layer.mlp, LoraMoEMLP) for layer in every.model.layers)


def test_export_loads_in_the_pipeline_and_with_trust_remote_code_alone(tmp_path: Path) -> None:
    """save_pretrained writes the module's code beside the weights: the pipeline loads the export through
    the Auto classes, a user's process without the project with `trust_remote_code=True`."""
    student = _student()
    student.save_pretrained(tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "qwen3_lora_moe" and (tmp_path / "export" / "lora_moe.py").is_file()
    ids = torch.randint(3, 50, (1, 7), generator=torch.Generator().manual_seed(2))
    expected = student(input_ids=ids).logits
    torch.testing.assert_close(load_causal_lm(str(tmp_path / "export"))(input_ids=ids).logits, expected)
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'export')!r}, trust_remote_code=True); "
        "assert not any(k.startswith('pipeline') for k in sys.modules), 'the project was imported'; "
        f"torch.save(m(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits, "
        f"{str(tmp_path / 'out.pt')!r})"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected)


def test_config_switch_is_validated_and_keeps_other_fingerprints() -> None:
    demo = load_config(CONFIGS / "demo.yaml")
    lora = with_overrides(demo, {"student.init": "lora-moe", "distill.method": "moe-kd"})
    assert lora.student.lora_moe == LoraMoEConfig()
    for bad, match in (
        ({"student.lora_moe.layers": [0, 9]}, "distinct decoder layers"),
        ({"student.lora_moe.layers": []}, "distinct decoder layers"),
        ({"student.lora_moe.rank": 0}, "rank=0 must be >= 1"),
    ):
        with pytest.raises(ConfigError, match=match):
            with_overrides(lora, bad)
    # LoRA settings decide a LoRA-MoE run, and no other student's run
    assert default_run_name(with_overrides(lora, {"student.lora_moe.rank": 8}), "k") != default_run_name(
        lora, "k"
    )
    upcycled = with_overrides(demo, {"student.init": "upcycle"})
    assert default_run_name(with_overrides(upcycled, {"student.lora_moe.rank": 8}), "k") == default_run_name(
        upcycled, "k"
    )


def test_moe_kd_and_the_lora_moe_student_go_together() -> None:
    demo = load_config(CONFIGS / "demo.yaml")
    check_method_student(with_overrides(demo, {"distill.method": "moe-kd"}).distill, "lora-moe")
    check_method_student(with_overrides(demo, {"distill.method": "kd"}).distill, "lora-moe")
    with pytest.raises(ConfigError, match=r"Fix: --set student.init=lora-moe"):
        check_method_student(with_overrides(demo, {"distill.method": "moe-kd"}).distill, "upcycle")
    for method in ("b-distill", "b-distill-official", "gkd-on-policy"):
        with pytest.raises(ConfigError, match="trains on logits only"):
            check_method_student(with_overrides(demo, {"distill.method": method}).distill, "lora-moe")
