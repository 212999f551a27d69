"""What a cache's expert-state codec costs the MC term: `moedistill report states-fidelity CACHE`.

The teacher the cache was built from (manifest sources, or --teacher) is run again over a seeded sample of
the cache's own sequences for their exact fp32 W-width states; the cache's reader returns what a student
would see. Per layer pair:

  recon       relative squared reconstruction error ||h^ - h||^2 / ||h||^2 over the tokens that have states
  MC rel err  |L^ - L| / L of the MC exploration loss (K=3, alpha=0.2, the same fixed draws) for a fixed
              random student near the teacher (h + noise of 0.5x the states' rms); L^ averages over the
              tokens with states (token subsampling), L over all tokens
  grad cos    cosine of dL^/ds with the exact dL/ds
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.distill.losses import mc_exploration_loss

MC_K, MC_ALPHA, STUDENT_NOISE = 3, 0.2, 0.5


def fixed_student(exact: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A random student near the teacher: exact + noise of STUDENT_NOISE x the states' rms."""
    rms = float(exact.pow(2).mean().sqrt())
    g = torch.Generator().manual_seed(seed)
    return exact + STUDENT_NOISE * rms * torch.randn(exact.shape, generator=g)


def mc_loss_and_grad(
    gates: torch.Tensor, target: torch.Tensor, student: torch.Tensor, keep: torch.Tensor, seed: int
) -> tuple[float, torch.Tensor]:
    """Mean MC loss of one pair over the `keep` tokens ([N, E], [N, E, D], [N, E, D], [N] bool) and its
    gradient w.r.t. the student; the draws depend on `seed` only."""
    s = student.clone().requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    loss = mc_exploration_loss(gates, target, s, k=MC_K, alpha=MC_ALPHA, generator=g)[keep].mean()
    loss.backward()
    assert s.grad is not None
    return float(loss.detach()), s.grad.flatten()


def pair_fidelity(
    gates: torch.Tensor, exact: torch.Tensor, approx: torch.Tensor, keep: torch.Tensor, seed: int = 0
) -> dict[str, float]:
    """recon / mc_rel / grad_cos of one pair: gates [N, E], states [N, E, D], keep [N] (tokens with states)"""
    student = fixed_student(exact, seed)
    full = torch.ones_like(keep)
    loss, grad = mc_loss_and_grad(gates, exact, student, full, 1000 + seed)
    loss_hat, grad_hat = mc_loss_and_grad(gates, approx, student, keep, 1000 + seed)
    return {
        "recon": float((approx[keep] - exact[keep]).pow(2).sum() / exact[keep].pow(2).sum().clamp_min(1e-30)),
        "mc_rel": abs(loss_hat - loss) / loss,
        "grad_cos": float(torch.nn.functional.cosine_similarity(grad_hat, grad, dim=0)),
    }


@dataclass
class FidelityReport:
    path: str
    states: str
    num_sequences: int
    num_tokens: int
    pairs: list[dict[str, Any]]


def states_fidelity(path: str, num_sequences: int = 16, teacher_path: str | None = None) -> FidelityReport:
    """Per-pair fidelity of the cache at `path` on `num_sequences` of its sequences (seeded choice)."""
    import numpy as np

    from pipeline.cache.reader import open_cache
    from pipeline.cache.teacher import TeacherOutputSpec, input_device, load_teacher, teacher_targets
    from pipeline.data.collate import pad_batch
    from pipeline.errors import CacheError
    from pipeline.models.adapter import MoEAdapter
    from pipeline.placement import teacher_placement
    from pipeline.reports.storage import describe_states

    cache = open_cache(path)
    if not cache.has_expert_states:
        raise CacheError(f"cache {cache.key} stores no expert states. Fix: pick a cache built with them.")
    teacher_path = teacher_path or cache.manifest.get("sources", {}).get("teacher_path")
    if not teacher_path:
        raise CacheError(f"cache {cache.key} does not record its teacher. Fix: pass --teacher PATH.")
    shards = [s for s in cache.shards if s["num_rows"] > 0]
    order = np.random.default_rng(0).permutation(len(shards))
    examples: list[dict[str, Any]] = []
    for i in order:
        examples += cache.read_shard(int(shards[i]["shard_id"]), {"gates", "expert_states"})
        if len(examples) >= num_sequences:
            break
    examples = examples[:num_sequences]
    dtype = cache.manifest["key_inputs"]["dtypes"]["compute"]
    model = load_teacher(teacher_path, dtype, teacher_placement(0.0, []))
    adapter = MoEAdapter(model)
    out = TeacherOutputSpec(tuple(cache.cached_layers), cache.width, "topk", 1, "float16", True, "none", 1)
    pad = model.config.pad_token_id
    exact, approx, gates, keep = [], [], [], []
    for ex in examples:
        batch = pad_batch(
            [{"input_ids": ex["input_ids"], "response_mask": ex["response_mask"]}], int(pad or 0)
        )
        t = teacher_targets(adapter, {k: v.to(input_device(model)) for k, v in batch.items()}, out)
        exact.append(t["expert_states"])
        gates.append(t["gates"])
        approx.append(torch.from_numpy(ex["expert_states"]))
        keep.append(torch.from_numpy(ex.get("expert_state_mask", np.ones(ex["num_tokens"], dtype=bool))))
    h, h_hat, g, k = (torch.cat(x) for x in (exact, approx, gates, keep))
    pairs = [
        {"layer": layer, **pair_fidelity(g[:, p], h[:, p], h_hat[:, p], k, seed=p)}
        for p, layer in enumerate(cache.cached_layers)
    ]
    return FidelityReport(cache.path, describe_states(cache.states), len(examples), int(h.shape[0]), pairs)


def format_fidelity(report: FidelityReport) -> str:
    lines = [
        f"# Expert-state fidelity: {report.path}",
        "",
        f"States {report.states}; {report.num_sequences} sequences, {report.num_tokens} distillation tokens; "
        f"fixed random student = exact + {STUDENT_NOISE}x rms noise, MC K={MC_K}, alpha={MC_ALPHA}.",
        "",
        "| teacher layer | recon rel. sq. error | MC-loss rel. error | gradient cosine |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {p['layer']} | {p['recon']:.2e} | {p['mc_rel']:.2e} | {p['grad_cos']:.4f} |" for p in report.pairs
    ]
    return "\n".join(lines)


def write_fidelity(report: FidelityReport, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "states-fidelity.md"
    md.write_text(format_fidelity(report) + "\n")
    return md
