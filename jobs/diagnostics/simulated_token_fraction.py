"""Is the token-subsampling penalty the cache's doing or the fraction's? (docs/method.md, "Token subsampling")

Trains b-distill from a FULL-states cache while the MC term sees only the tokens that a
`cache.states_token_fraction: F` cache would keep (the same hash, seed and positions as the cache build), by
masking each batch the way a subsampled cache's reader does. Everything else (data, seed, steps, the other
terms) is the full cache's. If this run ends where the subsampled-cache run ends, the cache path (shards,
reader, row alignment) is not the cause: the fraction of tokens the MC term sees per step is.

    .venv/bin/python jobs/diagnostics/simulated_token_fraction.py --config jobs/configs/demo.yaml \
        --fraction 0.25 --set output_dir=runs/diag-token-fraction

Runs in-process (distill.train.num_workers = 0) so the mask reaches the training loop; run it where the
config's teacher and full cache already exist (their paths are read from the config as usual).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import yaml

from pipeline.cache.format.codecs import STATES_SEED, keep_rows
from pipeline.config import load_config
from pipeline.distill import task as distill_task
from pipeline.distill.stage import run_distill
from pipeline.ray_session import connect


def masking_collate(fraction: float):
    original = distill_task.DistillTask.collate

    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = original(self, batch)
        if "expert_states" in out and "expert_state_mask" not in out:
            seq_ids, num_tokens = [int(s) for s in batch["seq_id"]], [int(n) for n in batch["num_tokens"]]
            keep = keep_rows(seq_ids, num_tokens, STATES_SEED, fraction)
            mask = torch.from_numpy(keep)
            out["expert_state_mask"] = mask
            out["expert_states"] = out["expert_states"][mask]
        return out

    return collate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    overrides["distill.train.num_workers"] = 0
    config = load_config(args.config, overrides)
    distill_task.DistillTask.collate = masking_collate(args.fraction)
    connect(output_dir=config.out)
    result = run_distill(config)
    print(f"[diag] simulated token fraction {args.fraction}: val_loss {result.val_loss:.4f}")
    print(f"[diag] student: {result.export_dir}")


if __name__ == "__main__":
    main()
