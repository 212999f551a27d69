"""manifest.json: written with complete=false when a build starts, replaced atomically with complete=true
(the completion marker) once every shard is committed -- always the last write of a build."""

from __future__ import annotations

from typing import Any

from pipeline import __version__
from pipeline.cache import fs as cfs
from pipeline.cache import schema
from pipeline.cache.shard import committed_shards
from pipeline.errors import CacheError


def manifest_path(cache_url: str) -> str:
    return cfs.join(cache_url, schema.MANIFEST)


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
            f"{cache_url}/{schema.MANIFEST} is not valid JSON ({e}). Fix: delete the cache directory and "
            "rebuild it."
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
        "schema_version": schema.SCHEMA_VERSION,
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


def finalize_manifest(cache_url: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Collect every committed shard from storage and write the complete manifest (the completion marker)."""
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
    final["complete"] = True
    write_manifest(cache_url, final)
    return final
