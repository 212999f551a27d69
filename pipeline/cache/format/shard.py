"""One cache shard: its in-memory form, its Arrow row form (teacher actor -> Datasink) and its files.

A shard directory holds index.parquet (one row per sequence), arrays.zarr (zarr v3 group of per-token arrays)
and _SHARD.json (commit marker with every file's size and sha256). Files are written with deterministic
encoders only (no timestamps, fixed codecs), so the same inputs give byte-identical shards: a resumed build
has the same checksums as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage as cfs
from pipeline.cache.format import schema
from pipeline.cache.format.codecs import StatesCodec

if TYPE_CHECKING:
    import zarr


@dataclass(frozen=True)
class ShardMeta:
    """Per-cache constants every shard records in its zarr group attributes."""

    cached_layers: tuple[int, ...]
    width: int
    hidden_size: int
    vocab_size: int
    logits_mode: str
    logits_k: int
    states_dtype: str
    store_expert_states: bool
    teacher_responses: bool
    states: StatesCodec = field(default_factory=StatesCodec)  # a schema-2 shard unless plain


@dataclass
class ShardData:
    shard_id: int
    num_records: int  # records assigned to the shard (>= rows: too-long records are dropped)
    seq_ids: list[int]
    input_ids: list[list[int]]
    response_mask: list[list[int]]
    num_tokens: list[int]
    arrays: dict[str, np.ndarray]  # storage dtypes, rows = distillation positions of all sequences in order
    teacher_response: list[list[int]] | None = None
    teacher_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    kept_mass: dict[str, float] | None = None  # states_mass < 1: teacher.kept_mass_record

    @property
    def total_tokens(self) -> int:
        return int(sum(self.num_tokens))


# --- Arrow row form (no pickling: raw bytes + shape + dtype per array) --------------------------------------
def shard_to_row(data: ShardData) -> dict[str, pa.Array]:
    cols: dict[str, pa.Array] = {
        "shard_id": pa.array([data.shard_id], pa.int64()),
        "num_records": pa.array([data.num_records], pa.int64()),
        "seq_id": pa.array([data.seq_ids], pa.list_(pa.int64())),
        "input_ids": pa.array([data.input_ids], pa.list_(pa.list_(pa.int32()))),
        "response_mask": pa.array([data.response_mask], pa.list_(pa.list_(pa.int8()))),
        "num_tokens": pa.array([data.num_tokens], pa.list_(pa.int32())),
        "teacher_response": pa.array([data.teacher_response], pa.list_(pa.list_(pa.int32()))),
        "teacher_seconds": pa.array([data.teacher_seconds], pa.float64()),
    }
    if data.kept_mass is not None:
        cols["kept_mass"] = pa.array([json.dumps(data.kept_mass)], pa.string())
    for name, arr in sorted(data.arrays.items()):
        arr = np.ascontiguousarray(arr)
        # Zero-copy: the binary value's data buffer is the numpy array's memory (kept alive by the buffer).
        offsets = pa.py_buffer(np.array([0, arr.nbytes], dtype=np.int64))
        values = pa.py_buffer(arr.reshape(-1).view(np.uint8)) if arr.size else pa.py_buffer(b"")
        cols[f"{name}__bytes"] = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), 1, [None, offsets, values]
        )
        cols[f"{name}__shape"] = pa.array([list(arr.shape)], pa.list_(pa.int64()))
        cols[f"{name}__dtype"] = pa.array([arr.dtype.str], pa.string())
    return cols


def rows_to_table(rows: list[dict[str, pa.Array]]) -> pa.Table:
    return pa.concat_tables([pa.table(r) for r in rows]) if rows else pa.table({})


def row_to_shard(table: pa.Table, i: int) -> ShardData:
    """Inverse of shard_to_row for row i of a table; per-token arrays are zero-copy views of Arrow memory."""

    def value(name: str) -> Any:
        return table.column(name)[i].as_py()

    arrays = {}
    for key in table.column_names:
        if key.endswith("__bytes"):
            name = key[: -len("__bytes")]
            buf = table.column(key)[i].as_buffer()
            dtype, shape = np.dtype(value(f"{name}__dtype")), value(f"{name}__shape")
            arrays[name] = (
                np.frombuffer(buf, dtype=dtype).reshape(shape) if buf is not None else np.empty(shape, dtype)
            )
    return ShardData(
        shard_id=int(value("shard_id")),
        num_records=int(value("num_records")),
        seq_ids=[int(s) for s in value("seq_id")],
        input_ids=value("input_ids"),
        response_mask=value("response_mask"),
        num_tokens=[int(n) for n in value("num_tokens")],
        arrays=arrays,
        teacher_response=value("teacher_response") if "teacher_response" in table.column_names else None,
        teacher_seconds=float(value("teacher_seconds") or 0.0)
        if "teacher_seconds" in table.column_names
        else 0.0,
        kept_mass=json.loads(value("kept_mass")) if "kept_mass" in table.column_names else None,
    )


# --- files --------------------------------------------------------------------------------------------------
def write_shard_files(data: ShardData, meta: ShardMeta, local_dir: str) -> dict[str, Any]:
    """Write index.parquet + arrays.zarr under `local_dir` (must not exist); return the commit record."""
    os.makedirs(local_dir)
    _write_index(data, meta, os.path.join(local_dir, schema.INDEX_FILE))
    _write_arrays(data, meta, os.path.join(local_dir, schema.ARRAYS_DIR))
    files = {}
    for rel in cfs.list_files(local_dir):
        p = os.path.join(local_dir, rel)
        files[rel] = {"bytes": os.path.getsize(p), "sha256": cfs.sha256_file(p)}
    return {
        "shard_id": data.shard_id,
        "path": schema.shard_rel_path(data.shard_id),
        "num_records": data.num_records,
        "num_rows": len(data.seq_ids),
        "num_tokens": data.total_tokens,
        "num_bytes": sum(f["bytes"] for f in files.values()),
        "files": files,
        **({"states_mass": data.kept_mass} if data.kept_mass is not None else {}),
    }


def _write_index(data: ShardData, meta: ShardMeta, path: str) -> None:
    offsets = (
        np.concatenate([[0], np.cumsum(data.num_tokens, dtype=np.int64)[:-1]]) if data.num_tokens else []
    )
    cols: dict[str, Any] = {
        "seq_id": data.seq_ids,
        "input_ids": data.input_ids,
        "response_mask": data.response_mask,
        "token_offset": [int(o) for o in offsets],
        "num_tokens": data.num_tokens,
    }
    if meta.teacher_responses:
        cols["teacher_response"] = data.teacher_response or [[] for _ in data.seq_ids]
    table = pa.table(cols, schema=schema.index_schema(meta.teacher_responses))
    # Deterministic bytes: no pandas metadata, fixed codec, statistics on (they are content-derived).
    pq.write_table(table, path, compression="zstd", compression_level=3, store_schema=True)


def _write_arrays(data: ShardData, meta: ShardMeta, path: str) -> None:
    # why lazy: the shard computation (teacher.py) imports this module on GPU images without zarr
    import zarr
    from zarr.codecs import BloscCodec
    from zarr.storage import LocalStore

    tokens = data.total_tokens
    version = meta.states.schema_version if meta.store_expert_states else 1
    state_tokens = len(data.arrays["expert_states"]) if meta.store_expert_states else tokens
    attrs = {
        "schema": schema.SCHEMA_NAME,
        "schema_version": version,
        "shard_id": data.shard_id,
        "num_rows": len(data.seq_ids),
        "num_tokens": tokens,
        "cached_layers": list(meta.cached_layers),
        "width": meta.width,
        "hidden_size": meta.hidden_size,
        "vocab_size": meta.vocab_size,
        "logits_mode": meta.logits_mode,
        "logits_k": meta.logits_k,
    }
    codec = meta.states.codec if version > 1 else meta.states_dtype
    if version > 1:
        attrs.update(
            states_codec=codec,
            states_rank=meta.states.rank,
            states_token_fraction=float(meta.states.token_fraction),
            states_seed=meta.states.seed,
            num_state_tokens=state_tokens,
        )
    group = zarr.open_group(LocalStore(path), mode="w-", attributes=attrs)
    dims = {
        "tokens": tokens,
        "k": meta.logits_k,
        "P": len(meta.cached_layers),
        "W": meta.width,
        "D": meta.hidden_size,
        "S": meta.states.row_length(meta.hidden_size) if version > 1 else meta.hidden_size,
        "state_tokens": state_tokens,
    }
    comp = schema.compressor_config()
    compressor = BloscCodec(cname=comp["cname"], clevel=comp["clevel"], shuffle=comp["shuffle"])
    defs = schema.array_fields(version)
    names = schema.array_names(meta.store_expert_states, version, meta.states.scaled, meta.states.subsampled)
    for name in names:
        shape, chunks, shards = schema.shapes(name, dims, version)
        dtype = schema.storage_dtype(name, codec, version)
        arr = data.arrays[name]
        if tuple(arr.shape) != shape or arr.dtype != np.dtype(dtype):
            raise ValueError(
                f"shard {data.shard_id}: array {name} is {arr.dtype}{arr.shape}, expected {dtype}{shape}. "
                "Fix: the teacher stage and the storage schema disagree (a bug); report it with this message."
            )
        z = group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            compressors=[compressor],
            fill_value=0,
            dimension_names=defs[name]["dimension_names"],
            attributes=schema.array_attributes(name, codec, version, meta.states.rank),
        )
        if len(arr):
            z[...] = arr


def commit_shard(
    data: ShardData, meta: ShardMeta, cache_url: str, fail_before_commit: bool = False
) -> dict[str, Any]:
    """Write a whole shard so that it becomes visible only when complete; return its commit record.

    Local: stage under shards/.tmp-*, then rename (atomic). Object store: stage in a local temp dir, upload
    under the final name, then write _SHARD.json last (its presence is the commit). `fail_before_commit`
    (failure injection) leaves the staged files behind and raises, like a job killed mid-write.
    """
    fs, root = cfs.get_fs(cache_url)
    final_rel = schema.shard_rel_path(data.shard_id)
    final = cfs.join(root, final_rel)
    if cfs.is_local(fs):
        shards_dir = cfs.join(root, schema.SHARDS_DIR)
        os.makedirs(shards_dir, exist_ok=True)
        staging = cfs.join(
            shards_dir, f"{schema.STAGING_PREFIX}{schema.shard_dir_name(data.shard_id)}-{uuid.uuid4().hex}"
        )
        commit = write_shard_files(data, meta, staging)
        cfs.write_atomic(fs, cfs.join(staging, schema.COMMIT_MARKER), cfs.pretty_json(commit))
        if fail_before_commit:
            raise RuntimeError(_injected_failure(data.shard_id))
        if os.path.exists(final):  # a retried task: the committed copy has identical content, keep it
            shutil.rmtree(staging)
        else:
            os.rename(staging, final)
        return commit
    with tempfile.TemporaryDirectory(prefix="moedistill-shard-") as tmp:
        local = os.path.join(tmp, "shard")
        commit = write_shard_files(data, meta, local)
        for rel in commit["files"]:
            fs.put_file(os.path.join(local, rel), cfs.join(final, rel))
        if fail_before_commit:
            raise RuntimeError(_injected_failure(data.shard_id))
        fs.pipe_file(cfs.join(final, schema.COMMIT_MARKER), cfs.pretty_json(commit))
    return commit


def _injected_failure(shard_id: int) -> str:
    return (
        f"injected failure before committing shard {shard_id} (test hook). Fix: leave "
        "CacheRuntime.fail_after_shards unset outside tests."
    )


def read_commit(fs: Any, shard_path: str) -> dict[str, Any] | None:
    """The shard's commit record, or None when the shard is not committed."""
    marker = cfs.join(shard_path, schema.COMMIT_MARKER)
    try:
        return cfs.read_json(fs, marker)
    except FileNotFoundError:
        return None


def committed_shards(cache_url: str) -> dict[int, dict[str, Any]]:
    """shard_id -> commit record for every committed shard under cache_url/shards (staging dirs ignored)."""
    fs, root = cfs.get_fs(cache_url)
    shards_dir = cfs.join(root, schema.SHARDS_DIR)
    if not fs.exists(shards_dir):
        return {}
    out = {}
    for entry in fs.ls(shards_dir, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("shard-"):
            continue
        commit = read_commit(fs, cfs.join(shards_dir, name))
        if commit is not None and commit.get("path") == f"{schema.SHARDS_DIR}/{name}":
            out[int(commit["shard_id"])] = commit
    return out


def remove_staging(cache_url: str) -> int:
    """Delete leftovers of killed writes (shards/.tmp-*); returns how many were removed."""
    fs, root = cfs.get_fs(cache_url)
    shards_dir = cfs.join(root, schema.SHARDS_DIR)
    if not fs.exists(shards_dir):
        return 0
    n = 0
    for entry in fs.ls(shards_dir, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1].startswith(schema.STAGING_PREFIX):
            fs.rm(entry, recursive=True)
            n += 1
    return n


def open_arrays(shard_url: str) -> zarr.Group:
    """The shard's zarr group, read-only, for a local path or fsspec URL."""
    import zarr  # lazy: see _write_arrays
    from zarr.storage import LocalStore

    fs, path = cfs.get_fs(shard_url)
    group_path = cfs.join(path, schema.ARRAYS_DIR)
    if cfs.is_local(fs):
        store: Any = LocalStore(group_path, read_only=True)
    else:
        from zarr.storage import FsspecStore

        store = FsspecStore.from_url(cfs.join(shard_url, schema.ARRAYS_DIR), read_only=True)
    return zarr.open_group(store, mode="r")


def read_index(shard_url: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = cfs.get_fs(shard_url)
    return pq.read_table(cfs.join(path, schema.INDEX_FILE), columns=columns, filesystem=fs)
