"""verify_cache: the data behind `moedistill cache verify` (every shard file's size and sha256 against the
manifest, each shard against the storage schema, the state basis and the fidelity sample);
format_verify_report turns it into text for the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import storage as cfs
from pipeline.cache.format import schema
from pipeline.cache.format.codecs import StatesCodec, keep_rows
from pipeline.cache.format.manifest import read_manifest
from pipeline.cache.format.shard import committed_shards, open_arrays, read_commit, read_index
from pipeline.cache.format.side_files import BASIS_FIX, FIDELITY_FIX, basis_problems, fidelity_problems
from pipeline.errors import CacheError
from pipeline.storage import human_bytes

_REBUILD = (
    "Fix: delete that shard directory and rerun `moedistill cache --config ...` (it rebuilds only missing "
    "shards), or run `moedistill cache repair <cache path> --config ...` (both steps, then a verify)."
)


@dataclass
class VerifyReport:
    path: str
    ok: bool = True
    key: str | None = None
    schema_version: int | None = None
    complete: bool = False
    num_shards: int = 0
    num_shards_ok: int = 0
    num_files: int = 0
    num_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    damaged: list[int] = field(default_factory=list)  # committed shards that failed a check

    def fail(self, message: str) -> None:
        self.ok = False
        self.problems.append(message)


def verify_cache(path: str, check_schema: bool = True) -> VerifyReport:
    """Re-check every shard file's size and sha256 against the manifest, and (check_schema) each shard's
    Parquet index and zarr arrays against storage_schemas/teacher_cache.v1.json. Never raises for a damaged
    store: every problem becomes one precise line in the report."""
    report = VerifyReport(path=path)
    try:
        manifest = read_manifest(path)
        if manifest is None:
            report.fail(
                f"no {schema.MANIFEST} at {path}: not a teacher cache, or its build never started. Fix: pass "
                "a ROOT/<key> directory that `moedistill cache ls ROOT` lists."
            )
            return report
        schema.validate_manifest(manifest, f"{path}/{schema.MANIFEST}")
    except CacheError as e:
        report.fail(str(e))
        return report
    report.key = manifest["key"]
    report.schema_version = manifest["schema_version"]
    report.complete = bool(manifest["complete"])
    report.num_shards = manifest["layout"]["num_shards"]
    fs, root = cfs.get_fs(path)
    shards = manifest["shards"]
    if not report.complete:
        commits = committed_shards(path)
        report.fail(
            f"incomplete: {len(commits)} of {report.num_shards} shards committed and no completion marker "
            "(checked the committed shards only). Fix: rerun `moedistill cache --config ...` to resume it."
        )
        shards = [commits[i] for i in sorted(commits)]
    for problem in basis_problems(path, manifest):  # every shard of a low-rank cache depends on it
        report.fail(f"{problem}. {BASIS_FIX}")
    for problem in fidelity_problems(path, manifest):  # the held-out sample of the fidelity report
        report.fail(f"{problem}. {FIDELITY_FIX}")
    for entry in shards:
        if _verify_shard(fs, root, path, entry, manifest, report, check_schema):
            report.num_shards_ok += 1
        else:
            report.damaged.append(int(entry["shard_id"]))
    return report


def _verify_shard(
    fs: Any,
    root: str,
    path: str,
    entry: dict[str, Any],
    manifest: dict[str, Any],
    report: VerifyReport,
    check_schema: bool,
) -> bool:
    sid, rel = entry["shard_id"], entry["path"]
    shard_dir = cfs.join(root, rel)
    if not fs.exists(shard_dir):
        report.fail(f"shard {sid} is missing: directory {rel} does not exist. {_REBUILD}")
        return False
    try:
        commit = read_commit(fs, shard_dir)
    except ValueError:  # not JSON
        commit = {}
    if commit != entry:  # the marker is the commit: without it a resumed build would redo the shard
        what = "is missing" if commit is None else "differs from the manifest's record"
        report.fail(f"shard {sid}: commit marker {rel}/{schema.COMMIT_MARKER} {what}. {_REBUILD}")
        return False
    ok = True
    for name, want in sorted(entry["files"].items()):
        fpath = cfs.join(shard_dir, name)
        report.num_files += 1
        if not fs.exists(fpath):
            report.fail(f"shard {sid}: file {rel}/{name} is missing. {_REBUILD}")
            ok = False
            continue
        size = fs.size(fpath)
        report.num_bytes += size
        if size != want["bytes"]:
            kind = "truncated" if size < want["bytes"] else "longer than recorded"
            report.fail(
                f"shard {sid}: file {rel}/{name} is {kind}: {size} bytes, manifest says {want['bytes']}. "
                f"{_REBUILD}"
            )
            ok = False
            continue
        digest = cfs.sha256_file(fpath) if cfs.is_local(fs) else cfs.sha256_remote(fs, fpath)
        if digest != want["sha256"]:
            report.fail(
                f"shard {sid}: file {rel}/{name} is corrupted: sha256 {digest[:16]}... != manifest "
                f"{want['sha256'][:16]}... (same size). {_REBUILD}"
            )
            ok = False
    if ok and check_schema:
        try:
            _check_shard_schema(cfs.join(path, rel), entry, manifest)
        except CacheError as e:
            report.fail(f"shard {sid}: {e}")
            ok = False
    return ok


def _check_shard_schema(shard_url: str, entry: dict[str, Any], manifest: dict[str, Any]) -> None:
    inputs = manifest["key_inputs"]
    teacher = manifest["teacher"]
    with_resp = inputs["stored_fields"]["teacher_responses"]["mode"] != "none"
    index = read_index(shard_url)
    schema.check_index_schema(index.schema, with_resp, f"{entry['path']}/{schema.INDEX_FILE}")
    num_tokens = np.asarray(index.column("num_tokens").to_pylist(), dtype=np.int64)
    offsets = np.asarray(index.column("token_offset").to_pylist(), dtype=np.int64)
    if index.num_rows != entry["num_rows"] or int(num_tokens.sum()) != entry["num_tokens"]:
        raise CacheError(
            f"index has {index.num_rows} rows / {int(num_tokens.sum())} tokens, manifest says "
            f"{entry['num_rows']} / {entry['num_tokens']}. {_REBUILD}"
        )
    if len(offsets) and not np.array_equal(offsets, np.concatenate([[0], np.cumsum(num_tokens)[:-1]])):
        raise CacheError(f"index token_offset column is not the running sum of num_tokens. {_REBUILD}")
    group = open_arrays(shard_url)
    attrs = dict(group.attrs)
    schema.validate_group_attributes(attrs, f"{entry['path']}/{schema.ARRAYS_DIR}/zarr.json")
    dims = {
        "tokens": entry["num_tokens"],
        "k": inputs["logit_sparsification"]["k"],
        "P": len(inputs["cached_layers"]),
        "W": inputs["width"],
        "D": teacher["hidden_size"],
    }
    version = schema.version_of(manifest)
    states = StatesCodec.from_key_inputs(inputs.get("states_codec"), inputs["dtypes"]["expert_states"])
    stored = inputs["stored_fields"]["expert_states"]
    if version > 1:
        _check_codec_attributes(attrs, states, index, entry, group)
        dims.update(S=states.row_length(dims["D"]), state_tokens=int(attrs["num_state_tokens"]))
    for name in schema.array_names(stored, version, states.scaled, states.subsampled):
        if name not in group:
            raise CacheError(f"zarr array {name} is missing. {_REBUILD}")
        arr = group[name]
        shape, chunks, shards = schema.shapes(name, dims, version)
        attributes = schema.array_attributes(name, states.codec, version, states.rank)
        want = {
            "dtype": np.dtype(schema.storage_dtype(name, states.codec, version)),
            "shape": shape,
            "chunks": chunks,
            "shards": shards,
            "dimension_names": tuple(schema.array_fields(version)[name]["dimension_names"]),
            **attributes,
        }
        got = {
            "dtype": np.dtype(str(arr.dtype)),
            "shape": tuple(arr.shape),
            "chunks": tuple(arr.chunks),
            "shards": tuple(arr.shards) if arr.shards else None,
            "dimension_names": tuple(arr.metadata.dimension_names or ()),
            **{a: arr.attrs.get(a) for a in attributes},
        }
        for what in want:
            if want[what] != got[what]:
                raise CacheError(
                    f"zarr array {name} has {what} {got[what]}, schema v{version} says "
                    f"{want[what]}. {_REBUILD}"
                )


def _check_codec_attributes(
    attrs: dict[str, Any], states: StatesCodec, index: Any, entry: dict[str, Any], group: Any
) -> None:
    """A schema-2 shard's codec attributes match the key, and its kept rows are the ones the hash selects
    (pipeline.cache.format.codecs.keep_rows: what a resumed build and every reader recompute)."""
    want = {"states_codec": states.codec, "states_rank": states.rank, "states_seed": states.seed}
    want["states_token_fraction"] = float(states.token_fraction)
    for k, v in want.items():
        if attrs.get(k) != v:
            raise CacheError(
                f"zarr group attribute {k} is {attrs.get(k)!r}, the cache key says {v!r}. {_REBUILD}"
            )
    if not states.subsampled:
        if attrs["num_state_tokens"] != entry["num_tokens"]:
            raise CacheError(
                f"{attrs['num_state_tokens']} expert-state rows for {entry['num_tokens']} tokens. {_REBUILD}"
            )
        return
    seq_ids = [int(x) for x in index.column("seq_id").to_pylist()]
    counts = [int(x) for x in index.column("num_tokens").to_pylist()]
    kept = np.flatnonzero(keep_rows(seq_ids, counts, states.seed, states.token_fraction))
    rows = group["expert_state_rows"][:] if "expert_state_rows" in group else None
    if rows is None or not np.array_equal(rows, kept):
        raise CacheError(
            f"zarr array expert_state_rows does not hold the {len(kept)} rows the token subsampling keeps "
            f"(states_token_fraction {states.token_fraction}, seed {states.seed}). {_REBUILD}"
        )


def format_verify_report(report: VerifyReport) -> str:
    head = "OK" if report.ok else "FAILED"
    lines = [
        f"{head}: teacher cache {cfs.redact(report.path)}",
        f"  key {report.key}  schema v{report.schema_version}  complete={report.complete}",
        f"  shards ok {report.num_shards_ok}/{report.num_shards}  files checked {report.num_files}  bytes "
        f"{human_bytes(report.num_bytes)}",
    ]
    lines += [f"  - {p}" for p in report.problems]
    return "\n".join(lines)
