"""The versioned on-disk contract (storage_schemas/teacher_cache.v<N>.json), loaded and enforced in code.

Writers take array dtypes, dimension names, chunk and shard shapes and codecs from the schema file, and
verify/readers check stores against it, so the JSON file is the single source of truth for the layout.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import CacheError

SCHEMA_NAME = "teacher_cache"
# The newest version this code writes; a cache that uses no expert-state codec is still written as version 1.
SCHEMA_VERSION = 2
SCHEMA_VERSIONS = (1, 2)  # every version it reads
SCHEMA_DIR = Path(__file__).resolve().parents[3] / "storage_schemas"

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
COMMIT_MARKER = "_SHARD.json"
INDEX_FILE = "index.parquet"
ARRAYS_DIR = "arrays.zarr"
STAGING_PREFIX = ".tmp-"

_ARROW_TYPES = {
    "int64": pa.int64(),
    "int32": pa.int32(),
    "int8": pa.int8(),
    "list<int32>": pa.list_(pa.int32()),
    "list<int8>": pa.list_(pa.int8()),
}


def shard_dir_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}"


def shard_rel_path(shard_id: int) -> str:
    return f"{SHARDS_DIR}/{shard_dir_name(shard_id)}"


@functools.cache
def load_schema(version: int = 1) -> dict[str, Any]:
    path = SCHEMA_DIR / f"{SCHEMA_NAME}.v{version}.json"
    if version not in SCHEMA_VERSIONS or not path.is_file():
        raise CacheError(
            f"teacher cache schema version {version!r} is unknown to this moedistill (it reads versions "
            f"{list(SCHEMA_VERSIONS)}). Fix: use the moedistill release that wrote the cache, or rebuild the "
            "cache with this one (`moedistill cache --config ...` writes a new key)."
        )
    return json.loads(path.read_text())


def version_of(manifest: dict[str, Any]) -> int:
    return int(manifest.get("schema_version", 1))


def check_version(manifest: Any, where: str) -> None:
    """CacheError unless `manifest` is a teacher-cache manifest of the version this code reads."""
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA_NAME:
        raise CacheError(
            f'{where} is not a teacher cache manifest (no "schema": "{SCHEMA_NAME}"). Fix: point at a '
            "directory written by `moedistill cache`."
        )
    load_schema(manifest.get("schema_version"))  # raises on an unknown version


def validate_manifest(manifest: dict[str, Any], where: str) -> None:
    check_version(manifest, where)
    version = version_of(manifest)
    _validate(manifest, load_schema(version)["manifest"], where, version)


def validate_shard_commit(commit: dict[str, Any], where: str, version: int = 1) -> None:
    schema = load_schema(version)["manifest"]
    _validate(commit, {"$defs": schema["$defs"], "$ref": "#/$defs/shard"}, where, version)


def validate_group_attributes(attrs: dict[str, Any], where: str) -> None:
    """Against the version the attributes name (a v1 shard has no codec attributes, a v2 shard must)."""
    version = attrs.get("schema_version")
    if version not in SCHEMA_VERSIONS:
        raise CacheError(
            f"{where}: schema_version {version!r} is not one this moedistill reads "
            f"({list(SCHEMA_VERSIONS)}). Fix: rebuild the shard (delete it and rerun `moedistill cache "
            "--config ...`)."
        )
    _validate(attrs, load_schema(version)["arrays"]["group_attributes"], where, version)


def _validate(obj: Any, schema: dict[str, Any], where: str, version: int = 1) -> None:
    import jsonschema  # why lazy: a Ray dependency, absent where only the shard computation runs

    try:
        jsonschema.validate(obj, schema)
    except jsonschema.ValidationError as e:
        loc = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise CacheError(
            f"{where} does not match the teacher cache schema v{version} at {loc}: {e.message}. Fix: "
            "the store is damaged or was written by other software; rebuild it with `moedistill cache "
            "--config ...`."
        ) from None


# --- the Parquet index --------------------------------------------------------------------------------------
def index_schema(with_teacher_response: bool) -> pa.Schema:
    fields = []
    for col in load_schema()["index"]["columns"]:
        if col["required"] is True or with_teacher_response:
            fields.append(pa.field(col["name"], _ARROW_TYPES[col["arrow_type"]], nullable=False))
    return pa.schema(fields)


def check_index_schema(actual: pa.Schema, with_teacher_response: bool, where: str) -> None:
    expected = index_schema(with_teacher_response)
    for f in expected:
        if f.name not in actual.names:
            raise CacheError(
                f"{where}: index column {f.name!r} is missing. Fix: rebuild the shard (delete it and rerun)."
            )
        if not actual.field(f.name).type.equals(f.type):
            raise CacheError(
                f"{where}: index column {f.name!r} has Arrow type {actual.field(f.name).type}, schema says "
                f"{f.type}. Fix: rebuild the shard (delete it and rerun)."
            )


# --- the zarr arrays ----------------------------------------------------------------------------------------
# Logical dtype (array attribute) of each expert-state row codec.
STATES_LOGICAL = {"float16": "float16", "bfloat16": "bfloat16", "fp8": "float8_e4m3fn", "int8": "int8"}


def array_fields(version: int = 1) -> dict[str, dict[str, Any]]:
    return load_schema(version)["arrays"]["fields"]


def token_chunk() -> int:
    return int(load_schema()["layout"]["token_chunk"])


def array_names(
    store_expert_states: bool, version: int = 1, scaled_codec: bool = False, token_subsample: bool = False
) -> list[str]:
    """The arrays a shard holds; a condition string in the schema's "required" names the flag."""
    flags = {
        "store_expert_states": store_expert_states,
        "scaled_codec": store_expert_states and scaled_codec,
        "token_subsample": store_expert_states and token_subsample,
    }
    return [n for n, d in array_fields(version).items() if d["required"] is True or flags[d["required"]]]


def arrays_for_field(field: str, version: int = SCHEMA_VERSION) -> list[str]:
    return [n for n, d in array_fields(version).items() if d["field"] == field]


def storage_dtype(name: str, states_dtype: str, version: int = 1) -> str:
    dtype = array_fields(version)[name]["dtype"]
    return dtype[states_dtype] if isinstance(dtype, dict) else dtype


def logical_dtype(name: str, states_dtype: str, version: int = 1) -> str:
    logical = array_fields(version)[name]["logical_dtype"]
    if logical == "states_codec":
        return STATES_LOGICAL[states_dtype]
    return states_dtype if logical == "states_dtype" else logical


def array_attributes(name: str, codec: str, version: int, rank: int | None) -> dict[str, Any]:
    """The zarr attributes of array `name`: its logical dtype; v2 expert_states also what a row holds."""
    attrs: dict[str, Any] = {"logical_dtype": logical_dtype(name, codec, version)}
    if version > 1 and name == "expert_states":
        attrs["content"] = "states" if rank is None else "coefficients"
    return attrs


def shapes(
    name: str, dims: dict[str, int], version: int = 1
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(shape, chunk shape, shard shape) of array `name` for dims {tokens, k, P, W, D} (v2 also: S, the
    stored row length, and state_tokens, the rows that keep states; both default to D and tokens)."""
    tc = token_chunk()

    def padded(n: int) -> int:
        return max(tc, math.ceil(n / tc) * tc)

    env = {"S": dims["D"], "state_tokens": dims["tokens"], **dims}
    env.update(token_chunk=tc, tokens_padded=padded(env["tokens"]))
    env["state_tokens_padded"] = padded(env["state_tokens"])
    d = array_fields(version)[name]

    def ev(spec: list[Any]) -> tuple[int, ...]:
        return tuple(int(x) if isinstance(x, int) else int(env[x]) for x in spec)

    return ev(d["shape"]), ev(d["chunk_shape"]), ev(d["shard_shape"])


def compressor_config() -> dict[str, Any]:
    return dict(load_schema()["arrays"]["codecs"]["compressor"])
