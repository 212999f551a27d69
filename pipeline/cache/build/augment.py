"""Knowledge Augmentation (KA, Every Expert Matters): R teacher forwards with stochastic routing, averaged.

Our reading, simplified: in every forward, each token of every MoE layer keeps the router's top-k experts
with probability 1 - p and otherwise takes k experts drawn without replacement from the router's softmax
(weighted by their router probabilities, renormalised when the model renormalises its top-k). The R
forwards' next-token distributions are averaged (a mean of probabilities) before sparsification, which is
exact for forward KL: the cross-entropy to a mixture is the mean of the cross-entropies. Gates and expert
states of the same forwards are averaged too. Draws are seeded by the micro-batch's seq_ids and the repeat,
so a rebuild with the same layout (micro-batch size, stored in the manifest) is identical. R = 1 with p = 0
is the plain teacher (same code path, same bytes, same cache key).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from pipeline.cache.format.spec import KnowledgeAugmentation


def routing_seed(seq_ids: Sequence[int], repeat: int) -> int:
    return zlib.crc32(np.asarray([*seq_ids, repeat], dtype=np.int64).tobytes())


@contextmanager
def stochastic_routing(adapter: Any, sampling_prob: float, seed: int) -> Iterator[None]:
    """Within the block, every router of `adapter`'s model routes stochastically (see the module doc)."""
    generators: dict[torch.device, torch.Generator] = {}
    k, renormalise = adapter.top_k, adapter.norm_topk_prob

    def hook(_module: torch.nn.Module, _args: tuple, output: tuple) -> tuple:
        router_logits, scores, indices = output
        probs = torch.softmax(router_logits.float(), dim=-1)
        if probs.device not in generators:  # one stream per device (a device_map teacher spans several)
            generators[probs.device] = torch.Generator(device=probs.device).manual_seed(seed)
        gen = generators[probs.device]
        sampled = torch.multinomial(probs, k, replacement=False, generator=gen)
        use = torch.rand(probs.shape[0], generator=gen, device=probs.device) < sampling_prob
        weights = probs.gather(1, sampled)
        if renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        indices = torch.where(use[:, None], sampled, indices)
        scores = torch.where(use[:, None], weights.to(scores.dtype), scores)
        return router_logits, scores, indices

    routers = [adapter.softmax_router(i, "knowledge augmentation") for i in range(adapter.num_layers)]
    handles = [router.register_forward_hook(hook) for router in routers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def augmented_targets(
    targets_fn: Callable[[], dict[str, torch.Tensor]],
    adapter: Any,
    ka: KnowledgeAugmentation,
    seq_ids: Sequence[int],
) -> dict[str, torch.Tensor]:
    """`targets_fn()` (one teacher forward: logits, gates, states) averaged over ka.repeats stochastic-routing
    forwards: logits become the log of the mean next-token distribution; gates and states the mean."""
    total: dict[str, torch.Tensor] = {}
    for r in range(ka.repeats):
        with stochastic_routing(adapter, ka.sampling_prob, routing_seed(seq_ids, r)):
            out = targets_fn()
        out["logits"] = torch.log_softmax(out["logits"].float(), dim=-1)
        for name, t in out.items():
            if name not in total:
                total[name] = t
            elif name == "logits":
                total[name] = torch.logaddexp(total[name], t)  # log of the summed probabilities
            else:
                total[name] = total[name] + t
    total["logits"] = total["logits"] - math.log(ka.repeats)
    for name in total:
        if name != "logits":
            total[name] = total[name] / ka.repeats
    return total
