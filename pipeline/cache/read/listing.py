"""What a cache root and a store hold, from their manifests alone (no shard data read): list_caches (the data
behind `moedistill cache ls`) and the stored bytes by field (bytes_by_field, bytes_per_token_by_field: the
storage report's accounting). format_cache_list turns a listing into text for the CLI."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from pipeline import storage as cfs
from pipeline.cache.format import schema
from pipeline.cache.format.manifest import read_manifest
from pipeline.cache.format.shard import committed_shards
from pipeline.errors import CacheError
from pipeline.storage import human_bytes


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
