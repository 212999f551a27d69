"""The held-out fidelity sample of a lossy-codec cache (schema 2): what `moedistill report states-fidelity`
compares the codec against, without running the teacher again.

At cache time the teacher runs over records no student trains on (the validation split, `heldout`), in the
seeded order the state basis uses (basis.sampled_targets), until cache.states_fidelity_tokens distillation
tokens are seen (the last sequence cut there). Stored under ROOT/<key>/fidelity/ as .npy files, recorded in
manifest.states_fidelity (sizes + sha256), written once before any shard; a resume reuses it when intact and
recomputes it otherwise (it is deterministic and no shard depends on it):

  seq_ids        int64   [m]            the record's index in the held-out list
  seq_lengths    int32   [m]            len(input_ids) of each sequence
  num_tokens     int32   [m]            its sample tokens: its first num_tokens distillation positions
  input_ids      int32   [sum lengths]  the sequences, concatenated
  response_mask  int8    [sum lengths]
  gates          float32 [n, P, W]      exact W-width gates
  exact_states   float32 [n, P, W, D]   exact W-width expert states (the fp32 targets)
  expert_states, expert_state_scales, expert_state_rows: the same tokens encoded exactly as a shard stores
                 them (codecs.ShardStateRows: codec, basis projection, token subsampling)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline import storage as cfs
from pipeline.cache.build.basis import (
    actor_threads,
    file_problems,
    read_npy,
    sampled_targets,
    write_npy_files,
)
from pipeline.cache.format.codecs import ShardStateRows, StatesCodec
from pipeline.cache.format.key import stores_fidelity_sample
from pipeline.cache.format.spec import CacheRuntime, CacheSpec
from pipeline.errors import CacheError

log = logging.getLogger(__name__)

FIDELITY_DIR = "fidelity"
SEQUENCE_ARRAYS = ("seq_ids", "seq_lengths", "num_tokens", "input_ids", "response_mask")
FIDELITY_FIX = (
    "Fix: run `moedistill cache repair <cache path> --config <the config that built it>` (it recomputes the "
    "sample from the validation split; no shard depends on it)."
)


@dataclass
class FidelitySample:
    arrays: dict[str, np.ndarray]  # the files above, by name

    @property
    def num_tokens(self) -> int:
        return int(self.arrays["exact_states"].shape[0])

    def examples(self) -> list[dict[str, Any]]:
        """The sample's sequences as tokenised examples {seq_id, input_ids, response_mask, num_tokens}."""
        a = self.arrays
        ends = np.cumsum(a["seq_lengths"])
        return [
            {
                "seq_id": int(s),
                "input_ids": a["input_ids"][end - length : end].tolist(),
                "response_mask": a["response_mask"][end - length : end].tolist(),
                "num_tokens": int(n),
            }
            for s, length, n, end in zip(a["seq_ids"], a["seq_lengths"], a["num_tokens"], ends, strict=True)
        ]


def compute_fidelity_sample(
    spec: CacheSpec, heldout: Sequence[Any], width: int, runtime: CacheRuntime, cache_url: str
) -> dict[str, np.ndarray]:
    """The sample's arrays; runs where a teacher actor would (a Ray task with the actor's placement) unless
    the build is local. A low-rank cache's basis must be written first (the encoded rows use it)."""
    if runtime.executor == "local":
        return _sample(spec, list(heldout), width, runtime, cache_url)
    import ray

    from pipeline.placement import teacher_actor_options

    opts = teacher_actor_options(runtime.num_gpus_per_actor, runtime.num_cpus_per_actor, runtime.resources)
    task = ray.remote(_sample).options(**opts)
    return ray.get(task.remote(spec, list(heldout), width, runtime, cache_url))


def _sample(
    spec: CacheSpec, heldout: list[Any], width: int, runtime: CacheRuntime, cache_url: str
) -> dict[str, np.ndarray]:
    from pipeline.cache.build.teacher import TeacherShardStage

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


def fidelity_problems(cache_url: str, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the cache's fidelity sample (record missing from a complete cache whose key says
    it keeps one, file missing or corrupt), each without its fix (FIDELITY_FIX); [] when none or intact."""
    if "states_fidelity" not in manifest["key_inputs"]:
        return []
    record = manifest.get("states_fidelity")
    if record is None:
        if not manifest["complete"]:
            return []  # a build killed before the sample was written: the resume computes it
        return ["the cache key says it keeps a fidelity sample but manifest.json has no states_fidelity"]
    return file_problems(cache_url, record["files"], "fidelity sample")


def has_fidelity_sample(manifest: dict[str, Any]) -> bool:
    return manifest.get("states_fidelity") is not None


def read_fidelity_sample(cache_url: str, manifest: dict[str, Any]) -> FidelitySample:
    """The stored sample, checked against manifest.states_fidelity; CacheError naming the fix otherwise."""
    record = manifest.get("states_fidelity")
    if record is None:
        raise CacheError(
            f"teacher cache {manifest['key']} keeps no held-out fidelity sample (it was built without one: "
            "plain float16/bfloat16 states, cache.states_fidelity_tokens: 0, no validation split, or an "
            "older moedistill). Fix: rebuild it with a lossy states codec, cache.states_fidelity_tokens > 0 "
            "and data.val_fraction > 0, or use `--source teacher` (reruns the teacher on cached sequences)."
        )
    problems = file_problems(cache_url, record["files"], "fidelity sample")
    if problems:
        raise CacheError(f"teacher cache {cfs.redact(cache_url)}: {'; '.join(problems)}. {FIDELITY_FIX}")
    arrays = {rel.rsplit("/", 1)[-1][: -len(".npy")]: read_npy(cache_url, rel) for rel in record["files"]}
    return FidelitySample(arrays)


def decode_sample(
    cache_url: str, manifest: dict[str, Any], sample: FidelitySample
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache's reader makes of the sample's encoded rows at the cached width: (states float32
    [n, P, W, D], zeros where token subsampling dropped them; keep bool [n])."""
    from pipeline.cache.read.states import group_basis_for, read_states

    inputs = manifest["key_inputs"]
    states = StatesCodec.from_key_inputs(inputs.get("states_codec"), inputs["dtypes"]["expert_states"])
    width, n, a = int(inputs["width"]), sample.num_tokens, sample.arrays
    positions = list(range(len(inputs["cached_layers"])))
    out = read_states(
        states,
        lambda name, rows: a[name][rows],
        lambda: a["expert_state_rows"],
        0,
        n,
        None,
        width,
        width,
        lambda: group_basis_for(cache_url, manifest, positions, width),
        "full",
    )
    keep = out.get("expert_state_mask", np.ones(n, dtype=bool))
    return torch.from_numpy(out["expert_states"]), torch.from_numpy(keep)


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
    from pipeline.cache.format.manifest import write_manifest

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
