"""Tiny random models of every MoE family the adapter reads, built from transformers' config classes (never
downloaded): fp32, init large enough that a 1e-5 tolerance tests the math, and every selection bias, router
bias and expert bias drawn at random (their defaults are zeros, which would hide a bias the adapter dropped).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as T
from transformers import AutoModelForCausalLM, PreTrainedModel

INIT = 0.2

# model type -> (config class, its own spellings of: routed experts, experts per token, expert width).
_SPELLING: dict[str, tuple[Any, str, str, str]] = {
    "qwen3_moe": (T.Qwen3MoeConfig, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "mixtral": (T.MixtralConfig, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "olmoe": (T.OlmoeConfig, "num_experts", "num_experts_per_tok", "intermediate_size"),
    "qwen2_moe": (T.Qwen2MoeConfig, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "qwen3_next": (T.Qwen3NextConfig, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "deepseek_v2": (T.DeepseekV2Config, "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "deepseek_v3": (T.DeepseekV3Config, "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "glm4_moe": (T.Glm4MoeConfig, "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "gpt_oss": (T.GptOssConfig, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "granitemoe": (T.GraniteMoeConfig, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "granitemoeshared": (
        T.GraniteMoeSharedConfig, "num_local_experts", "num_experts_per_tok", "intermediate_size"
    ),
    "llama4_text": (T.Llama4TextConfig, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "minimax_m2": (T.MiniMaxM2Config, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "jetmoe": (T.JetMoeConfig, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "hunyuan_v1_moe": (T.HunYuanMoEV1Config, "num_experts", "moe_topk", "intermediate_size"),
}  # fmt: skip

FAMILY_TYPES = tuple(_SPELLING)

_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)


def _family_kwargs(model_type: str, layers: int, experts: int, hidden: int) -> dict[str, Any]:
    """What each family needs beyond the shared shape: shared experts, dense layers, its routing knobs."""
    groups = 2 if experts % 2 == 0 and experts >= 4 else 1
    return {
        "qwen3_moe": dict(mlp_only_layers=[0] if layers > 2 else [], intermediate_size=40),
        "olmoe": {},
        "mixtral": {},
        "qwen2_moe": dict(shared_expert_intermediate_size=16, intermediate_size=40, mlp_only_layers=[0]),
        "qwen3_next": dict(
            shared_expert_intermediate_size=16,
            intermediate_size=40,
            layer_types=(["linear_attention", "full_attention"] * layers)[:layers],
            linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        ),
        "deepseek_v2": dict(
            **_MLA, q_lora_rank=None, intermediate_size=40, n_shared_experts=1, first_k_dense_replace=1,
            num_key_value_heads=4, head_dim=None, topk_method="group_limited_greedy", n_group=groups,
            topk_group=1, routed_scaling_factor=1.5,
        ),
        "deepseek_v3": dict(
            **_MLA, q_lora_rank=16, intermediate_size=40, n_shared_experts=1, first_k_dense_replace=1,
            num_key_value_heads=4, head_dim=None, n_group=groups, topk_group=1, routed_scaling_factor=2.5,
        ),
        "glm4_moe": dict(
            intermediate_size=40, n_shared_experts=1, first_k_dense_replace=1, n_group=groups, topk_group=1,
            routed_scaling_factor=1.5,
        ),
        "gpt_oss": dict(
            layer_types=(["sliding_attention", "full_attention"] * layers)[:layers], sliding_window=16
        ),
        "granitemoe": {},
        "granitemoeshared": dict(shared_intermediate_size=16),
        "llama4_text": dict(intermediate_size_mlp=40, interleave_moe_layer_step=2, attention_chunk_size=16),
        "minimax_m2": {},
        "jetmoe": dict(kv_channels=8),
        "hunyuan_v1_moe": {},
    }[model_type]  # fmt: skip


def family_config(
    model_type: str,
    *,
    layers: int = 3,
    experts: int = 8,
    top_k: int = 2,
    hidden: int = 32,
    expert_width: int = 24,
    vocab_size: int = 96,
    token_ids: tuple[int, int, int] = (0, 1, 2),
) -> Any:
    """A tiny config of `model_type` (pad/bos/eos = `token_ids`); 4 heads of hidden // 4 (OLMoE's q/k norms
    need heads x head_dim = hidden)."""
    cls, e_key, k_key, i_key = _SPELLING[model_type]
    pad, bos, eos = token_ids
    if model_type == "llama4_text":
        top_k = 1  # Llama 4 routes every token to one expert
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256, initializer_range=INIT,
        pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=False,
        **{e_key: experts, k_key: top_k, i_key: expert_width},
    )  # fmt: skip
    kwargs.update(_family_kwargs(model_type, layers, experts, hidden))
    if kwargs.get("head_dim", 0) is None:
        del kwargs["head_dim"]  # MLA families derive theirs
    return cls(**kwargs)


def randomize_biases(model: PreTrainedModel, seed: int) -> None:
    """Selection biases, router biases, expert biases and output biases drawn at random."""
    g = torch.Generator().manual_seed(seed)
    suffixes = ("e_score_correction_bias", "router.bias", "proj_bias", "mlp.bias")
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(suffixes):
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)


def family_model(model_type: str, seed: int = 0, **shape: Any) -> PreTrainedModel:
    """A random tiny model of `model_type` in fp32, eval mode; `shape` as family_config takes it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(model_type, **shape), dtype=torch.float32)
    randomize_biases(model, seed)
    return model.eval()
