"""The storage report of a built store: bytes on disk by field (every file under the directory) and logical
bytes from the cache's dimensions; with the store's held-out fidelity sample, its states-fidelity section
(pipeline/reports/fidelity.py) too. The report itself: pipeline/reports/storage.py."""

from __future__ import annotations

from typing import Any

from pipeline import storage as cfs
from pipeline.cache.format import schema
from pipeline.cache.format.codecs import StatesCodec
from pipeline.cache.format.manifest import read_manifest
from pipeline.cache.format.shard import committed_shards, read_index
from pipeline.cache.format.side_files import BASIS_DIR, FIDELITY_DIR
from pipeline.cache.read.listing import bytes_by_field
from pipeline.errors import CacheError
from pipeline.reports.fidelity import format_fidelity, states_fidelity
from pipeline.reports.storage import (
    DEFAULT_PROJECTED_TOKENS,
    FIELDS,
    FieldBytes,
    StorageReport,
    dense_fp32,
    describe_states,
    kept_mass_note,
)

# The report field of each zarr array of a shard, from the storage schema (its newest version lists them all).
_ARRAY_FIELD = {name: spec["field"] for name, spec in schema.array_fields(schema.SCHEMA_VERSION).items()}


def measure_store(
    path: str, projected_tokens: float | None = None, usd_per_gb_month: float = 0.023
) -> StorageReport:
    """Bytes on disk by field (walking every file under `path`) and logical bytes from the cache's dims."""
    manifest = read_manifest(path)
    if manifest is None:
        raise CacheError(
            f"{path} has no manifest.json: not a teacher cache. Fix: pass a cache directory "
            "(`moedistill cache ls ROOT` lists them), or --config CONFIG to project from a config."
        )
    notes: list[str] = []
    shards = manifest["shards"]
    if not manifest["complete"]:
        shards = [c for _, c in sorted(committed_shards(path).items())]
        notes.append(
            f"partial store: {len(shards)} of {manifest['layout']['num_shards']} shards committed; "
            "figures cover the committed shards"
        )
    tokens = sum(int(s["num_tokens"]) for s in shards)
    if tokens == 0:
        raise CacheError(
            f"{path} holds no committed distillation tokens yet. Fix: build (or resume) it first."
        )
    fs, root = cfs.get_fs(path)
    disk = dict.fromkeys(FIELDS, 0)
    for file_path, info in fs.find(root, detail=True).items():
        rel = file_path[len(root) :].lstrip("/") if file_path.startswith(root) else file_path
        disk[_classify(rel)] += int(info["size"])
    index_logical = sum(read_index(cfs.join(path, s["path"])).nbytes for s in shards)

    inputs, teacher = manifest["key_inputs"], manifest["teacher"]
    k = int(inputs["logit_sparsification"]["k"])
    p, w, d = len(inputs["cached_layers"]), int(inputs["width"]), int(teacher["hidden_size"])
    states = bool(inputs["stored_fields"]["expert_states"])
    codec = StatesCodec.from_key_inputs(inputs.get("states_codec"), inputs["dtypes"]["expert_states"])
    logical = {
        "logits": k * (4 + 2) + 4,
        "gates": p * w * 2,
        "expert_states": codec.stored_bytes_per_token(p, w, d) if states else 0,
        "index": index_logical / tokens,
        "metadata": disk["metadata"] / tokens,  # JSON text: stored as is
        "other": disk["other"] / tokens,
    }
    dense = dense_fp32(teacher, index_per_token=disk["index"] / tokens)  # it needs the same index
    logical["fidelity"] = disk["fidelity"] / tokens  # .npy files: stored uncompressed
    fields = [
        FieldBytes(n, logical[n], disk[n] / tokens, dense.get(n, 0.0), disk[n])
        for n in FIELDS
        if disk[n] or n not in ("fidelity", "other")
    ]
    notes += kept_mass_note(manifest["totals"])
    sample = manifest.get("states_fidelity")
    if sample is not None:
        notes.append(
            f"fidelity: the held-out fidelity sample ({sample['num_tokens']} validation tokens, exact fp32 "
            f"states and their encoded rows; {disk['fidelity']} bytes once per cache, never trained on)"
        )
    if disk["other"]:
        notes.append(
            f"{disk['other']} bytes in files that are not part of the cache layout (e.g. leftovers of killed "
            "writes: the next `moedistill cache` run removes shards/.tmp-*)"
        )
    basis = manifest.get("state_basis")
    if basis is not None:
        basis_bytes = sum(int(f["bytes"]) for f in basis["files"].values())
        notes.append(
            f"expert_states on disk include the rank-{basis['rank']} state basis ({basis_bytes} bytes, once "
            "per cache: its share per token shrinks as the cache grows)"
        )
        disk_basis = basis_bytes
    else:
        disk_basis = 0
    recorded = bytes_by_field(manifest) if manifest["complete"] else {}
    for name in ("logits", "gates", "expert_states", "index"):
        want = sum(v for a, v in recorded.items() if _ARRAY_FIELD.get(a, a) == name)
        want += disk_basis if name == "expert_states" else 0
        if recorded and want != disk[name]:
            notes.append(
                f"{name}: {disk[name]} bytes on disk but the manifest records {want}: the store was "
                f"modified. Fix: run `moedistill cache verify {path}`"
            )
    sections = []
    if sample is not None and manifest["complete"]:  # the stored sample makes it cheap: no teacher runs
        sections.append(format_fidelity(states_fidelity(path, source="stored"), level=2))
    return StorageReport(
        source=path,
        measured=True,
        sections=sections,
        dims=_dims_from_manifest(manifest),
        fields=fields,
        num_tokens=tokens,
        num_sequences=sum(int(s["num_rows"]) for s in shards),
        total_disk_bytes=sum(disk.values()),
        projected_tokens=DEFAULT_PROJECTED_TOKENS if projected_tokens is None else float(projected_tokens),
        usd_per_gb_month=usd_per_gb_month,
        notes=notes,
    )


def _classify(rel: str) -> str:
    """Field of a file, by its path relative to the store root (layout: storage_schemas/teacher_cache.v1)."""
    parts = rel.split("/")
    if rel == schema.MANIFEST:
        return "metadata"
    if parts[0] == BASIS_DIR:
        return "expert_states"  # the low-rank basis (one per cache) is what the coefficients need
    if parts[0] == FIDELITY_DIR:
        return "fidelity"
    if len(parts) < 3 or parts[0] != schema.SHARDS_DIR or not parts[1].startswith("shard-"):
        return "other"  # includes staging directories shards/.tmp-*
    if parts[2:] == [schema.COMMIT_MARKER]:
        return "metadata"
    if parts[2:] == [schema.INDEX_FILE]:
        return "index"
    if parts[2] == schema.ARRAYS_DIR:
        if parts[-1] == "zarr.json":
            return "metadata"
        if len(parts) >= 5 and parts[3] in _ARRAY_FIELD:
            return _ARRAY_FIELD[parts[3]]
    return "other"


def _dims_from_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    inputs, teacher = manifest["key_inputs"], manifest["teacher"]
    return {
        "teacher": manifest.get("sources", {}).get("teacher_path", "?"),
        "model_type": teacher["model_type"],
        "num_layers": teacher["num_layers"],
        "num_experts": teacher["num_experts"],
        "hidden_size": teacher["hidden_size"],
        "vocab_size": teacher["vocab_size"],
        "cached_layers": len(inputs["cached_layers"]),
        "width": inputs["width"],
        "logits": f"{inputs['logit_sparsification']['mode']}-{inputs['logit_sparsification']['k']}",
        "states": describe_states(
            StatesCodec.from_key_inputs(inputs.get("states_codec"), inputs["dtypes"]["expert_states"]),
            float(inputs.get("states_mass", 1.0)),
        )
        if inputs["stored_fields"]["expert_states"]
        else "not stored",
        "key": manifest["key"],
    }
