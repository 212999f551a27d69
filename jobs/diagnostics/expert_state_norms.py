"""How large are a cache's expert-state targets? (docs/results.md, "The B-Distill study in this regime")

The MC term's MSE distance (the paper's) is a mean over hidden units of ||P h_S - h~_T||^2, so its size, and
its share of the gradient, scales with the teacher's aggregated expert states. This prints, per cache, the
mean squared norm of h~_T per (token, layer pair, slot), its rms per hidden unit, and the mean largest
aggregated gate, over the first `--shards` shards.

    .venv/bin/python jobs/diagnostics/expert_state_norms.py CACHE [CACHE ...] [--shards 4]
"""

from __future__ import annotations

import argparse

import numpy as np

from pipeline.cache.read.reader import open_cache


def state_norms(path: str, shards: int) -> dict[str, float]:
    cache = open_cache(path)
    squared, tokens, top_gate = 0.0, 0, []
    for shard in cache.shards[:shards]:
        for ex in cache.read_shard(int(shard["shard_id"]), {"expert_states", "gates"}):
            states = np.asarray(ex["expert_states"], dtype=np.float64)  # [T, P, W, D]
            squared += float((states**2).sum(-1).mean(axis=(1, 2)).sum())
            tokens += states.shape[0]
            top_gate.append(float(np.asarray(ex["gates"], dtype=np.float64).max(-1).mean()))
    mean_sq = squared / tokens
    return {
        "tokens": tokens,
        "mean_sq_norm": mean_sq,
        "rms_per_unit": float(np.sqrt(mean_sq / cache.hidden_size)),
        "top_gate": float(np.mean(top_gate)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("caches", nargs="+", help="teacher cache directories (ROOT/<key>)")
    parser.add_argument("--shards", type=int, default=4, help="shards read per cache")
    args = parser.parse_args()
    print(f"{'cache':<24}{'tokens':>8}{'mean ||h~||^2':>15}{'rms / unit':>12}{'top gate':>10}")
    for path in args.caches:
        n = state_norms(path, args.shards)
        key = path.rstrip("/").rsplit("/", 1)[-1]
        print(
            f"{key:<24}{n['tokens']:>8}{n['mean_sq_norm']:>15.1f}{n['rms_per_unit']:>12.3f}"
            f"{n['top_gate']:>10.3f}"
        )


if __name__ == "__main__":
    main()
