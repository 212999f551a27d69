"""One decoder layer's MoE block read through its family's table entry (pipeline.models.families).

The routing is the model's own: the router module is called, so its top-k rule, groups, selection bias and
routed_scaling_factor are exactly the model's. Expert outputs are computed for EVERY expert with the model's
own weights, biases and activation (`_apply_gate` where the experts define one: gpt-oss's clamped SwiGLU on
interleaved gate/up rows), as batched einsums. Shared experts and output biases are the block's fixed
additive term. docs/model-families.md states the semantics; tests/models/test_model_families.py checks that
`combine` reproduces every family's block output.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.errors import ModelError
from pipeline.models.families import FAMILIES, MoEFamily


@dataclass
class Routing:
    """The model's routing of N tokens: logits, the full distribution p, and its own top-k choice."""

    logits: Tensor  # [N, E] as the router computes them
    probs: Tensor  # [N, E] fp32: p over ALL experts (docs/model-families.md)
    weights: Tensor  # [N, k] the weights the block applies (ones where the block scales the expert input)
    indices: Tensor  # [N, k] chosen experts


def _own_apply_gate(experts: nn.Module) -> bool:
    """Whether the experts class defines its own `_apply_gate` (not transformers' default)."""
    fn = getattr(type(experts), "_apply_gate", None)
    return fn is not None and fn.__qualname__.split(".")[0] == type(experts).__name__


def is_moe_layer(layer: nn.Module, family: MoEFamily) -> bool:
    block = getattr(layer, family.block, None)
    return isinstance(getattr(block, family.router, None), nn.Module)


class MoEBlockView:
    """The MoE block of one decoder layer; ModelError naming what is missing when it cannot be read."""

    def __init__(self, layer: nn.Module, family: MoEFamily, model_type: str, where: str) -> None:
        self.layer, self.family = layer, family
        self.block: nn.Module = getattr(layer, family.block)
        self.router: nn.Module = getattr(self.block, family.router)
        self.where = f"{where} ({model_type}, {type(self.block).__name__})"
        self._check_modules(model_type)
        try:
            self.router_weight: Tensor = operator.attrgetter(family.router_weight)(self.router)
        except AttributeError:
            raise self._missing(f"the router weight `{family.router}.{family.router_weight}`") from None
        if not isinstance(getattr(self.router, "top_k", None), int):
            raise self._missing(f"`{family.router}.top_k` (the number of routed experts per token)")
        if family.experts == "fused":
            self._check_fused(getattr(self.block, "experts", None))

    # --- validation ---
    def _missing(self, what: str) -> ModelError:
        return ModelError(
            f"{self.where}: the MoE block has no {what}, so the adapter cannot read it. Fix: use a model of "
            f"a family listed in docs/model-families.md (or add this family's entry to "
            "pipeline/models/families.py)."
        )

    def _check_modules(self, model_type: str) -> None:
        f = self.family
        expected = {f.router, *f.shared, *([f.shared_gate] if f.shared_gate else [])}
        expected |= {"experts"} if f.experts == "fused" else {"input_linear", "output_linear", "activation"}
        present = {name for name, _ in self.block.named_children()}
        if not expected - {"activation"} <= present or present - expected:
            raise ModelError(
                f"{self.where}: the MoE block holds modules {sorted(present)}, but the adapter's entry for "
                f"{model_type!r} models {sorted(expected)}; other modules would change the block's output "
                "unseen. Fix: use a listed family (docs/model-families.md) or add an entry for this one in "
                "pipeline/models/families.py."
            )
        if model_type not in FAMILIES:  # read with the default entry: refuse what it cannot express
            extra = [
                a
                for a in ("e_score_correction_bias", "routed_scaling_factor", "bias", "n_group")
                if getattr(self.router, a, None) is not None or getattr(self.block, a, None) is not None
            ]
            if extra:
                raise ModelError(
                    f"{self.where}: the router has {extra}, which the default (softmax top-k) entry does "
                    "not model. Fix: add this family's entry to pipeline/models/families.py."
                )

    def _check_fused(self, experts: nn.Module | None) -> None:
        if experts is None or not all(hasattr(experts, a) for a in ("gate_up_proj", "down_proj")):
            raise self._missing("fused experts `experts.gate_up_proj` / `experts.down_proj`")
        if not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
            raise ModelError(
                f"{self.where}: the experts have no gate projection or a post-expert norm, which the "
                "adapter does not compute. Fix: use a listed family (docs/model-families.md)."
            )
        custom_gate = _own_apply_gate(experts)
        if not getattr(experts, "is_concatenated", True) and not custom_gate:
            raise ModelError(
                f"{self.where}: interleaved gate/up rows without the experts' own `_apply_gate`. Fix: use a "
                "listed family (docs/model-families.md)."
            )
        if not custom_gate and not hasattr(experts, "act_fn"):
            raise self._missing("`experts.act_fn` (the experts' activation)")

    # --- shape ---
    @property
    def num_experts(self) -> int:
        return int(self.router_weight.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def hidden_size(self) -> int:
        return int(self.router_weight.shape[1])

    @property
    def intermediate_size(self) -> int:
        if self.family.experts == "parallel":
            return int(self.block.output_linear.weight.shape[-1])
        down = self.block.experts.down_proj
        return int(down.shape[1] if self._transposed else down.shape[2])

    @property
    def renormalize(self) -> bool:
        if self.family.renormalize is not None:
            return self.family.renormalize
        return bool(getattr(self.router, "norm_topk_prob", False))

    @property
    def _transposed(self) -> bool:
        return bool(getattr(self.block.experts, "is_transposed", self.family.transposed_experts))

    # --- routing ---
    def _call_router(self, x: Tensor) -> tuple:
        # .forward, not __call__: the hooks knowledge augmentation and SAR put on routers rewrite the model's
        # routing inside its forward, and must not see (or draw random numbers for) these extra calls.
        if self.family.router_call == "bias_arg":
            return self.router.forward(x, self.block.e_score_correction_bias)
        return self.router.forward(x)

    def probs_from_logits(self, logits: Tensor) -> Tensor:
        """p over all experts, fp32: softmax, or sigmoid scores normalised to sum 1."""
        if self.family.scores == "softmax":
            return torch.softmax(logits.float(), dim=-1)
        scores = torch.sigmoid(logits.float())
        return scores / scores.sum(dim=-1, keepdim=True)

    def logits_of(self, router_output: tuple) -> Tensor:
        """The logits [N, E] within the router's output."""
        return router_output[{"dense_scores": 1, "grouped": 4}.get(self.family.router_call, 0)]

    def router_logits(self, x: Tensor) -> Tensor:
        return self.logits_of(self._call_router(x))

    def routing(self, x: Tensor) -> Routing:
        """The model's own routing of MoE inputs x [N, H]."""
        out = self._call_router(x)
        call = self.family.router_call
        if call == "dense_scores":  # Llama 4: top-k of the logits; the sigmoid scales the expert input
            logits = out[1]
            indices = torch.topk(logits, self.top_k, dim=1).indices
            weights = torch.ones(indices.shape, dtype=x.dtype, device=x.device)
        elif call == "grouped":  # JetMoE: undo the expert-sorted order of (gates, experts)
            sorted_pos, _, gates, sizes, logits = out
            experts = torch.repeat_interleave(
                torch.arange(len(sizes), device=gates.device), torch.tensor(sizes, device=gates.device)
            )
            weights = torch.empty_like(gates).scatter(0, sorted_pos, gates).view(-1, self.top_k)
            indices = torch.empty_like(experts).scatter(0, sorted_pos, experts).view(-1, self.top_k)
        else:
            logits, weights, indices = out[:3]
        return Routing(logits, self.probs_from_logits(logits), weights, indices)

    # --- experts ---
    def expert_outputs(self, x: Tensor, logits: Tensor | None = None) -> Tensor:
        """Every expert's output [N, E, H] on MoE inputs x [N, H]: batched einsums, no loop over experts.
        With `combine == "input"` (Llama 4) expert j sees its scaled input sigmoid(logit_j) x, as in the
        model; `logits` saves the router call when the caller has them."""
        if self.family.experts == "parallel":  # JetMoE: [E, 2I, H] and [E, H, I], chunked gate/up
            gate_up = torch.einsum("nh,eoh->neo", x, self.block.input_linear.weight)
            gate, up = gate_up.chunk(2, dim=-1)
            return torch.einsum(
                "nei,ehi->neh", self.block.activation(gate) * up, self.block.output_linear.weight
            )
        experts = self.block.experts
        if self.family.combine == "input":
            logits = self.router_logits(x) if logits is None else logits
            scale = torch.sigmoid(logits.float()).to(x.dtype)  # the router's own cast
            x_in, x_spec = x[:, None, :] * scale[..., None], "neh"
        else:
            x_in, x_spec = x, "nh"
        w_spec, d_spec = ("eho", "eih") if self._transposed else ("eoh", "ehi")
        gate_up = torch.einsum(f"{x_spec},{w_spec}->neo", x_in, experts.gate_up_proj)
        if getattr(experts, "has_bias", False):
            gate_up = gate_up + experts.gate_up_proj_bias
        if hasattr(experts, "_apply_gate"):  # transformers' default (chunk, act(gate) * up) or the model's
            hidden = experts._apply_gate(gate_up)
        else:  # Llama 4's experts: concatenated gate/up without transformers' experts flags
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = experts.act_fn(gate) * up
        out = torch.einsum(f"nei,{d_spec}->neh", hidden, experts.down_proj)
        if getattr(experts, "has_bias", False):
            out = out + experts.down_proj_bias
        return out

    def routed_outputs(
        self, x: Tensor, tokens: Tensor, experts: Tensor, logits: Tensor | None = None
    ) -> Tensor:
        """Expert `experts[s]`'s output on token `tokens[s]` for S (token, expert) pairs: [S, H], the same
        math as `expert_outputs` for those pairs only. Batched per expert (transformers' `batched_mm` way):
        the pairs are padded into [E, C, H] (C = the most pairs any expert got) and run through two bmm over
        the stacked expert weights, so the cost follows the pairs, never a Python loop over experts."""
        num = self.num_experts
        counts = torch.bincount(experts, minlength=num)
        order = torch.argsort(experts, stable=True)
        exp, tok = experts[order], tokens[order]
        slot = torch.arange(len(exp), device=exp.device) - (torch.cumsum(counts, 0) - counts)[exp]
        x_in = x[tok]
        if self.family.combine == "input":  # Llama 4: expert j sees sigmoid(logit_j) x, as in expert_outputs
            logits = self.router_logits(x) if logits is None else logits
            x_in = x_in * torch.sigmoid(logits[tok, exp].float()).to(x.dtype)[:, None]
        padded = x.new_zeros(num, int(counts.max()) if len(exp) else 0, x.shape[-1])
        padded[exp, slot] = x_in
        out = self._batched_ffn(padded)[exp, slot]
        return torch.empty_like(out).index_copy_(0, order, out)

    def _batched_ffn(self, x: Tensor) -> Tensor:
        """Expert e's FFN on rows x[e]: [E, C, H] -> [E, C, H]."""
        if self.family.experts == "parallel":  # JetMoE: [E, 2I, H] and [E, H, I], chunked gate/up
            gate, up = torch.bmm(x, self.block.input_linear.weight.transpose(1, 2)).chunk(2, dim=-1)
            down = self.block.output_linear.weight.transpose(1, 2)
            return torch.bmm(self.block.activation(gate) * up, down)
        experts = self.block.experts
        gate_up_w, down_w = experts.gate_up_proj, experts.down_proj
        if not self._transposed:
            gate_up_w, down_w = gate_up_w.transpose(1, 2), down_w.transpose(1, 2)
        gate_up = torch.bmm(x, gate_up_w)
        if getattr(experts, "has_bias", False):
            gate_up = gate_up + experts.gate_up_proj_bias[:, None, :]
        if hasattr(experts, "_apply_gate"):
            hidden = experts._apply_gate(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = experts.act_fn(gate) * up
        out = torch.bmm(hidden, down_w)
        if getattr(experts, "has_bias", False):
            out = out + experts.down_proj_bias[:, None, :]
        return out

    def shared_output(self, x: Tensor) -> Tensor | None:
        """The block's always-on term for inputs x [N, H]: shared experts (gated where the model gates
        them), a shared MLP on the decoder layer, an output bias; None when the block has none."""
        f, terms = self.family, []
        for name in f.shared:
            out = getattr(self.block, name)(x)
            if f.shared_gate is not None:
                out = torch.sigmoid(getattr(self.block, f.shared_gate)(x)) * out
            terms.append(out)
        layer_mlp = getattr(self.layer, f.layer_shared, None) if f.layer_shared else None
        if layer_mlp is not None:
            terms.append(layer_mlp(x))
        if f.output_bias is not None:
            terms.append(getattr(self.block, f.output_bias).expand_as(x))
        return sum(terms[1:], terms[0]) if terms else None

    def combine(self, expert_outputs: Tensor, routing: Routing, shared: Tensor | None) -> Tensor:
        """The block output rebuilt from every expert's output, the model's top-k weights and the shared
        term: sum_k w_k h[i_k] + shared."""
        hidden = expert_outputs.shape[-1]
        chosen = expert_outputs.gather(1, routing.indices[..., None].expand(-1, -1, hidden))
        out = (chosen * routing.weights[..., None].to(chosen.dtype)).sum(1)
        return out if shared is None else out + shared


def verify_block(view: MoEBlockView) -> None:
    """For a model type outside the table (read with the default entry), on a random probe: the block's own
    output must equal the rebuild from every expert's output, and its top-k weights must be p on its chosen
    experts up to one factor per token (softmax vs sigmoid scores differ there), or the adapter refuses it.
    Weights on the meta device (the config-only check) have no values to compare: skipped."""
    weight = view.router_weight
    if weight.is_meta:
        return
    dtype = view.block.experts.gate_up_proj.dtype if view.family.experts == "fused" else weight.dtype
    x = torch.randn(1, 8, view.hidden_size, generator=torch.Generator().manual_seed(0))
    x = x.to(device=weight.device, dtype=dtype)
    was_training = view.block.training
    view.block.eval()  # no router jitter on the probe
    try:
        with torch.no_grad():
            out = view.block(x.clone())
            out = (out[0] if isinstance(out, tuple) else out).reshape(-1, view.hidden_size).float()
            flat = x.reshape(-1, view.hidden_size)
            routing = view.routing(flat)
            rebuilt = view.combine(view.expert_outputs(flat), routing, view.shared_output(flat)).float()
    finally:
        view.block.train(was_training)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    chosen = routing.probs.gather(1, routing.indices)
    weights = routing.weights.float()
    same_output = torch.allclose(rebuilt, out, atol=tol * float(out.abs().mean()) + 1e-6, rtol=tol)
    same_gates = torch.allclose(
        weights / weights.sum(-1, keepdim=True), chosen / chosen.sum(-1, keepdim=True), atol=tol, rtol=tol
    )
    if not (same_output and same_gates):
        what = "block output" if not same_output else "top-k weights"
        raise ModelError(
            f"{view.where}: the model's {what} differs from what the default (Qwen3-MoE layout) entry "
            "computes, so it does not describe this family. Fix: add this family's entry to "
            "pipeline/models/families.py (docs/model-families.md)."
        )
