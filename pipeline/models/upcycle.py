"""Sparse upcycling: turn a dense Qwen3 / Llama checkpoint into a Qwen3-MoE / Mixtral model.

Every expert starts as a copy of the dense layer's MLP (optionally perturbed with Gaussian noise so experts
can diverge), the router is fresh, everything else is copied. With noise_std=0 and top-k weights that sum to
1 the MoE computes exactly the dense function, so distillation starts from the dense model's quality.

Memory: the MoE skeleton is created on the meta device (accelerate's `init_empty_weights`) and filled tensor
by tensor; when this function loaded the dense model itself, each dense tensor is released once consumed, so
peak memory stays about one model plus one expert stack instead of dense + randomly initialised MoE + copy.
"""

from __future__ import annotations

import copy

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3MoeConfig,
)

from pipeline.errors import ModelError
from pipeline.models.build import load_causal_lm

# dense model_type -> MoE model_type it is upcycled into (same attention/norm parameter names and shapes)
UPCYCLE_TARGETS = {"qwen3": "qwen3_moe", "llama": "mixtral"}

_MLP_SUFFIXES = (".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".mlp.down_proj.weight")


def upcycle_dense_to_moe(
    dense: str | PreTrainedModel, num_experts: int, top_k: int, noise_std: float = 0.0, seed: int = 0
) -> PreTrainedModel:
    """A MoE model (eval mode, dense dtype, on CPU) whose experts are all initialised from `dense`'s MLPs.

    noise_std: std of independent Gaussian noise added to every expert weight (absolute, in weight units).
    seed: seeds the router init and the noise; same inputs -> same model.
    """
    if not 1 <= top_k <= num_experts:
        raise ModelError(
            f"upcycling needs 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}."
        )
    if noise_std < 0:
        raise ModelError(f"noise_std={noise_std} must be >= 0.")
    owned = isinstance(dense, str)
    dense_model = load_causal_lm(dense, setting="upcycle_from") if owned else dense
    moe_config = _moe_config(dense_model.config, num_experts, top_k)
    dtype = dense_model.dtype

    with init_empty_weights():
        moe = AutoModelForCausalLM.from_config(moe_config, dtype=dtype)

    generator = torch.Generator().manual_seed(seed)
    dense_sd = dict(dense_model.state_dict())  # references only; popped as consumed

    def take(name: str) -> torch.Tensor:
        tensor = dense_sd.pop(name)
        if owned:  # drop the module's reference too, so the tensor is freed once we are done with it
            set_module_tensor_to_device(dense_model, name, "meta")
        return tensor.detach().to("cpu")

    with torch.no_grad():
        for name, target in moe.state_dict().items():
            if name.endswith(".mlp.experts.gate_up_proj"):
                prefix = name.removesuffix(".experts.gate_up_proj")
                fused = torch.cat(
                    [take(f"{prefix}.gate_proj.weight"), take(f"{prefix}.up_proj.weight")], dim=0
                )
                value = _expert_stack(fused, num_experts, noise_std, generator)
            elif name.endswith(".mlp.experts.down_proj"):
                prefix = name.removesuffix(".experts.down_proj")
                value = _expert_stack(take(f"{prefix}.down_proj.weight"), num_experts, noise_std, generator)
            elif name.endswith(".mlp.gate.weight"):
                # Small random router: near-uniform routing at first; irrelevant to the output while the
                # experts are identical.
                value = torch.randn(tuple(target.shape), generator=generator) * moe_config.initializer_range
            elif name in dense_sd:
                value = take(name)
            else:
                raise ModelError(
                    f"upcycling {dense_model.config.model_type}: MoE parameter {name!r} has no dense "
                    "counterpart; this checkpoint's layout is not supported (report it with the model's "
                    "config)."
                )
            if tuple(value.shape) != tuple(target.shape):
                raise ModelError(
                    f"upcycling: {name!r} has shape {tuple(value.shape)} in the dense model but the MoE "
                    f"expects {tuple(target.shape)}; the dense config has an unsupported variant."
                )
            set_module_tensor_to_device(moe, name, "cpu", value=value, dtype=dtype)

    leftover = [name for name in dense_sd if not name.endswith(_MLP_SUFFIXES)]
    if leftover:
        raise ModelError(
            f"upcycling: dense parameters {leftover[:5]} have no place in the MoE model, the result would be "
            "wrong; this dense variant is not supported."
        )
    if moe_config.tie_word_embeddings:
        moe.tie_weights()
    still_meta = [n for n, t in [*moe.named_parameters(), *moe.named_buffers()] if t.device.type == "meta"]
    if still_meta:
        raise ModelError(f"upcycling left parameters uninitialised: {still_meta[:5]} (internal error).")
    if getattr(dense_model, "generation_config", None) is not None:
        moe.generation_config = copy.deepcopy(dense_model.generation_config)
    if owned:
        del dense_model
    return moe.eval()


def _expert_stack(
    weight: torch.Tensor, num_experts: int, noise_std: float, generator: torch.Generator
) -> torch.Tensor:
    """[E, *weight.shape]: E copies of one dense weight, each plus its own N(0, noise_std^2) noise."""
    stack = weight.unsqueeze(0).repeat(num_experts, *([1] * weight.dim()))
    if noise_std > 0:
        for expert in stack:  # one expert at a time: fp32 temporaries stay one dense weight in size
            noise = torch.randn(tuple(weight.shape), generator=generator) * noise_std
            expert.copy_((weight.float() + noise).to(weight.dtype))
    return stack


def _moe_config(dense: PretrainedConfig, num_experts: int, top_k: int) -> PretrainedConfig:
    model_type = getattr(dense, "model_type", None)
    if model_type not in UPCYCLE_TARGETS:
        raise ModelError(
            f"cannot upcycle model type {model_type!r}; supported dense types: "
            + ", ".join(f"{d} -> {m}" for d, m in UPCYCLE_TARGETS.items())
            + ". Start from a Qwen3 or Llama checkpoint, or use an existing MoE model as the student."
        )
    common = dict(
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        head_dim=getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads,
        hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings,
        initializer_range=dense.initializer_range,
        rms_norm_eps=dense.rms_norm_eps,
        rope_parameters=copy.deepcopy(dense.rope_parameters),
        attention_dropout=dense.attention_dropout,
        tie_word_embeddings=dense.tie_word_embeddings,
        num_experts_per_tok=top_k,
        output_router_logits=False,  # no load-balancing aux loss unless the caller turns it on
        pad_token_id=dense.pad_token_id,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
    )
    if model_type == "qwen3":
        if "sliding_attention" in (getattr(dense, "layer_types", None) or []):
            raise ModelError(
                "cannot upcycle a Qwen3 model with sliding-window layers: Qwen3-MoE applies its window to "
                "every layer, so the result would not match. Use a checkpoint with use_sliding_window=false."
            )
        return Qwen3MoeConfig(
            **common,
            moe_intermediate_size=dense.intermediate_size,
            num_experts=num_experts,
            norm_topk_prob=True,  # weights sum to 1: identical experts reproduce the dense MLP exactly
            decoder_sparse_step=1,
            mlp_only_layers=[],
            attention_bias=dense.attention_bias,
            use_sliding_window=False,
        )
    if getattr(dense, "attention_bias", False) or getattr(dense, "mlp_bias", False):
        raise ModelError(
            "cannot upcycle a Llama model with attention_bias/mlp_bias into Mixtral (Mixtral has no biases)."
        )
    return MixtralConfig(
        **common, num_local_experts=num_experts, router_jitter_noise=0.0, sliding_window=None
    )
