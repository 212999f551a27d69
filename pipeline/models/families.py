"""Where each transformers MoE family keeps its router, experts and shared experts: one dispatch table.

Light on purpose (no torch): the cache and distillation stages check a model's family from its config.json
before Ray starts, and count its MoE layers from the config alone (`moe_layer_indices`). The math that reads
the modules lives in `pipeline.models.moe_blocks`; docs/model-families.md states the semantics per family.

A model type missing from `FAMILIES` is read with `DEFAULT_FAMILY` (the Qwen3-MoE layout: `mlp.gate` top-k
softmax router, `mlp.experts` fused experts, nothing else in the block); the adapter refuses it when its
modules do not have exactly that structure, or when its block's output and top-k weights on a random probe
are not what that entry computes (pipeline.models.moe_blocks.verify_block).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class MoEFamily:
    """How one family's sparse block is laid out in transformers 5.x (`models/<family>/modeling_*.py`)."""

    block: str = "mlp"  # the decoder layer's attribute holding the MoE block (dense layers: a plain MLP)
    router: str = "gate"  # the block's router module
    router_weight: str = "weight"  # dotted path of the router's [E, H] weight inside the router
    # How the router is called and what it returns:
    #   "triple": router(x) -> (logits, top-k weights, top-k indices)
    #   "bias_arg": router(x, block.e_score_correction_bias) -> the same triple (MiniMax-M2)
    #   "dense_scores": router(x) -> ([N, E] scores, -inf/0 off the top-k after a sigmoid, logits) (Llama 4)
    #   "grouped": router(x) -> (sorted positions, token index, gates, expert sizes, logits) (JetMoE)
    router_call: Literal["triple", "bias_arg", "dense_scores", "grouped"] = "triple"
    # The full router distribution p over all experts (docs/model-families.md):
    #   "softmax": softmax(logits); "sigmoid": sigmoid(logits) / sum(sigmoid(logits)) (the selection bias
    #   e_score_correction_bias and group limits only choose the top-k; they are not part of p).
    scores: Literal["softmax", "sigmoid"] = "softmax"
    # Fused gate_up_proj/down_proj, or JetMoE's ParallelExperts (input_linear/output_linear).
    experts: Literal["fused", "parallel"] = "fused"
    # Layout of fused experts whose class lacks transformers' use_experts_implementation flags (Llama 4).
    transposed_experts: bool = False
    # "output": block = sum_k w_k E_k(x); "input": block = sum_k E_k(w_k x) (Llama 4 scales the expert input).
    combine: Literal["output", "input"] = "output"
    shared: tuple[str, ...] = ()  # block attributes holding always-on shared experts
    # Block attribute: a [H -> 1] linear whose sigmoid scales the shared experts' output (Qwen2-MoE).
    shared_gate: str | None = None
    layer_shared: str | None = None  # decoder-layer attribute: a shared MLP added to the block's output
    output_bias: str | None = None  # block attribute: a bias added to the block's output (JetMoE)
    # Whether the top-k weights are renormalised to sum 1: None reads the router's/config's norm_topk_prob.
    renormalize: bool | None = None
    # Whether the router returns (logits, weights, indices) with weights the (renormalised) softmax of the
    # top-k: what knowledge augmentation and SAR rewrite in a forward hook.
    softmax_topk_router: bool = True


_SIGMOID = dict(scores="sigmoid", softmax_topk_router=False)
_DEEPSEEK = dict(shared=("shared_experts",))

DEFAULT_FAMILY = MoEFamily()

# Checked against transformers 5.25; tests/models/test_model_families.py checks every entry's exactness.
FAMILIES: dict[str, MoEFamily] = {
    "qwen3_moe": DEFAULT_FAMILY,
    "olmoe": DEFAULT_FAMILY,
    "mixtral": MoEFamily(renormalize=True),
    "qwen2_moe": MoEFamily(shared=("shared_expert",), shared_gate="shared_expert_gate"),
    "qwen3_next": MoEFamily(shared=("shared_expert",), shared_gate="shared_expert_gate"),
    # DeepSeek-V2: softmax scores, greedy or group-limited top-k, never renormalised, x routed_scaling_factor.
    "deepseek_v2": MoEFamily(**_DEEPSEEK, renormalize=False, softmax_topk_router=False),
    "deepseek_v3": MoEFamily(**_DEEPSEEK, **_SIGMOID),
    "glm4_moe": MoEFamily(**_DEEPSEEK, **_SIGMOID),
    "gpt_oss": MoEFamily(router="router", renormalize=True),
    "granitemoe": MoEFamily(block="block_sparse_moe", router="router", renormalize=True),
    "granitemoeshared": MoEFamily(
        block="block_sparse_moe", router="router", renormalize=True, layer_shared="shared_mlp"
    ),
    "llama4_text": MoEFamily(
        block="feed_forward",
        router="router",
        router_call="dense_scores",
        transposed_experts=True,
        combine="input",
        shared=("shared_expert",),
        renormalize=False,
        **_SIGMOID,
    ),
    "minimax_m2": MoEFamily(router_call="bias_arg", renormalize=True, **_SIGMOID),
    "jetmoe": MoEFamily(
        router="router",
        router_weight="layer.weight",
        router_call="grouped",
        experts="parallel",
        output_bias="bias",
        renormalize=True,
        softmax_topk_router=False,
    ),
    "hunyuan_v1_moe": MoEFamily(shared=("shared_mlp",), router_weight="wg.weight", renormalize=True),
}

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

# Multimodal wrappers whose language model the adapter reads once saved on its own.
_TEXT_MODEL_OF = {"llama4": "llama4_text (Llama4ForCausalLM)"}


def family_of(model_type: str) -> MoEFamily:
    """The family's table entry; DEFAULT_FAMILY for a type not in the table (checked on its modules)."""
    return FAMILIES.get(model_type, DEFAULT_FAMILY)


def check_model_type(model_type: str, name: str, role: str) -> None:
    """ConfigError naming the fix for a model type the adapter cannot read as it is saved."""
    if model_type in _TEXT_MODEL_OF:
        raise ConfigError(
            f"{role} {name!r} is a multimodal {model_type!r} checkpoint; the adapter reads its text model. "
            f"Fix: save the language model on its own as {_TEXT_MODEL_OF[model_type]} and point at that."
        )


def _as_int(value: Any, key: str, name: str) -> int:
    if isinstance(value, list):  # HunYuan allows per-layer lists; B-Distill needs one expert count
        if len(set(value)) != 1:
            raise ConfigError(
                f"config.json of {name!r} gives per-layer {key}={value}; B-Distill needs the same value in "
                "every MoE layer. Fix: use a checkpoint with one value for every layer."
            )
        value = value[0]
    return int(value)


def num_routed_experts(cfg: Mapping[str, Any], name: str) -> int | None:
    """Routed experts per MoE layer from a config.json mapping (each family's spelling); None: dense."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        if cfg.get(key):
            return _as_int(cfg[key], key, name)
    return None


def moe_layer_indices(cfg: Mapping[str, Any], num_decoder_layers: int) -> list[int]:
    """Decoder layers holding an MoE block, from the config keys transformers' families read:
    `moe_layers` (Llama 4), `first_k_dense_replace` (DeepSeek, GLM), `mlp_only_layers` and
    `decoder_sparse_step` (Qwen2/3-MoE, Qwen3-Next). A family's config lacks the keys it does not read."""
    if cfg.get("moe_layers") is not None:
        return sorted(int(i) for i in cfg["moe_layers"])
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    dense_only = {int(i) for i in cfg.get("mlp_only_layers") or ()}
    step = int(cfg.get("decoder_sparse_step") or 1)
    return [
        i
        for i in range(num_decoder_layers)
        if i >= first_dense and i not in dense_only and (i + 1) % step == 0
    ]
