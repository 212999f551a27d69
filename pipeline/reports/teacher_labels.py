"""What a teacher cache's soft targets carry beyond the labels: `moedistill report teacher-labels CACHE`.

A teacher that memorised the sequences a cache is built from puts almost all its mass on the reference token,
and its soft targets then teach nothing the labels do not. Read from the cached sparse logits alone (top-k
log-probabilities plus the tail bin, at T = 1), over every distillation position of the cache:

  label_mass      mean teacher probability of the reference token (0 where it is outside the top-k)
  label_top1      fraction of positions where the teacher's most likely token is the reference
  label_in_topk   fraction of positions where the reference token is among the cached top-k
  entropy         mean entropy (nats) of the cached k + 1 bins (the top-k and the tail as one bin): a lower
                  bound of the full entropy
  tail_mass       mean mass outside the top-k
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.cache.read.reader import open_cache
from pipeline.errors import CacheError


@dataclass(frozen=True)
class TeacherLabels:
    cache: str
    sequences: int
    positions: int
    label_mass: float
    label_top1: float
    label_in_topk: float
    entropy: float
    tail_mass: float


def _sequence_stats(example: dict) -> np.ndarray:
    """[n, 5] per distillation position: label prob, top-1 hit, in top-k, entropy of k + 1 bins, tail mass."""
    ids, mask = example["input_ids"], example["response_mask"]
    positions = np.flatnonzero(mask[1:] == 1)  # position p predicts ids[p + 1], a response token
    labels = ids[positions + 1]
    indices, logprobs = example["logit_indices"], example["logit_values"]
    if len(labels) != len(indices):
        raise CacheError(
            f"sequence {example['seq_id']}: {len(indices)} cached logit rows for {len(labels)} response "
            "tokens. Fix: run `moedistill cache verify` on this cache."
        )
    probs = np.exp(logprobs.astype(np.float64))
    tail = np.exp(example["logit_tail_logmass"].astype(np.float64))
    hit = indices == labels[:, None]
    label_prob = (probs * hit).sum(axis=1)
    top1 = indices[np.arange(len(indices)), probs.argmax(axis=1)] == labels
    bins = np.concatenate([probs, tail[:, None]], axis=1)
    entropy = -(bins * np.log(np.clip(bins, 1e-30, None))).sum(axis=1)
    return np.stack([label_prob, top1, hit.any(axis=1), entropy, tail], axis=1)


def teacher_labels(path: str, max_sequences: int | None = None) -> TeacherLabels:
    """Label mass and entropy of the teacher's cached targets over (the first max_sequences of) a cache."""
    cache = open_cache(path)
    rows: list[np.ndarray] = []
    sequences = 0
    for shard in cache.shards:
        if shard["num_rows"] == 0:
            continue
        for example in cache.read_shard(int(shard["shard_id"]), {"logits"}):
            rows.append(_sequence_stats(example))
            sequences += 1
            if max_sequences is not None and sequences >= max_sequences:
                break
        if max_sequences is not None and sequences >= max_sequences:
            break
    stats = np.concatenate(rows) if rows else np.zeros((0, 5))
    if not len(stats):
        raise CacheError(f"cache {path} holds no distillation positions with logits.")
    mean = stats.mean(axis=0)
    return TeacherLabels(cache.path, sequences, len(stats), *(float(v) for v in mean))


def format_teacher_labels(report: TeacherLabels) -> str:
    return (
        f"teacher targets of cache {report.cache} ({report.sequences} sequences, "
        f"{report.positions} positions):\n"
        f"  mass on the reference token {report.label_mass:.3f}; top-1 is the reference at "
        f"{report.label_top1:.1%} of positions; reference in the top-k {report.label_in_topk:.1%}\n"
        f"  entropy over the k + 1 cached bins {report.entropy:.3f} nats; mass outside the top-k "
        f"{report.tail_mass:.4f}"
    )


def write_teacher_labels(report: TeacherLabels, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "teacher_labels.json"
    path.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return path
