"""The low-rank expert-state basis of a schema-2 cache (cache.states_rank): fitted once, before any shard, on
a fixed seeded sample of the cache's own distillation tokens; written to ROOT/<key>/state_basis/ and recorded
in manifest.state_basis (sizes + sha256); a resumed build and every reader reuse it, checked against that
record. The maths (BasisAccumulator, projection) is pipeline/cache/codecs.py.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.cache import fs as cfs
from pipeline.cache.codecs import BasisAccumulator, StateBasis
from pipeline.cache.spec import CacheRuntime, CacheSpec
from pipeline.errors import CacheError

log = logging.getLogger(__name__)

BASIS_DIR = "state_basis"
BASIS_FILES = {"u": f"{BASIS_DIR}/u.npy", "mean": f"{BASIS_DIR}/mean.npy"}
BASIS_FIX = (
    "Fix: delete the cache directory and rerun `moedistill cache --config ...` (its shards were encoded with "
    "that basis, so they cannot be kept without it)."
)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype="<f4"), allow_pickle=False)  # deterministic bytes
    return buf.getvalue()


def write_basis(cache_url: str, basis: StateBasis, num_tokens: int) -> dict[str, Any]:
    """Write the basis files; return the manifest.state_basis record."""
    fs, root = cfs.get_fs(cache_url)
    fs.makedirs(cfs.join(root, BASIS_DIR), exist_ok=True)
    files = {}
    for name, rel in BASIS_FILES.items():
        data = _npy(getattr(basis, name).numpy())
        cfs.write_atomic(fs, cfs.join(root, rel), data)
        files[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return {"rank": basis.rank, "num_tokens": int(num_tokens), "files": files}


def basis_problems(cache_url: str, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the cache's basis (missing record, missing/short/corrupt file), naming the file,
    each without its fix (BASIS_FIX); [] when the cache needs no basis or its basis is intact."""
    codec = manifest["key_inputs"].get("states_codec") or {}
    if codec.get("rank") is None:
        return []
    record = manifest.get("state_basis")
    if record is None:
        if not manifest["complete"]:
            return []  # a build killed before the basis was written: the resume fits it
        return [f"the cache stores rank-{codec['rank']} coefficients but manifest.json has no state_basis"]
    fs, root = cfs.get_fs(cache_url)
    out = []
    for rel, want in sorted(record["files"].items()):
        path = cfs.join(root, rel)
        if not fs.exists(path):
            out.append(f"basis file {rel} is missing")
            continue
        data = fs.cat_file(path)
        if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
            out.append(
                f"basis file {rel} is corrupted ({len(data)} bytes, manifest says {want['bytes']}; sha256 "
                f"differs)"
            )
    return out


def read_basis(cache_url: str, manifest: dict[str, Any]) -> StateBasis:
    """The cache's basis, checked against manifest.state_basis; CacheError naming the file otherwise."""
    problems = basis_problems(cache_url, manifest)
    if problems or manifest.get("state_basis") is None:
        what = "; ".join(problems) or "it stores full states and has no state_basis"
        raise CacheError(f"teacher cache {cfs.redact(cache_url)}: {what}. {BASIS_FIX}")
    fs, root = cfs.get_fs(cache_url)
    arrays = {
        name: torch.from_numpy(np.load(io.BytesIO(fs.cat_file(cfs.join(root, rel))), allow_pickle=False))
        for name, rel in BASIS_FILES.items()
    }
    return StateBasis(arrays["u"], arrays["mean"])


def sample_order(num_records: int, seed: int) -> list[int]:
    """The records the basis sample is drawn from, in order: a seeded permutation (the same every run)."""
    return [int(i) for i in np.random.default_rng(seed).permutation(num_records)]


def fit_state_basis(
    spec: CacheSpec, records: Sequence[Any], width: int, runtime: CacheRuntime
) -> tuple[StateBasis, int]:
    """Run the teacher over the seeded record sample until states_basis_tokens distillation tokens are seen;
    return the fitted basis and the number of tokens it saw. Runs where a teacher actor would (a Ray task
    with the actor's placement) unless the build is local."""
    if runtime.executor == "local":
        return _fit(spec, list(records), width, runtime)
    import ray

    from pipeline.placement import teacher_actor_options

    opts = teacher_actor_options(runtime.num_gpus_per_actor, runtime.num_cpus_per_actor, runtime.resources)
    task = ray.remote(_fit).options(**opts)
    return ray.get(task.remote(spec, list(records), width, runtime))


def _fit(spec: CacheSpec, records: list[Any], width: int, runtime: CacheRuntime) -> tuple[StateBasis, int]:
    from pipeline.cache.teacher import TeacherShardStage, input_device, teacher_targets, tokenize_shard
    from pipeline.data.collate import pad_batch
    from pipeline.data.stage import load_tokenizer

    states = spec.states
    assert states.rank is not None
    threads = torch.get_num_threads()
    torch.set_num_threads(runtime.threads)  # as the teacher actors: same rounding
    try:
        stage = TeacherShardStage(spec, width, runtime.batch_size, runtime.num_gpus_per_actor)
        tokenizer = load_tokenizer(spec.tokenizer_path)
        device = input_device(stage.adapter.model)
        acc, order, step = BasisAccumulator(), sample_order(len(records), states.seed), runtime.batch_size
        for start in range(0, len(order), step):
            chunk = [records[i] for i in order[start : start + step]]
            examples = tokenize_shard(tokenizer, chunk, 0, spec.max_length)
            if not examples:
                continue
            batch = {k: v.to(device) for k, v in pad_batch(examples, stage.pad_id).items()}
            h = teacher_targets(stage.adapter, batch, stage.out)["expert_states"]
            acc.update(h[: states.basis_tokens - acc.n])
            if acc.n >= states.basis_tokens:
                break
        return acc.finish(states.rank), acc.n
    finally:
        torch.set_num_threads(threads)


def ensure_state_basis(
    url: str,
    manifest: dict[str, Any],
    spec: CacheSpec,
    records: Sequence[Any],
    width: int,
    runtime: CacheRuntime,
) -> dict[str, Any]:
    """The manifest with its state_basis: fitted and written now (first build, or a build killed before it
    was written), or the stored one, checked (a resume). Called before any shard is computed."""
    from pipeline.cache.manifest import write_manifest

    if not spec.store_expert_states or spec.states.rank is None:
        return manifest
    if manifest.get("state_basis") is not None:
        problems = basis_problems(url, manifest)
        if problems:
            raise CacheError(
                f"cannot resume teacher cache {cfs.redact(url)}: {'; '.join(problems)}. {BASIS_FIX}"
            )
        log.info("teacher cache %s: reusing its rank-%d state basis", manifest["key"], spec.states.rank)
        return manifest
    basis, n = fit_state_basis(spec, records, width, runtime)
    log.info("teacher cache %s: fitted a rank-%d state basis on %d tokens", manifest["key"], basis.rank, n)
    updated = {**manifest, "state_basis": write_basis(url, basis, n)}
    write_manifest(url, updated)
    return updated
