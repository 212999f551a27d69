"""The teacher cache: a Ray Data stage runs the teacher once and stores what distillation needs.

Modules: spec (CacheSpec/CacheRuntime), key (content-addressed key), schema (the on-disk contract in
storage_schemas/), shard (shard files), teacher (tokenise + teacher forward per shard), sink (Ray Datasink),
build (the pipeline), manifest, reader (TeacherCache, Ray Dataset), verify (verify / ls / storage accounting).
"""

from typing import Any

# Lazy exports: Ray tasks unpickle functions from pipeline.cache.* submodules; an eager package import would
# pull torch + transformers (seconds per worker process) into write tasks that never need them.
_EXPORTS = {
    "build_teacher_cache": "build",
    "cache_path_for": "build",
    "TeacherCache": "reader",
    "open_cache": "reader",
    "read_cache_dataset": "reader",
    "FIELDS": "spec",
    "CacheInfo": "spec",
    "CacheRuntime": "spec",
    "CacheSpec": "spec",
    "CacheSummary": "verify",
    "VerifyReport": "verify",
    "bytes_by_field": "verify",
    "bytes_per_token_by_field": "verify",
    "format_cache_list": "verify",
    "format_verify_report": "verify",
    "list_caches": "verify",
    "verify_cache": "verify",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"pipeline.cache.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pipeline.cache' has no attribute {name!r}")
