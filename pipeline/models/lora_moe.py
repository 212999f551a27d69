"""A dense Qwen3 whose chosen MLP layers get a parallel mixture of LoRA experts: MoE-KD's student.

MoE-KD (Xu et al. 2024, "Sparse Mixture of Experts Language Models Excel in Knowledge Distillation", NLPCC;
public code: github.com/sprog-xhy/MoE-KD-release) distils into a dense model whose MLP output at a chosen
layer becomes

    y = MLP(x) + a * sum_{e in top-k(p)} (p_e / sum_{top-k} p) * E_e(x),    p = softmax(W_r x),

each expert a SwiGLU-shaped MLP whose three projections are rank-r products (E_e(x) = W2 (LeakyReLU(W1 x) *
W3 x), W_i = B_i A_i), the dense MLP kept as it was. This file is self-contained (torch and transformers
only) on purpose: `save_pretrained` copies it next to an exported student, so a user loads the checkpoint
with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` and no project code. Inside the
project importing this module registers the model type, so the pipeline loads it without remote code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

MODEL_TYPE = "qwen3_lora_moe"


class Qwen3LoraMoEConfig(Qwen3Config):
    """Qwen3Config plus the mixture: the decoder layers that carry it, experts, top-k, rank r, scale a."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        lora_moe_layers: Sequence[int] = (),
        lora_moe_num_experts: int = 4,
        lora_moe_top_k: int = 2,
        lora_moe_rank: int = 16,
        lora_moe_alpha: float = 1.0,
        **kwargs,
    ) -> None:
        self.lora_moe_layers = [int(i) for i in lora_moe_layers]
        self.lora_moe_num_experts = int(lora_moe_num_experts)
        self.lora_moe_top_k = int(lora_moe_top_k)
        self.lora_moe_rank = int(lora_moe_rank)
        self.lora_moe_alpha = float(lora_moe_alpha)
        super().__init__(**kwargs)


class LowRankLinear(nn.Module):
    """x -> B A x without a bias: one projection of a LoRA expert (A [r, in], B [out, r])."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank))
        # As the released code: both factors Kaiming-uniform with a = 1 (B is not zero, unlike LoRA).
        nn.init.kaiming_uniform_(self.lora_a, a=1.0)
        nn.init.kaiming_uniform_(self.lora_b, a=1.0)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.lora_a.T @ self.lora_b.T


class LoraExpert(nn.Module):
    """W2 (LeakyReLU(W1 x) * W3 x), each W a rank-r product: the released code's SparseExpertMLP."""

    def __init__(self, hidden_size: int, intermediate_size: int, rank: int) -> None:
        super().__init__()
        self.w1 = LowRankLinear(hidden_size, intermediate_size, rank)
        self.w3 = LowRankLinear(hidden_size, intermediate_size, rank)
        self.w2 = LowRankLinear(intermediate_size, hidden_size, rank)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.leaky_relu(self.w1(x)) * self.w3(x))


class LoraMoEMLP(Qwen3MLP):
    """The dense MLP (its parameters keep their names) plus a * the top-k routed LoRA experts."""

    def __init__(self, config: Qwen3LoraMoEConfig) -> None:
        super().__init__(config)
        self.top_k = config.lora_moe_top_k
        self.alpha = config.lora_moe_alpha
        self.lora_router = nn.Linear(config.hidden_size, config.lora_moe_num_experts, bias=False)
        self.lora_experts = nn.ModuleList(
            LoraExpert(config.hidden_size, config.intermediate_size, config.lora_moe_rank)
            for _ in range(config.lora_moe_num_experts)
        )

    def routing(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k weights renormalised to sum 1 and their expert ids, [N, k]; the softmax in at least fp32 (the
        released code: fp32 under fp16 training)."""
        probs = F.softmax(self.lora_router(x), dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))
        weights, experts = probs.topk(self.top_k, dim=-1)
        return (weights / weights.sum(-1, keepdim=True)).to(x.dtype), experts

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = self.routing(flat)
        mixture = torch.zeros_like(flat)
        for e, expert in enumerate(self.lora_experts):
            # Every expert runs, on no rows if none routes to it: its parameters stay in the graph (DDP).
            rows, slot = (experts == e).nonzero(as_tuple=True)
            mixture.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        return super().forward(x) + self.alpha * mixture.reshape(x.shape)


class Qwen3LoraMoEForCausalLM(Qwen3ForCausalLM):
    """Qwen3ForCausalLM with LoraMoEMLP in `config.lora_moe_layers`; every other parameter as the dense
    model's."""

    config_class = Qwen3LoraMoEConfig

    def __init__(self, config: Qwen3LoraMoEConfig) -> None:
        super().__init__(config)
        depth = len(self.model.layers)
        bad = [i for i in config.lora_moe_layers if not 0 <= i < depth]
        if bad or not 1 <= config.lora_moe_top_k <= config.lora_moe_num_experts or config.lora_moe_rank < 1:
            raise ValueError(
                f"LoRA-MoE settings: layers {config.lora_moe_layers} (model depth {depth}), "
                f"top_k {config.lora_moe_top_k} of {config.lora_moe_num_experts} experts, rank "
                f"{config.lora_moe_rank}. Fix: layers within [0, {depth}), 1 <= top_k <= num_experts, "
                "rank >= 1."
            )
        for i in config.lora_moe_layers:
            self.model.layers[i].mlp = LoraMoEMLP(config)


def lora_moe_config(
    dense: Qwen3Config, layers: Sequence[int], num_experts: int, top_k: int, rank: int, alpha: float
) -> Qwen3LoraMoEConfig:
    """The LoRA-MoE config of a dense Qwen3 config: every dense setting kept, the mixture's added."""
    settings = {k: v for k, v in dense.to_dict().items() if k not in ("model_type", "architectures")}
    return Qwen3LoraMoEConfig(
        lora_moe_layers=layers,
        lora_moe_num_experts=num_experts,
        lora_moe_top_k=top_k,
        lora_moe_rank=rank,
        lora_moe_alpha=alpha,
        **settings,
    )


# The pipeline's loads go through the Auto classes; save_pretrained copies this file beside a checkpoint
# and records it in config.json's auto_map (the user's trust_remote_code load).
AutoConfig.register(MODEL_TYPE, Qwen3LoraMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(Qwen3LoraMoEConfig, Qwen3LoraMoEForCausalLM, exist_ok=True)
Qwen3LoraMoEConfig.register_for_auto_class()
Qwen3LoraMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
