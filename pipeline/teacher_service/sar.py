"""SAR (Student-Aware Router, Every Expert Matters), a documented subset: router-only training of the teacher.

Our reading: the teacher routes densely (every expert, weighted by its full router softmax) and only its
routers are trained, on the student's own samples, to lower a distillation loss between teacher and student,
so that the teacher's output adapts to the student; the student then distils from the updated teacher.
Simplified: the objective is the caller's `loss_fn(indices, logprobs, tail, teacher_logits) -> [N]`, called
with the student's distribution in the cache's sparse format as the sparse side (the distillation room passes
`token_losses.reverse_kl`, i.e. KL(teacher || student) on the student's k + 1 bins); Adam on the router
weights with a fixed learning rate; no other regulariser or schedule from the paper. Router updates live in
the actor's memory: a restarted teacher actor starts from the original routers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pipeline.data.collate import distill_positions


@contextmanager
def dense_routing(adapter: Any) -> Iterator[None]:
    """Within the block every MoE layer uses all experts, weighted by the full router softmax."""

    def hook(_module: torch.nn.Module, _args: tuple, output: tuple) -> tuple:
        router_logits, scores, _ = output
        probs = torch.softmax(router_logits.float(), dim=-1)
        every = torch.arange(probs.shape[-1], device=probs.device).expand(probs.shape[0], -1)
        return router_logits, probs.to(scores.dtype), every

    routers = [adapter.softmax_router(i, "SAR's dense routing") for i in range(adapter.num_layers)]
    handles = [router.register_forward_hook(hook) for router in routers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def router_parameters(adapter: Any) -> list[torch.nn.Parameter]:
    return [adapter.block_view(i).router_weight for i in range(adapter.num_layers)]


class RouterTrainer:
    """Freezes everything but the routers of `adapter`'s model and takes SAR steps on them."""

    def __init__(self, adapter: Any, lr: float) -> None:
        self.adapter = adapter
        for param in adapter.model.parameters():
            param.requires_grad_(False)
        self.params = router_parameters(adapter)
        for param in self.params:
            param.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.params, lr=lr)

    def step(
        self,
        batch: dict[str, torch.Tensor],
        student: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        loss_fn: Callable[..., torch.Tensor],
    ) -> float:
        """One router update on a padded batch of student samples; `student` = (indices, logprobs, tail) of
        the student's distribution at the batch's distillation positions. Returns the loss before the step."""
        mask = distill_positions(batch["response_mask"])
        with dense_routing(self.adapter):
            out = self.adapter.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            )
        logits = out.logits[mask.to(out.logits.device)].float()
        loss = loss_fn(*(t.to(logits.device) for t in student), logits).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())
