"""The student as one trainable module: the HF MoE model plus per-layer projections to the teacher's size.

Wrapping both in one `nn.Module` lets DDP/FSDP synchronise the projections with the student, and keeps the
export trivial: only `.student` is saved (the projections P of docs/method.md are training-only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.models.adapter import MoEAdapter


@dataclass
class StudentForward:
    logits: Tensor  # [B, T, V]
    router_probs: list[Tensor]  # per layer pair: [N, E_S]
    projected_states: list[Tensor]  # per layer pair: [N, E_S, D_teacher]


class DistillStudent(nn.Module):
    def __init__(self, student: nn.Module, student_layers: Sequence[int], teacher_hidden_size: int) -> None:
        super().__init__()
        self.student = student
        self.student_layers = list(student_layers)
        # No paired layers: a logits-only student (MoE-KD's LoRA-MoE), never read through the MoE adapter.
        hidden = MoEAdapter(student).hidden_size if self.student_layers else teacher_hidden_size
        # Identity when sizes match (docs/method.md): nothing to learn there.
        self.projections = nn.ModuleList(
            nn.Identity()
            if hidden == teacher_hidden_size
            else nn.Linear(hidden, teacher_hidden_size, bias=False)
            for _ in self.student_layers
        )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_mask: Tensor,
        with_experts: bool = True,
        detach_expert_inputs: bool = False,
    ) -> StudentForward:
        """`detach_expert_inputs`: expert outputs on the detached MoE input (distill.mc_grad_scope: experts),
        so a loss on `projected_states` trains only the experts and the projections P."""
        if not self.student_layers:
            out = self.student(input_ids=input_ids, attention_mask=attention_mask)
            return StudentForward(logits=out.logits, router_probs=[], projected_states=[])
        # Baselines (with_experts=False) need no expert outputs; the router distributions alone still give
        # the gate metrics cheaply, in the family's own definition (docs/model-families.md).
        out = MoEAdapter(self.student).forward_with_experts(
            input_ids,
            attention_mask,
            layers=self.student_layers,
            token_mask=token_mask,
            detach_expert_inputs=detach_expert_inputs,
            with_experts=with_experts,
        )
        probs = [out.router_probs[layer] for layer in self.student_layers]
        states = [
            proj(out.expert_outputs[layer].float())
            for proj, layer in zip(self.projections, self.student_layers, strict=True)
            if with_experts
        ]
        return StudentForward(logits=out.logits, router_probs=probs, projected_states=states)


def gate_entropy(probs: Tensor) -> Tensor:
    """Mean entropy (nats) of per-token router distributions [N, E]."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
