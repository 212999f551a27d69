"""Computing the held-out fidelity sample of a lossy-codec cache (schema 2): what `moedistill report
states-fidelity` compares the codec against, without running the teacher again.

At cache time the teacher runs over records no student trains on (the validation split, `heldout`), in the
seeded order the state basis uses (basis.sampled_targets), until cache.states_fidelity_tokens distillation
tokens are seen (the last sequence cut there). It is written once before any shard, under ROOT/<key>/fidelity/
as .npy files recorded in manifest.states_fidelity (its arrays and their checks:
pipeline/cache/format/side_files.py); a resume reuses it when intact and recomputes it otherwise (it is
deterministic and no shard depends on it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.cache.build.basis import actor_threads, sampled_targets
from pipeline.cache.build.teacher import TeacherShardStage
from pipeline.cache.format.codecs import ShardStateRows
from pipeline.cache.format.key import stores_fidelity_sample
from pipeline.cache.format.manifest import write_manifest
from pipeline.cache.format.side_files import FIDELITY_DIR, fidelity_problems, write_npy_files
from pipeline.cache.format.spec import CacheRuntime, CacheSpec
from pipeline.errors import CacheError
from pipeline.placement import teacher_actor_options

log = logging.getLogger(__name__)


def compute_fidelity_sample(
    spec: CacheSpec, heldout: Sequence[Any], width: int, runtime: CacheRuntime, cache_url: str
) -> dict[str, np.ndarray]:
    """The sample's arrays; runs where a teacher actor would (a Ray task with the actor's placement) unless
    the build is local. A low-rank cache's basis must be written first (the encoded rows use it)."""
    if runtime.executor == "local":
        return _sample(spec, list(heldout), width, runtime, cache_url)
    import ray

    opts = teacher_actor_options(runtime.num_gpus_per_actor, runtime.num_cpus_per_actor, runtime.resources)
    task = ray.remote(_sample).options(**opts)
    return ray.get(task.remote(spec, list(heldout), width, runtime, cache_url))


def _sample(
    spec: CacheSpec, heldout: list[Any], width: int, runtime: CacheRuntime, cache_url: str
) -> dict[str, np.ndarray]:
    want = spec.states_fidelity_tokens
    seqs: list[tuple[dict[str, Any], int]] = []
    gates, states = [], []
    with actor_threads(runtime):
        gpus = runtime.num_gpus_per_actor
        stage = TeacherShardStage(spec, width, runtime.batch_size, gpus, cache_url=cache_url)
        taken = 0
        for examples, t in sampled_targets(stage, spec, heldout, runtime.batch_size):
            first = 0
            for ex in examples:
                n = int(sum(ex["response_mask"][1:]))  # its distillation positions
                k = min(n, want - taken)
                if k > 0:
                    seqs.append((ex, k))
                    gates.append(t["gates"][first : first + k])
                    states.append(t["expert_states"][first : first + k])
                    taken += k
                first += n
            if taken >= want:
                break
        basis = stage.basis
    if not seqs:
        raise CacheError(
            "no held-out record fits max_length, so the fidelity sample is empty. Fix: set "
            "cache.states_fidelity_tokens: 0, or raise data.max_length."
        )
    h = torch.cat(states).float().cpu()
    seq_ids = [int(ex["seq_id"]) for ex, _ in seqs]
    counts = [k for _, k in seqs]
    rows = ShardStateRows(spec.states, basis, seq_ids, counts, tuple(h.shape[1:]))  # type: ignore[arg-type]
    rows.put(0, h)
    return {
        "seq_ids": np.asarray(seq_ids, dtype=np.int64),
        "seq_lengths": np.asarray([len(ex["input_ids"]) for ex, _ in seqs], dtype=np.int32),
        "num_tokens": np.asarray(counts, dtype=np.int32),
        "input_ids": np.concatenate([np.asarray(ex["input_ids"], dtype=np.int32) for ex, _ in seqs]),
        "response_mask": np.concatenate([np.asarray(ex["response_mask"], dtype=np.int8) for ex, _ in seqs]),
        "gates": torch.cat(gates).float().cpu().numpy(),
        "exact_states": h.numpy(),
        **rows.arrays,
    }


def ensure_fidelity_sample(
    url: str,
    manifest: dict[str, Any],
    spec: CacheSpec,
    heldout: Sequence[Any],
    width: int,
    runtime: CacheRuntime,
) -> dict[str, Any]:
    """The manifest with its states_fidelity record: the stored sample when intact (a resume), else computed
    and written now. Called before any shard, after the state basis."""
    if not stores_fidelity_sample(spec, heldout):
        return manifest
    if manifest.get("states_fidelity") is not None:
        problems = fidelity_problems(url, manifest)
        if not problems:
            log.info("teacher cache %s: reusing its fidelity sample", manifest["key"])
            return manifest
        log.warning(
            "teacher cache %s: recomputing its fidelity sample (%s)", manifest["key"], "; ".join(problems)
        )
    arrays = compute_fidelity_sample(spec, heldout, width, runtime, url)
    record = {
        "num_sequences": len(arrays["seq_ids"]),
        "num_tokens": int(arrays["exact_states"].shape[0]),
        "num_state_tokens": int(arrays["expert_states"].shape[0]),
        "files": write_npy_files(url, FIDELITY_DIR, arrays),
    }
    log.info(
        "teacher cache %s: stored a fidelity sample of %d held-out tokens (%d sequences)",
        manifest["key"],
        record["num_tokens"],
        record["num_sequences"],
    )
    updated = {**manifest, "states_fidelity": record}
    write_manifest(url, updated)
    return updated
