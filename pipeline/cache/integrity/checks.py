"""Shard integrity at read and build time: nothing trains on bytes the manifest does not vouch for.

Two levels, by cost:
  quick_check      sizes and commit markers of every shard file (metadata calls only, no data read); a
                   build runs it on a complete cache and rebuilds what fails (reopen_if_damaged).
  ensure_verified  sha256 of every file a read is about to open, compared with the manifest; once per
                   process and shard file (Ray reuses worker processes, so later epochs pay nothing).
Before Ray Train starts, the reader runs both on every shard (verify_shards: one small Ray task per shard),
so a damaged cache fails before the first training step. A mismatch is a CacheError naming the shard, the
file and the repair command. A file that changes after it passed is not noticed by the same process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from pipeline import storage as cfs
from pipeline.cache.format import schema
from pipeline.cache.format.manifest import reopen_manifest
from pipeline.cache.format.shard import committed_shards
from pipeline.errors import CacheError

log = logging.getLogger(__name__)

# (shard url, file, expected sha256) already verified in this process.
_VERIFIED: set[tuple[str, str, str]] = set()
_LOCK = threading.Lock()


def repair_command(cache_path: str) -> str:
    return (
        f"run `moedistill cache repair {cfs.redact(cache_path)} --config <the config that built it>` (it "
        "rebuilds only the damaged shards)"
    )


def files_for_fields(files: Iterable[str], fields: Iterable[str]) -> list[str]:
    """The shard files a read of `fields` opens: the index, zarr metadata and the requested arrays' chunks
    (expert states are re-aggregated with the gates, so they need the gates too)."""
    fields = set(fields)
    arrays = {a for f in fields for a in schema.arrays_for_field(f)}
    if "expert_states" in fields:
        arrays |= set(schema.arrays_for_field("gates"))
    prefix = schema.ARRAYS_DIR + "/"
    out = []
    for name in files:
        in_array = name.startswith(prefix) and name.count("/") >= 2  # arrays.zarr/<array>/...
        if not in_array or name[len(prefix) :].split("/", 1)[0] in arrays:
            out.append(name)
    return sorted(out)


def _damage(cache_path: str, entry: dict[str, Any], problem: str, also: str = "") -> CacheError:
    return CacheError(
        f"shard {entry['shard_id']} of teacher cache {cfs.redact(cache_path)}: {problem}; training on it "
        f"would use damaged teacher targets.{also} Fix: {repair_command(cache_path)}."
    )


def forget_verified() -> None:
    """Forget which files passed in this process, so the next read of each hashes it again (what a first
    open costs; jobs/benchmarks/bench_distill.py times reads both ways). Never skips a check."""
    with _LOCK:
        _VERIFIED.clear()


def ensure_verified(cache_path: str, entry: dict[str, Any], fields: Iterable[str]) -> None:
    """CacheError unless every file of shard `entry` that a read of `fields` opens has the manifest's sha256.

    Each file is hashed once per process; a file that passed is not hashed again."""
    problem = checksum_problem(cache_path, entry, fields)
    if problem is not None:
        raise _damage(cache_path, entry, problem)


def checksum_problem(cache_path: str, entry: dict[str, Any], fields: Iterable[str]) -> str | None:
    """The first file of shard `entry` (of those a read of `fields` opens) whose sha256 is not the
    manifest's, as "file ... is corrupted (...)", or None; verified files are remembered per process."""
    fs, root = cfs.get_fs(cache_path)
    shard_dir = cfs.join(root, entry["path"])
    for name in files_for_fields(entry["files"], fields):
        want = entry["files"][name]["sha256"]
        token = (shard_dir, name, want)
        if token in _VERIFIED:
            continue
        fpath = cfs.join(shard_dir, name)
        try:
            digest = cfs.sha256_file(fpath) if cfs.is_local(fs) else cfs.sha256_remote(fs, fpath)
        except FileNotFoundError:
            return f"file {entry['path']}/{name} is missing"
        if digest != want:
            return (
                f"file {entry['path']}/{name} is corrupted (sha256 {digest[:16]}... != manifest "
                f"{want[:16]}...)"
            )
        with _LOCK:
            _VERIFIED.add(token)
    return None


def shard_problem(
    fs: Any, root: str, entry: dict[str, Any], files: Iterable[str] | None = None
) -> str | None:
    """Why a committed shard fails the quick check (missing commit marker, missing file, wrong size), or None.

    files: the names to check (default: every file of the commit record)."""
    shard_dir = cfs.join(root, entry["path"])
    marker = cfs.join(shard_dir, schema.COMMIT_MARKER)
    if not fs.exists(marker):
        return f"its commit marker {entry['path']}/{schema.COMMIT_MARKER} is missing"
    sizes = _sizes(fs, shard_dir)
    for name in sorted(entry["files"] if files is None else files):
        want = entry["files"][name]["bytes"]
        got = sizes.get(name)
        if got is None:
            return f"file {entry['path']}/{name} is missing"
        if got != want:
            return f"file {entry['path']}/{name} has {got} bytes, the manifest says {want}"
    return None


def _sizes(fs: Any, shard_dir: str) -> dict[str, int]:
    """name (relative to the shard directory) -> size, in one listing (one call on an object store)."""
    try:
        found = fs.find(shard_dir, detail=True)
    except FileNotFoundError:
        return {}
    base = shard_dir.rstrip("/") + "/"
    return {path[len(base) :]: int(info["size"]) for path, info in found.items() if path.startswith(base)}


def quick_check(
    cache_path: str, manifest: dict[str, Any], fields: Iterable[str] | None = None
) -> dict[int, str]:
    """shard_id -> problem for every shard of a complete manifest that fails the quick check.

    fields: check only the files a read of these fields opens (None: every file)."""
    fs, root = cfs.get_fs(cache_path)
    out = {}
    for entry in manifest["shards"]:
        files = None if fields is None else files_for_fields(entry["files"], fields)
        problem = shard_problem(fs, root, entry, files)
        if problem is not None:
            out[int(entry["shard_id"])] = problem
    return out


def check_before_read(cache_path: str, manifest: dict[str, Any], fields: Iterable[str]) -> None:
    """The driver's check before any read task starts: CacheError naming the first damaged shard."""
    problems = quick_check(cache_path, manifest, fields)
    if problems:
        sid, problem = next(iter(sorted(problems.items())))
        others = f" ({len(problems) - 1} more shards are damaged)" if len(problems) > 1 else ""
        raise CacheError(
            f"shard {sid} of teacher cache {cfs.redact(cache_path)} is damaged: {problem}{others}. "
            f"Fix: {repair_command(cache_path)}."
        )


def verify_shards(cache_path: str, manifest: dict[str, Any], fields: Iterable[str]) -> None:
    """ensure_verified for every shard before training: one small Ray task per shard when Ray is up (hashing
    runs where the shards are read, in parallel), else in this process. CacheError naming the first damaged
    shard."""
    fields = sorted(set(fields))
    entries = [e for e in manifest["shards"] if e["num_rows"] > 0]
    try:
        import ray

        on_ray = ray.is_initialized()
    except ImportError:
        on_ray = False
    if on_ray:  # the problem travels back as a string: no remote traceback
        task = ray.remote(num_cpus=0.25)(checksum_problem)
        problems = ray.get([task.remote(cache_path, e, fields) for e in entries])
    else:
        problems = [checksum_problem(cache_path, e, fields) for e in entries]
    damaged = [(e, p) for e, p in zip(entries, problems, strict=True) if p is not None]
    if damaged:
        ids = [e["shard_id"] for e, _ in damaged]
        also = f" Damaged shards: {ids}." if len(ids) > 1 else ""
        raise _damage(cache_path, damaged[0][0], damaged[0][1], also)


def uncommit_shards(cache_path: str, shard_ids: Iterable[int]) -> None:
    """Remove damaged shards, commit marker first (a crash mid-removal leaves an uncommitted shard, which the
    next build rebuilds), so that a resumed build recomputes exactly these."""
    fs, root = cfs.get_fs(cache_path)
    for sid in shard_ids:
        shard_dir = cfs.join(root, schema.shard_rel_path(int(sid)))
        marker = cfs.join(shard_dir, schema.COMMIT_MARKER)
        if fs.exists(marker):
            fs.rm(marker)
        if fs.exists(shard_dir):
            fs.rm(shard_dir, recursive=True)


def uncommitted_shard_dirs(cache_path: str) -> list[int]:
    """Shard ids whose directory exists without a commit marker (staging directories excluded)."""
    fs, root = cfs.get_fs(cache_path)
    shards_dir = cfs.join(root, schema.SHARDS_DIR)
    if not fs.exists(shards_dir):
        return []
    committed = committed_shards(cache_path)
    out = []
    for entry in fs.ls(shards_dir, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("shard-") and int(name[len("shard-") :]) not in committed:
            out.append(int(name[len("shard-") :]))
    return sorted(out)


def reopen_if_damaged(cache_path: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """A complete manifest whose shards fail the quick check is reopened with those shards un-committed, so
    the build resumes and recomputes exactly them; otherwise `manifest` unchanged."""
    damaged = quick_check(cache_path, manifest)
    if not damaged:
        return manifest
    log.warning(
        "teacher cache %s: %d shards are damaged (%s); rebuilding only those",
        manifest["key"],
        len(damaged),
        "; ".join(f"shard {sid}: {why}" for sid, why in sorted(damaged.items())),
    )
    uncommit_shards(cache_path, damaged)
    return reopen_manifest(cache_path, manifest)
