"""verify_cache / list_caches / bytes_per_token_by_field: the data behind `moedistill cache verify|ls` and the
storage report. Functions return data; format_* turn it into text for the CLI."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import storage as cfs
from pipeline.cache.build.basis import basis_problems
from pipeline.cache.build.fidelity import FIDELITY_FIX, fidelity_problems
from pipeline.cache.format import schema
from pipeline.cache.format.codecs import StatesCodec, keep_rows
from pipeline.cache.format.manifest import read_manifest
from pipeline.cache.format.shard import committed_shards, open_arrays, read_commit, read_index
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
        report.fail(
            f"{problem}. Fix: delete the cache directory and rerun `moedistill cache --config ...` (its "
            "shards were encoded with that basis, so they cannot be kept without it)."
        )
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


# --- ls -----------------------------------------------------------------------------------------------------
@dataclass
class CacheSummary:
    path: str
    key: str
    complete: bool
    num_shards: int
    num_shards_committed: int
    num_sequences: int
    num_tokens: int
    num_bytes: int
    key_inputs: dict[str, Any]
    teacher: dict[str, Any]
    sources: dict[str, Any]
    error: str | None = None


def list_caches(root: str) -> list[CacheSummary]:
    """Every cache directory directly under `root` (complete or not), sorted by key."""
    fs, base = cfs.get_fs(root)
    if not fs.exists(base):
        raise CacheError(f"cache root {root} does not exist. Fix: check the path (cache.root in the config).")
    out = []
    for entry in sorted(fs.ls(base, detail=False)):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        url = cfs.join(root, name)
        if not fs.isdir(entry) or not fs.exists(cfs.join(entry, schema.MANIFEST)):
            continue
        try:
            m = read_manifest(url)
        except CacheError as e:
            out.append(CacheSummary(url, name, False, 0, 0, 0, 0, 0, {}, {}, {}, error=str(e)))
            continue
        assert m is not None
        committed = len(m["shards"]) if m["complete"] else len(committed_shards(url))
        t = m["totals"]
        if not m["complete"]:  # totals are only final in a complete manifest: sum what is committed
            commits = committed_shards(url).values()
            t = {
                "num_sequences": sum(c["num_rows"] for c in commits),
                "num_tokens": sum(c["num_tokens"] for c in commits),
                "num_bytes": sum(c["num_bytes"] for c in commits),
            }
        out.append(
            CacheSummary(
                path=url,
                key=m["key"],
                complete=m["complete"],
                num_shards=m["layout"]["num_shards"],
                num_shards_committed=committed,
                num_sequences=t["num_sequences"],
                num_tokens=t["num_tokens"],
                num_bytes=t["num_bytes"],
                key_inputs=m["key_inputs"],
                teacher=m["teacher"],
                sources=m.get("sources", {}),
            )
        )
    return out


def format_cache_list(summaries: list[CacheSummary]) -> str:
    if not summaries:
        return "no teacher caches"
    lines = [f"{'KEY':<21}{'STATUS':<16}{'SEQS':>8}{'TOKENS':>11}{'SIZE':>10}  CONTENT"]
    for s in summaries:
        if s.error:
            lines.append(f"{s.key:<21}{'unreadable':<16}  {s.error}")
            continue
        status = "complete" if s.complete else f"partial {s.num_shards_committed}/{s.num_shards}"
        ki = s.key_inputs
        logits = ki["logit_sparsification"]
        states = ki["dtypes"]["expert_states"] or "no states"
        content = (
            f"teacher={s.sources.get('teacher_path', '?')} ({s.teacher.get('model_type')}, weights "
            f"{ki['teacher_weights_digest'][:8]}) data={ki['dataset_fingerprint'][:8]} "
            f"layers={ki['cached_layers']} W={ki['width']} logits={logits['mode']}{logits['k']} "
            f"states={states} max_len={ki['max_length']}"
        )
        if ki["stored_fields"]["teacher_responses"]["mode"] != "none":
            content += f" responses={ki['stored_fields']['teacher_responses']['mode']}"
        lines.append(
            f"{s.key:<21}{status:<16}{s.num_sequences:>8}{s.num_tokens:>11}{human_bytes(s.num_bytes):>10}  "
            f"{content}"
        )
    return "\n".join(lines)


# --- storage accounting -------------------------------------------------------------------------------------
def bytes_by_field(manifest: dict[str, Any]) -> dict[str, int]:
    """Stored bytes per array (logit_indices, ..., expert_states), 'index' (Parquet), 'metadata' (json)."""
    out: dict[str, int] = defaultdict(int)
    prefix = schema.ARRAYS_DIR + "/"
    for shard in manifest["shards"]:
        for name, f in shard["files"].items():
            if name == schema.INDEX_FILE:
                out["index"] += f["bytes"]
            elif name.startswith(prefix) and name.count("/") >= 2 and not name.endswith("zarr.json"):
                out[name[len(prefix) :].split("/", 1)[0]] += f["bytes"]
            else:
                out["metadata"] += f["bytes"]
    return dict(out)


def bytes_per_token_by_field(path: str) -> dict[str, float]:
    """Stored bytes per cached (distillation) token, by array plus 'logits' (the three logit arrays together),
    'index', 'metadata' and 'total'. Computed from the manifest's file sizes, no data read."""
    manifest = read_manifest(path)
    if manifest is None or not manifest["complete"]:
        raise CacheError(f"{path} is not a complete teacher cache. Fix: build it (or rerun to resume) first.")
    tokens = max(int(manifest["totals"]["num_tokens"]), 1)
    by = bytes_by_field(manifest)
    out = {name: b / tokens for name, b in sorted(by.items())}
    out["logits"] = sum(by.get(n, 0) for n in schema.arrays_for_field("logits")) / tokens
    out["total"] = sum(by.values()) / tokens
    return out
