"""The low-rank expert-state basis of a schema-2 cache (cache.states_rank): fitted once, before any shard, on
a fixed seeded sample of the cache's own distillation tokens; written to ROOT/<key>/state_basis/ and recorded
in manifest.state_basis (sizes + sha256); a resumed build and every reader reuse it, checked against that
record. The maths (BasisAccumulator, projection) is pipeline/cache/format/codecs.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from pipeline import storage as cfs
from pipeline.cache.format.codecs import BasisAccumulator, StateBasis
from pipeline.cache.format.spec import CacheRuntime, CacheSpec
from pipeline.errors import CacheError

log = logging.getLogger(__name__)

BASIS_DIR = "state_basis"
BASIS_FILES = {"u": f"{BASIS_DIR}/u.npy", "mean": f"{BASIS_DIR}/mean.npy"}
BASIS_FIX = (
    "Fix: delete the cache directory and rerun `moedistill cache --config ...` (its shards were encoded with "
    "that basis, so they cannot be kept without it)."
)


def _npy(arr: np.ndarray, dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=dtype), allow_pickle=False)  # deterministic bytes
    return buf.getvalue()


def _npy_files(directory: str, arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """{directory/<name>.npy: its bytes} (little-endian, each array's own dtype)."""
    return {
        f"{directory}/{name}.npy": _npy(arr, np.dtype(arr.dtype).newbyteorder("<").str)
        for name, arr in arrays.items()
    }


def write_npy_files(cache_url: str, directory: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write each array as directory/<name>.npy (little-endian, its own dtype); return the manifest's
    {relative path: {bytes, sha256}} record of them."""
    return _write_files(cache_url, directory, _npy_files(directory, arrays))


def _write_files(cache_url: str, directory: str, files: dict[str, bytes]) -> dict[str, Any]:
    """Write {relative path: bytes} under `directory` atomically; -> their {bytes, sha256} record."""
    fs, root = cfs.get_fs(cache_url)
    fs.makedirs(cfs.join(root, directory), exist_ok=True)
    for rel, data in files.items():
        cfs.write_atomic(fs, cfs.join(root, rel), data)
    return {rel: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for rel, d in files.items()}


def file_problems(cache_url: str, files: dict[str, Any], what: str) -> list[str]:
    """'<what> file REL is missing / corrupted (...)' for each recorded file whose size or sha256 differs."""
    fs, root = cfs.get_fs(cache_url)
    out = []
    for rel, want in sorted(files.items()):
        path = cfs.join(root, rel)
        if not fs.exists(path):
            out.append(f"{what} file {rel} is missing")
            continue
        data = fs.cat_file(path)
        if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
            out.append(
                f"{what} file {rel} is corrupted ({len(data)} bytes, manifest says {want['bytes']}; sha256 "
                f"differs)"
            )
    return out


def read_npy(cache_url: str, rel: str) -> np.ndarray:
    fs, root = cfs.get_fs(cache_url)
    return np.load(io.BytesIO(fs.cat_file(cfs.join(root, rel))), allow_pickle=False)


def _basis_arrays(basis: StateBasis) -> dict[str, np.ndarray]:
    return {name: getattr(basis, name).numpy().astype(np.float32) for name in BASIS_FILES}


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
    files = _npy_files(BASIS_DIR, _basis_arrays(basis))
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
    _write_files(url, BASIS_DIR, files)
    return True


def write_basis(cache_url: str, basis: StateBasis, num_tokens: int) -> dict[str, Any]:
    """Write the basis files; return the manifest.state_basis record."""
    arrays = _basis_arrays(basis)
    files = write_npy_files(cache_url, BASIS_DIR, arrays)
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
    return file_problems(cache_url, record["files"], "basis")


def read_basis(cache_url: str, manifest: dict[str, Any]) -> StateBasis:
    """The cache's basis, checked against manifest.state_basis; CacheError naming the file otherwise."""
    problems = basis_problems(cache_url, manifest)
    if problems or manifest.get("state_basis") is None:
        what = "; ".join(problems) or "it stores full states and has no state_basis"
        raise CacheError(f"teacher cache {cfs.redact(cache_url)}: {what}. {BASIS_FIX}")
    arrays = {name: torch.from_numpy(read_npy(cache_url, rel)) for name, rel in BASIS_FILES.items()}
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


def sampled_targets(
    stage: Any, spec: CacheSpec, records: Sequence[Any], batch_size: int
) -> Iterator[tuple[list[dict[str, Any]], dict[str, torch.Tensor]]]:
    """The teacher's targets over `records` in the seeded sample order (sample_order), batch_size sequences
    per forward: (tokenised examples, seq_id = the record's index in `records`; their teacher_targets)."""
    from pipeline.cache.build.teacher import input_device, teacher_targets, tokenize_shard
    from pipeline.data.collate import pad_batch
    from pipeline.data.stage import load_tokenizer

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
    from pipeline.cache.build.teacher import TeacherShardStage

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
    from pipeline.cache.format.manifest import write_manifest

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
