"""Per-architecture access to an MoE model's routers and experts.

One forward of the model yields its logits plus, for chosen layers and tokens, the FULL router softmax over
all experts and EVERY expert's FFN output on the layer's MoE input -- what B-Distill's aggregated gates and
expert states are built from (the model itself only evaluates its top-k experts).

Verified against transformers 5.x (`models/{qwen3_moe,mixtral,olmoe}/modeling_*.py`): every supported decoder
layer holds its sparse block at `model.model.layers[i].mlp` with
  * `mlp.gate`: a TopKRouter, `weight [E, H]`, `top_k`; router logits = x @ weight.T in the model dtype,
    softmax in fp32, top-k over the probabilities, renormalised to sum 1 iff `norm_topk_prob`
    (Mixtral: always);
  * `mlp.experts`: fused `gate_up_proj [E, 2I, H]` (gate rows first, then up rows), `down_proj [E, H, I]`,
    `act_fn`; expert e on x = down_proj[e] @ (act(gate_up_proj[e][:I] @ x) * (gate_up_proj[e][I:] @ x)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from pipeline.errors import ModelError

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "mixtral", "olmoe")


@dataclass
class MoEForwardOutput:
    """Result of `MoEAdapter.forward_with_experts`; N = token_mask.sum(), rows in row-major (b, t) order."""

    logits: Tensor  # [B, T, V]
    router_probs: dict[int, Tensor]  # layer -> [N, E] fp32, full softmax over ALL experts
    expert_outputs: dict[int, Tensor]  # layer -> [N, E, H], every expert's FFN output (model dtype)


class MoEAdapter:
    """Uniform view of a supported transformers MoE causal LM (see SUPPORTED_MODEL_TYPES).

    Accepts a DistributedDataParallel-wrapped model too: the forward then runs through the wrapper (so
    gradients are synchronised) while the routers/experts are read from the inner module.
    """

    def __init__(self, model: nn.Module) -> None:
        self._forward_module = model
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        model_type = getattr(getattr(inner, "config", None), "model_type", None)
        is_causal_lm = isinstance(inner, PreTrainedModel) and inner.get_output_embeddings() is not None
        if not is_causal_lm or model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(
                f"MoEAdapter does not support {type(inner).__name__} (model type {model_type!r}); it needs a "
                "causal LM of a supported type: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}. Use one of these MoE architectures (a dense "
                "Qwen3/Llama checkpoint can be turned into one with "
                "pipeline.models.upcycle.upcycle_dense_to_moe)."
            )
        self.model: PreTrainedModel = inner
        self.model_type: str = model_type
        self._layers = inner.model.layers
        for i, layer in enumerate(self._layers):
            self._check_block(i, layer.mlp)

    def _check_block(self, layer_idx: int, block: nn.Module) -> None:
        experts = getattr(block, "experts", None)
        gate = getattr(block, "gate", None)
        if experts is None or gate is None or not hasattr(experts, "gate_up_proj"):
            raise ModelError(
                f"layer {layer_idx} of this {self.model_type} model has a dense MLP "
                f"({type(block).__name__}), but MoEAdapter needs every layer to be MoE (layer indices "
                "pair teacher and student MoE layers). "
                "Set mlp_only_layers=[] and decoder_sparse_step=1 in the model config."
            )
        # Non-default fused layouts (interleaved gate/up, transposed or biased experts) would silently
        # change the math below; none of the supported models uses them, so refuse instead of guessing.
        if (
            getattr(experts, "is_transposed", False)
            or not getattr(experts, "is_concatenated", True)
            or getattr(experts, "has_bias", False)
            or not getattr(experts, "has_gate", True)
        ):
            raise ModelError(
                f"layer {layer_idx}: experts use a non-standard fused layout "
                "(transposed/interleaved/biased); MoEAdapter supports the default [E, 2I, H] gate_up_proj "
                "+ [E, H, I] down_proj layout only."
            )

    # --- properties ---
    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def num_experts(self) -> int:
        return int(self.moe_block(0).gate.weight.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.moe_block(0).gate.top_k)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Rows of the output projection = size of the logits' last dimension."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def expert_intermediate_size(self) -> int:
        return int(self.moe_block(0).experts.down_proj.shape[-1])

    @property
    def norm_topk_prob(self) -> bool:
        """Whether the model renormalises its top-k router probabilities to sum 1 (Mixtral always does)."""
        if self.model_type == "mixtral":
            return True
        return bool(self.model.config.norm_topk_prob)

    def moe_block(self, layer_idx: int) -> nn.Module:
        """The sparse MoE block (`.gate` router, `.experts` fused experts) of decoder layer `layer_idx`."""
        if not 0 <= layer_idx < self.num_layers:
            raise ModelError(
                f"layer index {layer_idx} out of range: this model has {self.num_layers} MoE layers "
                "(0-based)."
            )
        return self._layers[layer_idx].mlp

    # --- math ---
    def router_probs(self, layer_idx: int, x: Tensor) -> Tensor:
        """Full router softmax [N, E] (fp32) for MoE inputs x [N, H], computed as the model does."""
        logits = F.linear(x, self.moe_block(layer_idx).gate.weight)
        return torch.softmax(logits.float(), dim=-1)

    def expert_outputs(self, layer_idx: int, x: Tensor) -> Tensor:
        """Every expert's FFN output [N, E, H] for MoE inputs x [N, H]: two batched matmuls, no loop."""
        experts = self.moe_block(layer_idx).experts
        gate_up = torch.einsum("nh,eoh->neo", x, experts.gate_up_proj)  # [N, E, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.einsum("nei,ehi->neh", experts.act_fn(gate) * up, experts.down_proj)

    def route(self, router_probs: Tensor) -> tuple[Tensor, Tensor]:
        """The model's own top-k rule on full probabilities [N, E] -> (weights [N, k], indices [N, k])."""
        weights, indices = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, indices

    def forward_with_experts(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        layers: Sequence[int],
        token_mask: Tensor,
        detach_expert_inputs: bool = False,
    ) -> MoEForwardOutput:
        """One model forward returning logits and, for `layers` and the tokens where `token_mask` [B, T] is
        True, full router probabilities and every expert's output.

        Differentiable; no hook survives the call. With `detach_expert_inputs` the returned expert outputs are
        computed on the detached MoE input, so a loss on them trains the experts only (not the layers below
        or the router); the router probabilities and logits keep their full graph."""
        layers = [int(i) for i in layers]
        for i in layers:
            self.moe_block(i)  # range check with a clear error
        if token_mask.shape != input_ids.shape:
            raise ModelError(
                f"token_mask shape {tuple(token_mask.shape)} != input_ids shape {tuple(input_ids.shape)}; "
                "pass a [B, T] bool mask over the same batch (e.g. pipeline.data.collate.distill_positions)."
            )
        mask = token_mask.to(device=input_ids.device, dtype=torch.bool)
        captured: dict[int, Tensor] = {}

        def make_hook(layer_idx: int):
            def hook(_module: nn.Module, args: tuple) -> None:
                # Select rows right away: keeps only N x H alive and is immune to in-place edits of the input
                # (Mixtral's training-time router jitter multiplies it in place).
                # mask.to: with a multi-device (device_map) teacher each layer may sit on its own GPU.
                captured[layer_idx] = args[0][mask.to(args[0].device)]

            return hook

        handles = [self.moe_block(i).register_forward_pre_hook(make_hook(i)) for i in dict.fromkeys(layers)]
        try:
            out = self._forward_module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()

        router_probs: dict[int, Tensor] = {}
        expert_outputs: dict[int, Tensor] = {}
        for i in layers:
            x = captured[i]
            router_probs[i] = self.router_probs(i, x)
            expert_outputs[i] = self.expert_outputs(i, x.detach() if detach_expert_inputs else x)
        return MoEForwardOutput(logits=out.logits, router_probs=router_probs, expert_outputs=expert_outputs)
