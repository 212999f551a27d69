"""Build small Qwen3-MoE students from a config, load any causal LM, count parameters."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3Config, Qwen3MoeConfig

from pipeline.config import ArchitectureConfig, LoraMoEConfig
from pipeline.errors import ConfigError, ModelError

# Importing it registers the LoRA-MoE student with the Auto classes: load_causal_lm loads its exports.
from pipeline.models.lora_moe import Qwen3LoraMoEForCausalLM, lora_moe_config
from pipeline.network import hub_load_kwargs


@dataclass(frozen=True)
class TinyMoEConfig(ArchitectureConfig):
    """Architecture of a from-scratch Qwen3-MoE; every decoder layer is MoE.

    The config's `build:` section (ArchitectureConfig) plus initialisation details no config sets. Its size
    defaults are smaller than the section's (which describe the demo student) so that tests build in
    milliseconds; `materialize_model` always passes the section's values.
    """

    hidden_size: int = 64
    num_layers: int = 2
    moe_intermediate_size: int = 64
    head_dim: int = 16
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    # Renormalised top-k weights (sum 1) keep the MoE output on the scale of one expert, as Mixtral does.
    norm_topk_prob: bool = True
    # Tied by default: a small student's vocab embedding dominates its size (151k x H for a Qwen tokenizer).
    tie_word_embeddings: bool = True
    # 0 = off: B-Distill's router loss replaces the load-balancing loss; >0 turns on transformers' aux loss.
    router_aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        positive = (
            "hidden_size",
            "num_layers",
            "num_experts",
            "top_k",
            "moe_intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        )
        bad = [f"{name}={getattr(self, name)}" for name in positive if int(getattr(self, name)) <= 0]
        if bad:
            raise ConfigError(f"TinyMoEConfig: {', '.join(bad)} must be positive integers.")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"TinyMoEConfig: top_k={self.top_k} > num_experts={self.num_experts}; "
                "set top_k <= num_experts."
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"TinyMoEConfig: num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)."
            )
        if self.router_aux_loss_coef < 0:
            raise ConfigError(
                f"TinyMoEConfig: router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0."
            )


def _shared_hf_kwargs(
    cfg: TinyMoEConfig, vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int
) -> dict[str, Any]:
    """What a tiny MoE and its dense counterpart (`build_tiny_dense`) share: all but the MLP."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def tiny_moe_hf_config(
    cfg: TinyMoEConfig, vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int
) -> Qwen3MoeConfig:
    """The transformers config `build_tiny_moe` instantiates."""
    return Qwen3MoeConfig(
        **_shared_hf_kwargs(cfg, vocab_size, pad_token_id, bos_token_id, eos_token_id),
        intermediate_size=cfg.moe_intermediate_size,  # unused: no dense MLP layers
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=cfg.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        output_router_logits=cfg.router_aux_loss_coef > 0,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
    )


def build_tiny_moe(
    cfg: TinyMoEConfig, vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int, seed: int
) -> PreTrainedModel:
    """A randomly initialised fp32 Qwen3MoeForCausalLM (eval mode), identical for identical arguments."""
    for name, token_id in (("pad", pad_token_id), ("bos", bos_token_id), ("eos", eos_token_id)):
        if not 0 <= token_id < vocab_size:
            raise ConfigError(
                f"{name}_token_id={token_id} is outside the vocabulary [0, {vocab_size}); pass the "
                "tokenizer's ids and len(tokenizer) as vocab_size."
            )
    hf_config = tiny_moe_hf_config(cfg, vocab_size, pad_token_id, bos_token_id, eos_token_id)
    # A private RNG scope: deterministic weights without disturbing the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return model.eval()


def build_tiny_dense(arch: ArchitectureConfig, tokenizer: Any, seed: int) -> PreTrainedModel:
    """The dense Qwen3 counterpart of a tiny MoE (same width, depth, attention; one MLP as wide as one
    expert): what `student.init: upcycle` pretrains and `upcycle_dense_to_moe` turns back into that MoE."""
    cfg = TinyMoEConfig(**dataclasses.asdict(arch))
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    hf_config = Qwen3Config(
        **_shared_hf_kwargs(cfg, len(tokenizer), tokenizer.pad_token_id, bos, tokenizer.eos_token_id),
        intermediate_size=cfg.moe_intermediate_size,
        use_sliding_window=False,
    )
    with torch.random.fork_rng(devices=[]):  # deterministic weights, the caller's RNG untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return model.eval()


def lora_moe_from_dense(
    dense: str | PreTrainedModel, settings: LoraMoEConfig, num_experts: int, top_k: int, seed: int
) -> Qwen3LoraMoEForCausalLM:
    """MoE-KD's student (pipeline.models.lora_moe): `dense` (a Qwen3 model or its checkpoint) with
    `num_experts` top-`top_k` LoRA experts beside the MLP of `settings.layers` (None: every layer). Every
    dense weight is copied unchanged; routers and experts are drawn from `seed` (eval mode, the dense
    model's dtype)."""
    model = load_causal_lm(dense, setting="the pretrained dense student") if isinstance(dense, str) else dense
    if model.config.model_type != "qwen3":
        raise ModelError(
            f"the LoRA-MoE student is built on a dense Qwen3 model, got a {model.config.model_type!r} one. "
            "Fix: give student.init: lora-moe a student.build (its dense counterpart is a Qwen3)."
        )
    depth = model.config.num_hidden_layers
    layers = list(range(depth)) if settings.layers is None else list(settings.layers)
    config = lora_moe_config(model.config, layers, num_experts, top_k, settings.rank, settings.alpha)
    with torch.random.fork_rng(devices=[]):  # deterministic experts, the caller's RNG untouched
        torch.manual_seed(seed)
        student = Qwen3LoraMoEForCausalLM(config)
    missing, unexpected = student.load_state_dict(model.state_dict(), strict=False)
    new = [k for k in missing if ".mlp.lora_" not in k]
    if new or unexpected:  # only the mixture may be new: anything else means the two models differ
        raise ModelError(
            f"the dense model does not fit its LoRA-MoE counterpart (missing {new[:3]}, unexpected "
            f"{unexpected[:3]}). Fix: build the LoRA-MoE student from a dense Qwen3 checkpoint."
        )
    return student.to(model.dtype).eval()


def load_causal_lm(
    name_or_path: str, torch_dtype: torch.dtype | str | None = None, setting: str = "the model"
) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` (eval mode) with an actionable ModelError when it cannot load.

    torch_dtype: a torch.dtype, its name ("bfloat16") or "auto"; None = the checkpoint's dtype
    (transformers 5's default, "auto"). `setting`: the config key that named it, for the offline-hub error.
    """
    kwargs = {} if torch_dtype is None else {"dtype": _as_dtype(torch_dtype)}
    kwargs.update(hub_load_kwargs(name_or_path, setting))  # an offline hub id fails here, in seconds
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        if os.path.isdir(name_or_path):
            where = (
                f"directory {name_or_path!r} exists but is not a loadable checkpoint (it needs the "
                "config.json and *.safetensors files that save_pretrained writes)"
            )
        elif (
            os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or os.path.exists(name_or_path)
        ):
            where = f"no checkpoint directory at {name_or_path!r}: check the path"
        else:
            where = (
                f"{name_or_path!r} is not a local directory, so it was treated as a Hugging Face Hub id: "
                "is this machine offline (HF_HUB_OFFLINE=1)? Check the path, or download the model where "
                "there is internet and pass its local directory"
            )
        raise ModelError(f"cannot load causal LM {name_or_path!r}: {where}. Cause: {exc}") from exc
    return model.eval()


def _as_dtype(torch_dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(torch_dtype, torch.dtype) or torch_dtype == "auto":
        return torch_dtype
    dtype = getattr(torch, str(torch_dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise ModelError(
            f"unknown torch_dtype {torch_dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'."
        )
    return dtype


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
