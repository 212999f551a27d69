"""What a cache's expert-state codec costs the MC term: `moedistill report states-fidelity CACHE`.

The exact fp32 W-width states come from the held-out sample the cache stage stored beside a lossy cache
(pipeline/cache/build/fidelity.py: validation sequences no student trains on, with the same tokens encoded as
a shard stores them), so no teacher runs. A cache without one (older, or built without held-out records) falls
back, with a note, to rerunning its teacher (manifest sources, or --teacher) over a seeded sample of its own
cached sequences, read back through the cache's reader. Per layer pair:

  recon       relative squared reconstruction error ||h^ - h||^2 / ||h||^2 over the tokens that have states
  MC rel err  |L^ - L| / L of the MC exploration loss (K=3, alpha=0.2, the same fixed draws) for a fixed
              random student near the teacher (h + noise of 0.5x the states' rms); L^ averages over the
              tokens with states (token subsampling), L over all tokens
  grad cos    cosine of dL^/ds with the exact dL/ds
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.format.side_files import has_fidelity_sample, read_fidelity_sample
from pipeline.cache.read.reader import TeacherCache, open_cache
from pipeline.cache.read.states import decode_sample
from pipeline.data.collate import pad_batch
from pipeline.distill.losses import mc_exploration_loss
from pipeline.errors import CacheError, ConfigError
from pipeline.placement import teacher_placement
from pipeline.reports.markdown import write_markdown
from pipeline.reports.storage import describe_states

log = logging.getLogger(__name__)

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
    source: str  # SOURCES: where the exact states came from
    num_sequences: int
    num_tokens: int
    pairs: list[dict[str, Any]]


# stored: the held-out sample the cache stage kept (pipeline/cache/build/fidelity.py), no teacher run;
# teacher: the teacher rerun over a seeded sample of the cached (training) sequences, read from the shards;
# teacher-on-sample: the teacher rerun over the stored sample's sequences (checks the stored exact states);
# auto: stored when the cache keeps a sample, else teacher (with a note).
SOURCES = ("auto", "stored", "teacher", "teacher-on-sample")
SOURCE_TEXT = {
    "stored": "held-out validation sequences stored at cache time (no teacher run)",
    "teacher": "cached training sequences, exact states from a teacher rerun",
    "teacher-on-sample": "the stored held-out sequences, exact states from a teacher rerun",
}


def states_fidelity(
    path: str, num_sequences: int = 16, teacher_path: str | None = None, source: str = "auto"
) -> FidelityReport:
    """Per-pair fidelity of the cache at `path` (see SOURCES; num_sequences: the teacher source only)."""
    if source not in SOURCES:
        raise ConfigError(f"states-fidelity source {source!r} is unknown. Fix: use one of {list(SOURCES)}.")
    cache = open_cache(path)
    if not cache.has_expert_states:
        raise CacheError(f"cache {cache.key} stores no expert states. Fix: pick a cache built with them.")
    if source == "auto":
        source = "stored" if has_fidelity_sample(cache.manifest) else "teacher"
        if source == "teacher":
            log.warning(
                "note: cache %s keeps no held-out fidelity sample (built before it existed, with plain "
                "float16/bfloat16 states, cache.states_fidelity_tokens: 0 or no validation split); rerunning "
                "its teacher over %d cached training sequences instead",
                cache.key,
                num_sequences,
            )
    if source == "teacher":
        examples = _cached_examples(cache, num_sequences)
        h_hat = torch.cat([torch.from_numpy(ex["expert_states"]) for ex in examples])
        keep = torch.cat(
            [
                torch.from_numpy(ex.get("expert_state_mask", np.ones(ex["num_tokens"], dtype=bool)))
                for ex in examples
            ]
        )
        h, g = rerun_teacher(cache, examples, teacher_path)
    else:
        sample = read_fidelity_sample(cache.path, cache.manifest)
        examples = sample.examples()
        h_hat, keep = decode_sample(cache.path, cache.manifest, sample)
        if source == "stored":
            h, g = torch.from_numpy(sample.arrays["exact_states"]), torch.from_numpy(sample.arrays["gates"])
        else:
            h, g = rerun_teacher(cache, examples, teacher_path)
    return FidelityReport(
        cache.path,
        describe_states(cache.states, float(cache.manifest["key_inputs"].get("states_mass", 1.0))),
        source,
        len(examples),
        int(h.shape[0]),
        fidelity_pairs(cache.cached_layers, g, h, h_hat, keep),
    )


def fidelity_pairs(
    layers: list[int], gates: torch.Tensor, exact: torch.Tensor, approx: torch.Tensor, keep: torch.Tensor
) -> list[dict[str, Any]]:
    """pair_fidelity of every cached layer pair: gates [N, P, W], states [N, P, W, D], keep [N]."""
    return [
        {"layer": layer, **pair_fidelity(gates[:, p], exact[:, p], approx[:, p], keep, seed=p)}
        for p, layer in enumerate(layers)
    ]


def _cached_examples(cache: TeacherCache, num_sequences: int) -> list[dict[str, Any]]:
    """A seeded choice of `num_sequences` cached sequences with what the reader returns for them."""
    shards = [s for s in cache.shards if s["num_rows"] > 0]
    examples: list[dict[str, Any]] = []
    for i in np.random.default_rng(0).permutation(len(shards)):
        examples += cache.read_shard(int(shards[i]["shard_id"]), {"gates", "expert_states"})
        if len(examples) >= num_sequences:
            break
    return examples[:num_sequences]


def rerun_teacher(
    cache: TeacherCache, examples: list[dict[str, Any]], teacher_path: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact fp32 W-width (states [N, P, W, D], gates [N, P, W]) of `examples` (input_ids, response_mask,
    num_tokens: their first num_tokens distillation positions), one sequence per teacher forward."""
    # why: the teacher code imports transformers, which the stored source (no teacher run) never needs
    from pipeline.cache.build.teacher import TeacherOutputSpec, input_device, load_teacher, teacher_targets
    from pipeline.models.adapter import MoEAdapter

    teacher_path = teacher_path or cache.manifest.get("sources", {}).get("teacher_path")
    if not teacher_path:
        raise CacheError(f"cache {cache.key} does not record its teacher. Fix: pass --teacher PATH.")
    dtype = cache.manifest["key_inputs"]["dtypes"]["compute"]
    model = load_teacher(teacher_path, dtype, teacher_placement(0.0, []))
    adapter = MoEAdapter(model)
    out = TeacherOutputSpec(tuple(cache.cached_layers), cache.width, "topk", 1, "float16", True, "none", 1)
    pad = model.config.pad_token_id
    exact, gates = [], []
    for ex in examples:
        batch = pad_batch(
            [{"input_ids": ex["input_ids"], "response_mask": ex["response_mask"]}], int(pad or 0)
        )
        t = teacher_targets(adapter, {k: v.to(input_device(model)) for k, v in batch.items()}, out)
        exact.append(t["expert_states"][: ex["num_tokens"]])
        gates.append(t["gates"][: ex["num_tokens"]])
    return torch.cat(exact), torch.cat(gates)


def format_fidelity(report: FidelityReport, level: int = 1) -> str:
    """Markdown; level: the heading level (2 inside the storage report)."""
    lines = [
        f"{'#' * level} Expert-state fidelity: {report.path}",
        "",
        f"States {report.states}; {report.num_sequences} sequences ({SOURCE_TEXT[report.source]}), "
        f"{report.num_tokens} distillation tokens; fixed random student = exact + {STUDENT_NOISE}x rms "
        f"noise, MC K={MC_K}, alpha={MC_ALPHA}.",
        "",
        "| teacher layer | recon rel. sq. error | MC-loss rel. error | gradient cosine |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {p['layer']} | {p['recon']:.2e} | {p['mc_rel']:.2e} | {p['grad_cos']:.4f} |" for p in report.pairs
    ]
    return "\n".join(lines)


def write_fidelity(report: FidelityReport, out_dir: str | Path) -> Path:
    return write_markdown(format_fidelity(report), out_dir, "states-fidelity.md")
