"""Uniform access to an MoE model's routers and experts, for every family in pipeline.models.families.

One forward of the model yields its logits plus, for chosen MoE layers and tokens, the full router
distribution p over ALL experts and EVERY expert's FFN output on the layer's MoE input -- what B-Distill's
aggregated gates and expert states are built from (the model itself only evaluates its top-k experts).

Layer indices here are MoE-layer indices: 0..num_layers-1 over the decoder layers that hold an MoE block
(`moe_layers` maps them to decoder layers; dense layers such as DeepSeek's first_k_dense_replace are
skipped). Each family's math is read from transformers' own modules (pipeline.models.moe_blocks); the
semantics per family are in docs/model-families.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from pipeline.errors import ConfigError, ModelError
from pipeline.models.dims import ModelDims
from pipeline.models.families import SUPPORTED_MODEL_TYPES, check_model_type, family_of
from pipeline.models.moe_blocks import MoEBlockView, Routing, is_moe_layer, verify_block

__all__ = ["SUPPORTED_MODEL_TYPES", "MoEAdapter", "MoEForwardOutput", "Routing", "check_adapter_reads"]


@dataclass
class MoEForwardOutput:
    """Result of `MoEAdapter.forward_with_experts`; N = token_mask.sum(), rows in row-major (b, t) order."""

    logits: Tensor  # [B, T, V]
    router_probs: dict[int, Tensor]  # layer -> [N, E] fp32, full softmax over ALL experts
    expert_outputs: dict[int, Tensor]  # layer -> [N, E, H], every expert's FFN output (model dtype)
    # compute_experts=False: the MoE inputs [N, H] and router logits [N, E], for a caller that computes only
    # some experts (pipeline.models.truncation)
    expert_inputs: dict[int, Tensor] = field(default_factory=dict)
    router_logits: dict[int, Tensor] = field(default_factory=dict)


def _unsupported(model: nn.Module, model_type: object, why: str) -> ModelError:
    return ModelError(
        f"MoEAdapter does not support {type(model).__name__} (model type {model_type!r}): {why}. It needs a "
        f"causal LM of a supported type: {', '.join(SUPPORTED_MODEL_TYPES)} (docs/model-families.md), or one "
        "with the same structure. A dense Qwen3/Llama checkpoint can be turned into one with "
        "pipeline.models.upcycle.upcycle_dense_to_moe."
    )


class MoEAdapter:
    """Uniform view of a transformers MoE causal LM of a family in pipeline.models.families.

    Accepts a DistributedDataParallel-wrapped model too: the forward then runs through the wrapper (so
    gradients are synchronised) while the routers/experts are read from the inner module.
    """

    def __init__(self, model: nn.Module) -> None:
        self._forward_module = model
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        model_type = getattr(getattr(inner, "config", None), "model_type", None)
        is_causal_lm = isinstance(inner, PreTrainedModel) and inner.get_output_embeddings() is not None
        layers = getattr(getattr(inner, "model", None), "layers", None)
        if not is_causal_lm or layers is None:
            raise _unsupported(inner, model_type, "not a decoder-only causal LM (`model.model.layers`)")
        self.model: PreTrainedModel = inner
        self.model_type: str = str(model_type)
        family = family_of(self.model_type)
        self.moe_layers: tuple[int, ...] = tuple(
            i for i, layer in enumerate(layers) if is_moe_layer(layer, family)
        )
        if not self.moe_layers:
            block = f"`layers[i].{family.block}.{family.router}`"
            raise _unsupported(
                inner, model_type, f"no MoE block ({block}) in its {len(layers)} decoder layers"
            )
        self._blocks = [
            MoEBlockView(layers[i], family, self.model_type, f"decoder layer {i}") for i in self.moe_layers
        ]
        if self.model_type not in SUPPORTED_MODEL_TYPES:  # read with the default entry: check it numerically
            verify_block(self._blocks[0])
        shapes = {(b.num_experts, b.top_k, b.hidden_size) for b in self._blocks}
        if len(shapes) > 1:
            raise ModelError(
                f"the MoE layers of this {self.model_type} model differ in (experts, top-k, hidden size): "
                f"{sorted(shapes)}; B-Distill pairs layers of one expert count. Fix: use a checkpoint whose "
                "MoE layers share one shape."
            )

    # --- properties ---
    @property
    def num_layers(self) -> int:
        """MoE layers (the decoder layers `moe_layers`); every layer index of this class counts these."""
        return len(self._blocks)

    @property
    def num_experts(self) -> int:
        return self._blocks[0].num_experts

    @property
    def top_k(self) -> int:
        return self._blocks[0].top_k

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Rows of the output projection = size of the logits' last dimension."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def expert_intermediate_size(self) -> int:
        return self._blocks[0].intermediate_size

    @property
    def norm_topk_prob(self) -> bool:
        """Whether the model renormalises its top-k weights to sum 1 (Mixtral, gpt-oss, Granite: always)."""
        return self._blocks[0].renormalize

    def block_view(self, layer_idx: int) -> MoEBlockView:
        """MoE layer `layer_idx`'s block as read through its family's table entry."""
        if not 0 <= layer_idx < self.num_layers:
            raise ModelError(
                f"layer index {layer_idx} out of range: this model has {self.num_layers} MoE layers "
                f"(0-based; decoder layers {list(self.moe_layers)})."
            )
        return self._blocks[layer_idx]

    def moe_block(self, layer_idx: int) -> nn.Module:
        """The sparse MoE block module of MoE layer `layer_idx`."""
        return self.block_view(layer_idx).block

    def softmax_router(self, layer_idx: int, feature: str) -> nn.Module:
        """The router of MoE layer `layer_idx` for `feature`s that rewrite a softmax top-k router's
        (logits, weights, indices) output in a hook (knowledge augmentation, SAR); ModelError otherwise."""
        view = self.block_view(layer_idx)
        if not view.family.softmax_topk_router:
            raise ModelError(
                f"{feature} rewrites a softmax top-k router's output, but {self.model_type} routes otherwise "
                "(docs/model-families.md). Fix: turn it off for this teacher, or use a softmax top-k family "
                "(qwen3_moe, mixtral, olmoe, qwen2_moe, qwen3_next, gpt_oss, granitemoe, hunyuan_v1_moe)."
            )
        return view.router

    # --- math ---
    def router_probs(self, layer_idx: int, x: Tensor) -> Tensor:
        """The full router distribution p [N, E] (fp32) for MoE inputs x [N, H], as the model computes it."""
        view = self.block_view(layer_idx)
        return view.probs_from_logits(view.router_logits(x))

    def routing(self, layer_idx: int, x: Tensor) -> Routing:
        """The model's own routing (logits, p, top-k weights and indices) of MoE inputs x [N, H]."""
        return self.block_view(layer_idx).routing(x)

    def expert_outputs(self, layer_idx: int, x: Tensor) -> Tensor:
        """Every routed expert's output [N, E, H] for MoE inputs x [N, H] (shared experts excluded)."""
        return self.block_view(layer_idx).expert_outputs(x)

    def route(self, router_probs: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k of full probabilities [N, E] -> (weights [N, k], indices [N, k]), renormalised iff the model
        does: the model's own rule for plain softmax top-k routers (`routing` is the model's rule always)."""
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
        with_experts: bool = True,
        compute_experts: bool = True,
    ) -> MoEForwardOutput:
        """One model forward returning logits and, for `layers` and the tokens where `token_mask` [B, T] is
        True, full router probabilities and every expert's output.

        Differentiable; no hook survives the call. With `detach_expert_inputs` the returned expert outputs are
        computed on the detached MoE input, so a loss on them trains the experts only (not the layers below
        or the router); the router probabilities and logits keep their full graph. Without `with_experts`
        only the router distributions are computed (`expert_outputs` is empty). Without `compute_experts`
        the MoE inputs and router logits are returned instead of the expert outputs."""
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

        def logits_hook(layer_idx: int):
            def hook(_module: nn.Module, _args: tuple, output: tuple) -> None:
                # The logits the router computed in the forward ([B*T, E]); the rows are selected after.
                logits = self.block_view(layer_idx).logits_of(output)
                captured[layer_idx] = logits[mask.reshape(-1).to(logits.device)]

            return hook

        unique = dict.fromkeys(layers)
        if with_experts:
            handles = [self.moe_block(i).register_forward_pre_hook(make_hook(i)) for i in unique]
        else:
            handles = [self.block_view(i).router.register_forward_hook(logits_hook(i)) for i in unique]
        try:
            out = self._forward_module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()

        router_probs: dict[int, Tensor] = {}
        expert_outputs: dict[int, Tensor] = {}
        inputs: dict[int, Tensor] = {}
        router_logits: dict[int, Tensor] = {}
        for i in layers:
            view = self.block_view(i)
            if not with_experts:
                router_probs[i] = view.probs_from_logits(captured[i])
                continue
            x = captured[i]
            logits = view.router_logits(x)
            router_probs[i] = view.probs_from_logits(logits)
            if detach_expert_inputs:
                x, logits = x.detach(), logits.detach()
            if compute_experts:
                expert_outputs[i] = view.expert_outputs(x, logits)
            else:
                inputs[i], router_logits[i] = x, logits
        return MoEForwardOutput(out.logits, router_probs, expert_outputs, inputs, router_logits)


def check_adapter_reads(dims: ModelDims, name_or_path: str, role: str) -> None:
    """Before any Ray work: ConfigError naming what is missing when MoEAdapter cannot read this MoE model.

    A family in the table is known good from its config.json. Another model type is built from its config
    without weights (on the meta device) and read as the adapter would, so a same-structure family works
    and any other fails here, in seconds, instead of on the actors."""
    check_model_type(dims.model_type, name_or_path, role)
    if dims.model_type in SUPPORTED_MODEL_TYPES:
        return
    from transformers import AutoConfig, AutoModelForCausalLM  # why: config classes only for unknown types

    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        with torch.device("meta"):
            adapter = MoEAdapter(AutoModelForCausalLM.from_config(config))
    except ModelError as exc:
        raise ConfigError(f"{role} {name_or_path!r} cannot be read for distillation: {exc}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"{role} {name_or_path!r} is a {dims.model_type!r} model that this transformers cannot build as "
            f"a causal LM ({exc}). Fix: use a family listed in docs/model-families.md."
        ) from None
    expected = dims.moe_layers or tuple(range(dims.num_layers))
    if adapter.moe_layers != expected:
        raise ConfigError(
            f"{role} {name_or_path!r} ({dims.model_type}) has MoE blocks in decoder layers "
            f"{list(adapter.moe_layers)}, but its config.json says {list(expected)}, so layer pairing would "
            "be wrong. Fix: add this family's entry to pipeline/models/families.py."
        )
