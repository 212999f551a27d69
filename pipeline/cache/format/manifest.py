"""manifest.json: written with complete=false when a build starts, replaced atomically with complete=true
(the completion marker) once every shard is committed -- always the last write of a build."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline import __version__
from pipeline import storage as cfs
from pipeline.cache.format import schema
from pipeline.cache.format.shard import committed_shards
from pipeline.errors import CacheError


def read_manifest(cache_url: str) -> dict[str, Any] | None:
    """The parsed manifest (version-checked), or None when there is none."""
    fs, root = cfs.get_fs(cache_url)
    path = cfs.join(root, schema.MANIFEST)
    try:
        manifest = cfs.read_json(fs, path)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CacheError(
            f"{cfs.redact(cache_url)}/{schema.MANIFEST} is not valid JSON ({e}). Fix: run `moedistill cache "
            f"repair {cfs.redact(cache_url)} --config <the config that built it>`: it rebuilds the manifest "
            "from the shards' commit markers."
        ) from None
    schema.check_version(manifest, f"{cache_url}/{schema.MANIFEST}")
    return manifest


def new_manifest(
    key: str,
    key_inputs: dict[str, Any],
    sources: dict[str, Any],
    teacher: dict[str, Any],
    rows_per_shard: int,
    num_records: int,
    settings: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A fresh, incomplete manifest. settings: the other runtime values that decide the bytes (batch_size,
    torch_threads: build.STORED_LAYOUT); they go into "layout" beside rows_per_shard, for resumes to reuse."""
    num_shards = -(-num_records // rows_per_shard)
    return {
        "schema": schema.SCHEMA_NAME,
        "schema_version": key_inputs["schema_version"],  # 1 or 2: see key.key_inputs
        "key": key,
        "complete": False,
        "key_inputs": key_inputs,
        "sources": sources,
        "teacher": teacher,
        "layout": {
            **(settings or {}),
            "rows_per_shard": rows_per_shard,
            "num_shards": num_shards,
            "num_records": num_records,
            "token_chunk": schema.token_chunk(),
        },
        "shards": [],
        "totals": {"num_sequences": 0, "num_tokens": 0, "num_bytes": 0, "num_dropped": 0},
        "created_with": {"moedistill": __version__},
    }


def write_manifest(cache_url: str, manifest: dict[str, Any]) -> None:
    schema.validate_manifest(manifest, f"manifest of {cache_url}")
    fs, root = cfs.get_fs(cache_url)
    cfs.write_atomic(fs, cfs.join(root, schema.MANIFEST), cfs.pretty_json(manifest))


def finalize_manifest(
    cache_url: str, manifest: dict[str, Any], check: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Collect every committed shard from storage and write the complete manifest (the completion marker).
    `check` sees the totals first and may raise: a cache it refuses (e.g. no usable sequence) stays
    incomplete, never marked complete."""
    commits = committed_shards(cache_url)
    expected = range(manifest["layout"]["num_shards"])
    missing = [i for i in expected if i not in commits]
    if missing:
        raise CacheError(
            f"cannot complete the cache at {cache_url}: shards "
            f"{missing[:10]}{'...' if len(missing) > 10 else ''} are not committed. Fix: rerun `moedistill "
            "cache --config ...` to resume it."
        )
    shards = [commits[i] for i in expected]
    for c in shards:
        schema.validate_shard_commit(c, f"{cache_url}/{c['path']}/{schema.COMMIT_MARKER}")
    final = dict(manifest)
    final["shards"] = shards
    final["totals"] = {
        "num_sequences": sum(c["num_rows"] for c in shards),
        "num_tokens": sum(c["num_tokens"] for c in shards),
        "num_bytes": sum(c["num_bytes"] for c in shards),
        "num_dropped": sum(c["num_records"] - c["num_rows"] for c in shards),
    }
    kept = [c["states_mass"] for c in shards if "states_mass" in c]
    if kept:  # a mass-truncated build: the router mass its states were computed from, over the whole cache
        rows = sum(int(k["rows"]) for k in kept)
        final["totals"]["states_mass"] = {
            "target": kept[0]["target"],
            "kept_mean": sum(float(k["kept_sum"]) for k in kept) / max(rows, 1),
            "kept_min": min(float(k["kept_min"]) for k in kept),
            "rows": rows,
        }
    if check is not None:
        check(final)
    final["complete"] = True
    write_manifest(cache_url, final)
    return final


def reopen_manifest(cache_url: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Turn a complete manifest back into an incomplete one (same key, inputs and layout) so that the next
    build resumes: it rebuilds the shards that are no longer committed and writes the completion marker."""
    reopened = dict(manifest)
    reopened["complete"] = False
    reopened["shards"] = []
    reopened["totals"] = {"num_sequences": 0, "num_tokens": 0, "num_bytes": 0, "num_dropped": 0}
    write_manifest(cache_url, reopened)
    return reopened


def infer_rows_per_shard(commits: dict[int, dict[str, Any]], default: int) -> int:
    """The rows_per_shard a cache was built with, from its commit records: every shard but the last holds
    exactly that many records. `default` (the config's value) when fewer than two shards are left to tell."""
    last = max(commits, default=-1)
    full = {c["num_records"] for sid, c in commits.items() if sid < last}
    if len(full) > 1:
        raise CacheError(
            f"the committed shards disagree on their record count ({sorted(full)}): they come from "
            "different builds. Fix: delete the cache directory and rebuild it."
        )
    return full.pop() if full else default
