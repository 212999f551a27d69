"""How much of its router mass a teacher concentrates: `moedistill report router-sharpness --config C`.

`cache.states_mass` m computes, per token and cached expert group, only the experts that carry m of the
group's router mass (pipeline/models/truncation.py), so what it saves is set by how sharp the routers are.
Measured per MoE layer over the distillation tokens of a seeded sample of the records the config's cache is
built from (the students' training split, tokenised as the cache stage does), for the teacher the cache is
built from (`finetune-teacher`'s export, or --teacher) and the same teacher before fine-tuning (the seeded
random weights `finetune-teacher` starts from; a config whose teacher is a checkpoint has none):

  top-k mass       mean router mass on each token's k largest experts (k = the model's top-k, and 8)
  experts for m    mean experts a token needs for m of its whole router's mass, as a fraction of E: the
                   fewest largest-p experts, the last one counted by the share of it needed (so the figure
                   does not jump by whole experts; at E = 16 a whole-expert count would add ~1/32 of E)
  per group        mean experts computed per cached group of E/W at states_mass m (W = cache.width):
                   the selection the cache stage itself makes (mass_selection)
  entropy ratio    mean H(p) / ln E (1 = a flat router)

The fraction of experts for m is comparable across expert counts (a logit spread that needs 30% of 16
experts for 0.9 of the mass needs about 30% of 128), which a top-k mass at a fixed k is not;
jobs/benchmarks/bench_cache.py --match-experts M:F sharpens a real-shape router to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.cache.build.teacher import tokenize_shard
from pipeline.cache.stage import cached_layers_for, teacher_checkpoint
from pipeline.data.stage import load_tokenizer, prepare_data
from pipeline.models.build import load_causal_lm
from pipeline.models.stage import materialize_model
from pipeline.models.truncation import mass_selection
from pipeline.reports.markdown import write_markdown

MASSES = (0.9, 0.95, 0.99)
TOP_KS = (8,)  # beside the model's own top-k: the top-k of the real MoEs this demo stands in for
BATCH = 32


def experts_for_mass(probs: Tensor, mass: float) -> Tensor:
    """[N] experts each token needs for `mass` of its router mass, p [N, E]: the fewest largest-p experts,
    the last one counted by the share of its p needed (continuous in the router's sharpness)."""
    p = torch.sort(probs.float(), dim=-1, descending=True).values
    cum = torch.cumsum(p, dim=-1)
    need = mass * cum[:, -1:]
    full = (cum < need).sum(-1, keepdim=True).clamp(max=p.shape[-1] - 1)  # experts wholly inside
    before = torch.where(full > 0, cum.gather(-1, (full - 1).clamp(min=0)), torch.zeros_like(need))
    return (full + (need - before) / p.gather(-1, full).clamp_min(1e-30)).squeeze(-1)


def sharpness_stats(
    probs: Tensor, top_k: int, width: int, masses: tuple[float, ...] = MASSES
) -> dict[str, float]:
    """Means over the tokens of p [N, E] (see the module docstring); keys top{k}, frac@{m}, group@{m},
    entropy_ratio."""
    p = probs.float()
    num_experts = p.shape[-1]
    stats: dict[str, float] = {}
    for k in sorted({top_k, *(k for k in TOP_KS if k < num_experts)}):
        stats[f"top{k}"] = float(p.topk(k, dim=-1).values.sum(-1).mean())
    for m in masses:
        stats[f"frac@{m:g}"] = float(experts_for_mass(p, m).mean()) / num_experts
        stats[f"group@{m:g}"] = float(mass_selection(p, width, m).sum(-1).float().mean()) / width
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    stats["entropy_ratio"] = float(entropy.mean()) / math.log(num_experts) if num_experts > 1 else 0.0
    return stats


@torch.no_grad()
def router_probs(model: Any, examples: list[dict[str, Any]], pad_id: int) -> dict[int, Tensor]:
    """Every MoE layer's router distribution [N, E] at the distillation positions of `examples` (no expert
    runs beyond the model's own forward)."""
    from pipeline.data.collate import distill_positions, pad_batch
    from pipeline.models.adapter import MoEAdapter

    adapter = MoEAdapter(model.eval())
    layers = list(range(adapter.num_layers))
    out: dict[int, list[Tensor]] = {i: [] for i in layers}
    for start in range(0, len(examples), BATCH):
        batch = pad_batch(examples[start : start + BATCH], pad_id)
        mask = distill_positions(batch["response_mask"])
        fwd = adapter.forward_with_experts(
            batch["input_ids"], batch["attention_mask"], layers, mask, with_experts=False
        )
        for i in layers:
            out[i].append(fwd.router_probs[i].float().cpu())
    return {i: torch.cat(v) for i, v in out.items()}


@dataclass
class RouterSharpness:
    config: str
    num_sequences: int
    num_tokens: int
    num_experts: int
    top_k: int
    width: int
    cached_layers: list[int]
    # model label ("before fine-tuning", "fine-tuned") -> per MoE layer: sharpness_stats
    models: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def cached_mean(self, label: str, key: str) -> float:
        """`key` averaged over the cached layers (the ones a cache truncates in)."""
        return float(np.mean([self.models[label][i][key] for i in self.cached_layers]))


def router_sharpness(
    config: Any, num_sequences: int = 256, teacher_path: str | None = None
) -> RouterSharpness:
    """Measure the config's teacher before and after fine-tuning on its cache's sequences."""
    prepared = prepare_data(config)
    tok = load_tokenizer(prepared.tokenizer_path)
    records = prepared.splits.train
    pick = np.random.default_rng(0).permutation(len(records))[:num_sequences]
    examples = tokenize_shard(tok, [records[int(i)] for i in sorted(pick)], 0, config.data.max_length)
    path = teacher_path or teacher_checkpoint(config)
    models = {"fine-tuned": (load_causal_lm(path, torch_dtype="float32", setting="teacher"), path)}
    if config.teacher.build is not None:
        seed = f"teacher.build, seed {config.teacher.seed} (the fine-tune's start)"
        models = {"before fine-tuning": (materialize_model(config.teacher, tok).float(), seed), **models}
    report: RouterSharpness | None = None
    for label, (model, source) in models.items():
        probs = router_probs(model, examples, int(tok.pad_token_id))
        num_experts = next(iter(probs.values())).shape[-1]
        top_k = int(model.config.num_experts_per_tok)
        width = config.cache.width or num_experts  # as the cache stage: null = the teacher's expert count
        if report is None:
            num_layers = len(probs)
            report = RouterSharpness(
                config.name, len(examples), int(next(iter(probs.values())).shape[0]), num_experts, top_k,
                width, list(cached_layers_for(config, num_layers)),
            )  # fmt: skip
        report.models[label] = [sharpness_stats(p, top_k, width) for p in probs.values()]
        report.sources[label] = source
    assert report is not None
    return report


def format_sharpness(report: RouterSharpness) -> str:
    e, w = report.num_experts, report.width
    keys = [k for k in next(iter(report.models.values()))[0] if k.startswith("top")]
    lines = [
        f"# Router sharpness: {report.config}",
        "",
        f"{e} experts top-{report.top_k}, cached width W = {w} (groups of {e // w} experts); "
        f"{report.num_sequences} of the cache's training sequences, {report.num_tokens} distillation tokens. "
        "Means over tokens. frac@m: experts for m of a token's router mass / E (continuous count); "
        f"group@m: experts computed per group at states_mass m (of {e // w}); H/ln E: entropy ratio. "
        "Cached layers are starred.",
        "",
    ]
    masses = [f"{m:g}" for m in MASSES]
    header = (
        ["model", "layer"] + [f"top-{k[3:]} mass" for k in keys] + [f"frac@{m}" for m in masses]
        + [f"group@{m}" for m in masses] + ["H/ln E"]
    )  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for label, layers in report.models.items():
        for i, s in enumerate(layers):
            star = "*" if i in report.cached_layers else ""
            cells = [f"{s[k]:.3f}" for k in keys] + [f"{s[f'frac@{m}']:.3f}" for m in masses]
            cells += [f"{s[f'group@{m}']:.2f}" for m in masses] + [f"{s['entropy_ratio']:.3f}"]
            lines.append(f"| {label} | {i}{star} | " + " | ".join(cells) + " |")
    lines.append("")
    for label, source in report.sources.items():
        frac = report.cached_mean(label, "frac@0.9")
        lines.append(
            f"* {label}: {source}; cached layers' mean frac@0.9 = {frac:.3f} "
            f"(bench_cache.py --shape ... --match-experts 0.9:{frac:.3f})"
        )
    return "\n".join(lines)


def write_sharpness(report: RouterSharpness, out_dir: str | Path) -> Path:
    return write_markdown(format_sharpness(report), out_dir, "router-sharpness.md")
