"""The teacher cache: a Ray Data stage runs the teacher once and stores what distillation needs.

Sub-rooms, lowest first (each imports only those below it; `lint-imports` holds them to it):
  format/     the on-disk contract: spec and key, schema (storage_schemas/), manifest, shards, codecs
  integrity/  is a store what its manifest says: the checks every read and build runs, and `cache verify`
  build/ | read/  building a cache (the teacher forward, the Ray Data pipeline and sink) | reading one
              (TeacherCache, the Ray Dataset); neither imports the other
  stage.py    stage 1 from a config (run_cache, the by-config pointers); repair.py: `moedistill cache repair`
"""

from typing import Any

# Lazy exports: Ray tasks unpickle functions from pipeline.cache.* submodules; an eager package import would
# pull torch + transformers (seconds per worker process) into write tasks that never need them.
_EXPORTS = {
    "build_teacher_cache": "build.builder",
    "cache_path_for": "build.builder",
    "TeacherCache": "read.reader",
    "open_cache": "read.reader",
    "read_cache_dataset": "read.reader",
    "FIELDS": "format.spec",
    "CacheInfo": "format.spec",
    "CacheRuntime": "format.spec",
    "CacheSpec": "format.spec",
    "CacheSummary": "read.listing",
    "VerifyReport": "integrity.verify",
    "bytes_by_field": "read.listing",
    "bytes_per_token_by_field": "read.listing",
    "format_cache_list": "read.listing",
    "format_verify_report": "integrity.verify",
    "list_caches": "read.listing",
    "verify_cache": "integrity.verify",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"pipeline.cache.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pipeline.cache' has no attribute {name!r}")
