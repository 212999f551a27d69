"""Fitting the low-rank expert-state basis of a schema-2 cache (cache.states_rank): once, before any shard,
on a fixed seeded sample of the cache's own distillation tokens. Its files (ROOT/<key>/state_basis/, recorded
in manifest.state_basis with sizes + sha256) are written, read and checked by
pipeline/cache/format/side_files.py: a resumed build and every reader reuse it, checked against that record.
The maths (BasisAccumulator, projection) is pipeline/cache/format/codecs.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from pipeline import storage as cfs
from pipeline.cache.build.teacher import TeacherShardStage, input_device, teacher_targets, tokenize_shard
from pipeline.cache.format.codecs import BasisAccumulator, StateBasis
from pipeline.cache.format.manifest import write_manifest
from pipeline.cache.format.side_files import (
    BASIS_DIR,
    BASIS_FIX,
    basis_arrays,
    basis_problems,
    npy_files,
    write_basis,
    write_files,
)
from pipeline.cache.format.spec import CacheRuntime, CacheSpec
from pipeline.data.collate import pad_batch
from pipeline.data.stage import load_tokenizer
from pipeline.errors import CacheError
from pipeline.placement import teacher_actor_options

log = logging.getLogger(__name__)


def restore_state_basis(
    url: str,
    manifest: dict[str, Any],
    spec: CacheSpec,
    records: Sequence[Any],
    width: int,
    runtime: CacheRuntime,
) -> bool:
    """Refit a missing or damaged basis from its seeded sample (`moedistill cache repair`): the same teacher
    and records give the same bytes, which are checked against manifest.state_basis before any file is
    replaced. True when it restored the files; False when nothing needed restoring. CacheError (nothing
    written, the manifest untouched) when the refit gives other bytes than the recorded basis."""
    record = manifest.get("state_basis")
    if record is None or not basis_problems(url, manifest):
        return False
    basis, _ = fit_state_basis(spec, records, width, runtime)
    files = npy_files(BASIS_DIR, basis_arrays(basis))
    differs = [
        rel
        for rel, data in files.items()
        if rel not in record["files"] or hashlib.sha256(data).hexdigest() != record["files"][rel]["sha256"]
    ]
    if differs:
        raise CacheError(
            f"the refitted state basis of {cfs.redact(url)} differs from the one its shards were encoded "
            f"with ({', '.join(differs)}: another teacher, data or floating-point build?). {BASIS_FIX}"
        )
    write_files(url, BASIS_DIR, files)
    return True


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

    opts = teacher_actor_options(runtime.num_gpus_per_actor, runtime.num_cpus_per_actor, runtime.resources)
    task = ray.remote(_fit).options(**opts)
    return ray.get(task.remote(spec, list(records), width, runtime))


def sampled_targets(
    stage: Any, spec: CacheSpec, records: Sequence[Any], batch_size: int
) -> Iterator[tuple[list[dict[str, Any]], dict[str, torch.Tensor]]]:
    """The teacher's targets over `records` in the seeded sample order (sample_order), batch_size sequences
    per forward: (tokenised examples, seq_id = the record's index in `records`; their teacher_targets)."""
    tokenizer = load_tokenizer(spec.tokenizer_path)
    device = input_device(stage.adapter.model)
    order = sample_order(len(records), spec.states.seed)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        examples = tokenize_shard(tokenizer, [records[i] for i in chunk], 0, spec.max_length)
        if not examples:
            continue
        for ex in examples:  # tokenize_shard numbers them within the chunk
            ex["seq_id"] = chunk[ex["seq_id"]]
        batch = {k: v.to(device) for k, v in pad_batch(examples, stage.pad_id).items()}
        yield examples, teacher_targets(stage.adapter, batch, stage.out)


@contextlib.contextmanager
def actor_threads(runtime: CacheRuntime) -> Iterator[None]:
    """torch threads as the teacher actors run with (float rounding depends on it), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(runtime.threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(spec: CacheSpec, records: list[Any], width: int, runtime: CacheRuntime) -> tuple[StateBasis, int]:
    states = spec.states
    assert states.rank is not None
    with actor_threads(runtime):
        stage = TeacherShardStage(spec, width, runtime.batch_size, runtime.num_gpus_per_actor)
        acc = BasisAccumulator()
        for _, t in sampled_targets(stage, spec, records, runtime.batch_size):
            acc.update(t["expert_states"][: states.basis_tokens - acc.n])
            if acc.n >= states.basis_tokens:
                break
        return acc.finish(states.rank), acc.n


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
