"""What a teacher cache costs to store, per distillation token and projected to N tokens, against a naive
dense fp32 cache of the same teacher.

Two sources:
  * a built store (`measure_store`): on-disk bytes are the sizes of the files actually in the directory
    (every file, so the total equals the directory's size), logical bytes are the uncompressed array sizes;
  * a config alone (`project_from_config`): no model is loaded; teacher dimensions come from the teacher's
    config.json (local path), the table of known hub architectures below, or the local Hugging Face cache.
    Only logical sizes are known before a build (compression needs data), so on-disk = logical there.

Fields: logits (top-k/sampled indices int32 + log-probs fp16 + tail log-mass fp32), gates (fp16 [P, W]),
expert_states (fp16/bf16 [P, W, D]), index (the Parquet sequence index), metadata (manifest.json, shard
commit markers, zarr.json), other (anything else in the directory, e.g. leftovers of killed writes).
The naive dense baseline per token: full-vocabulary fp32 logits (V x 4 B), fp32 gates and fp32 expert
states of every teacher layer and expert (L_T x E_T x 4 B and L_T x E_T x D x 4 B), plus the same index.
Costs use GB = 2^30 bytes, the unit object stores bill in.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage as cfs
from pipeline.cache.format.codecs import StatesCodec
from pipeline.errors import CacheError, ConfigError
from pipeline.models.dims import ModelDims, model_dims, read_dims
from pipeline.plotting import pyplot
from pipeline.storage import human_bytes

GIB = 2**30
DEFAULT_PROJECTED_TOKENS = 1e9
# fidelity: the held-out sample of `report states-fidelity` (pipeline/cache/build/fidelity.py): once per
# cache, never read by training
FIELDS = ("logits", "gates", "expert_states", "index", "metadata", "fidelity", "other")
_ARRAY_FIELD = {
    "logit_indices": "logits",
    "logit_values": "logits",
    "logit_tail_logmass": "logits",
    "gates": "gates",
    "expert_states": "expert_states",
    "expert_state_scales": "expert_states",  # schema 2: fp8/int8 per-row scales
    "expert_state_rows": "expert_states",  # schema 2: rows kept by token subsampling
}


def _dense(model_type: str, num_layers: int, hidden_size: int, vocab_size: int) -> ModelDims:
    return ModelDims(model_type, num_layers, None, hidden_size, vocab_size)


# Dense hub models the presets upcycle (transformers config.json values), so a projection needs no download.
KNOWN_ARCHITECTURES: dict[str, ModelDims] = {
    "qwen3-4b": _dense("qwen3", num_layers=36, hidden_size=2560, vocab_size=151936),
    "qwen3-0.6b": _dense("qwen3", num_layers=28, hidden_size=1024, vocab_size=151936),
    "llama-3.1-8b": _dense("llama", num_layers=32, hidden_size=4096, vocab_size=128256),
    "llama-3.2-1b": _dense("llama", num_layers=16, hidden_size=2048, vocab_size=128256),
}


@dataclass
class FieldBytes:
    name: str
    logical_per_token: float
    disk_per_token: float
    dense_fp32_per_token: float  # the naive baseline; 0 where it has no counterpart
    disk_bytes: int | None = None  # measured stores: bytes of this field's files on disk

    @property
    def compression(self) -> float:
        return self.logical_per_token / self.disk_per_token if self.disk_per_token else float("nan")


@dataclass
class StorageReport:
    source: str
    measured: bool  # a built store (True) or a projection from a config (False)
    dims: dict[str, Any]  # teacher / cache dimensions shown in the header
    fields: list[FieldBytes]
    num_tokens: int = 0  # distillation tokens in the store
    num_sequences: int = 0
    total_disk_bytes: int | None = None  # measured: every file under the store directory
    projected_tokens: float = DEFAULT_PROJECTED_TOKENS
    usd_per_gb_month: float = 0.023
    notes: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # markdown appended to the report (states fidelity)

    def field_bytes(self, name: str) -> FieldBytes:
        return next(f for f in self.fields if f.name == name)

    @property
    def logical_per_token(self) -> float:
        return sum(f.logical_per_token for f in self.fields)

    @property
    def disk_per_token(self) -> float:
        return sum(f.disk_per_token for f in self.fields)

    @property
    def dense_fp32_per_token(self) -> float:
        return sum(f.dense_fp32_per_token for f in self.fields)

    def projected_bytes(self, per_token: float) -> float:
        return per_token * self.projected_tokens

    def monthly_usd(self, per_token: float) -> float:
        return self.projected_bytes(per_token) / GIB * self.usd_per_gb_month


# --- measuring a store --------------------------------------------------------------------------------------
def measure_store(
    path: str, projected_tokens: float | None = None, usd_per_gb_month: float = 0.023
) -> StorageReport:
    """Bytes on disk by field (walking every file under `path`) and logical bytes from the cache's dims."""
    # The store's readers pull pyarrow and torch, which a projection from a config never needs.
    from pipeline.cache.format.manifest import read_manifest
    from pipeline.cache.format.shard import committed_shards, read_index
    from pipeline.cache.read.listing import bytes_by_field

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
    dense = _dense_fp32(teacher, index_per_token=disk["index"] / tokens)  # it needs the same index
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
        from pipeline.reports.fidelity import format_fidelity, states_fidelity  # why: torch and the losses

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
    if rel == "manifest.json":
        return "metadata"
    if parts[0] == "state_basis":
        return "expert_states"  # the low-rank basis (one per cache) is what the coefficients need
    if parts[0] == "fidelity":
        return "fidelity"
    if len(parts) < 3 or parts[0] != "shards" or not parts[1].startswith("shard-"):
        return "other"  # includes staging directories shards/.tmp-*
    if parts[2:] == ["_SHARD.json"]:
        return "metadata"
    if parts[2:] == ["index.parquet"]:
        return "index"
    if parts[2] == "arrays.zarr":
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


def config_states_codec(cache: Any) -> StatesCodec:
    """The states codec a config's cache section asks for (states_codec null = states_dtype)."""
    return StatesCodec(
        codec=cache.states_codec or cache.states_dtype,
        rank=cache.states_rank,
        basis_tokens=cache.states_basis_tokens,
        token_fraction=cache.states_token_fraction,
    )


def describe_states(codec: StatesCodec, mass: float = 1.0) -> str:
    """'fp8 rank 32, 50% of tokens, top 99% of group mass' -- the states as the report header names them."""
    text = codec.codec + (f" rank {codec.rank}" if codec.rank is not None else "")
    text += f", {codec.token_fraction:.0%} of tokens" if codec.subsampled else ""
    return text + (f", top {mass:.4g} of group mass" if mass != 1.0 else "")


def kept_mass_note(totals: dict[str, Any]) -> list[str]:
    """The storage report's line on a mass-truncated cache (manifest totals.states_mass), else nothing."""
    kept = totals.get("states_mass")
    if kept is None:
        return []
    return [
        f"expert states mass-truncated at m = {kept['target']}: per token and group only the experts "
        f"carrying the top m of its router mass were computed; router mass kept {kept['kept_mean']:.4f} "
        f"on average, {kept['kept_min']:.4f} at least, over {kept['rows']} (token, layer) rows; "
        "`moedistill report states-fidelity` gives its MC-loss error and gradient cosine against exact states"
    ]


def _dense_fp32(teacher: dict[str, Any], index_per_token: float) -> dict[str, float]:
    layers, experts, hidden = teacher["num_layers"], teacher["num_experts"], teacher["hidden_size"]
    return {
        "logits": teacher["vocab_size"] * 4.0,
        "gates": layers * experts * 4.0,
        "expert_states": layers * experts * hidden * 4.0,
        "index": index_per_token,
    }


# --- projecting from a config -------------------------------------------------------------------------------
def project_from_config(
    config: Any, projected_tokens: float | None = None, usd_per_gb_month: float = 0.023, source: str = ""
) -> StorageReport:
    """Bytes per token of the cache `config` would build, from dimensions alone (no model is loaded)."""
    from pipeline.models.alignment import layer_pairs  # imports torch, which measure_store never needs

    t = config.teacher
    vocab = _tokenizer_vocab(config) if t.build is not None else None  # a built model's logits: its tokenizer
    arch = model_dims(t, vocab, read=functools.partial(resolve_architecture, role="teacher"))
    experts = arch.num_experts or t.num_experts  # a checkpoint without an expert count: the config's
    model_type = arch.model_type
    if t.build is not None:
        model_type += " (built)"
    elif t.upcycle_from is not None:
        model_type += f" upcycled to {experts} experts"
    layers_cfg = config.cache.layers
    if layers_cfg == "all":
        cached = arch.num_layers
    elif layers_cfg == "paired":
        student_layers = _student_layers(config)
        cached = len({tl for _, tl in layer_pairs(arch.num_layers, student_layers)})
    else:
        cached = len(layers_cfg)
    width = config.cache.width or experts
    k = config.cache.logits_k
    # Index estimate: sequences of max_length tokens, half of them response (input_ids int32 + mask int8 per
    # token, 20 B of per-sequence columns, Arrow list offsets).
    seq = config.data.max_length
    index = (seq * 5 + 20 + 8) / (seq / 2)
    codec = config_states_codec(config.cache)
    logical = {
        "logits": k * (4 + 2) + 4.0,
        "gates": cached * width * 2.0,
        "expert_states": (
            codec.stored_bytes_per_token(cached, width, arch.hidden_size)
            if config.cache.store_expert_states
            else 0.0
        ),
        "index": index,
    }
    dense = _dense_fp32(
        {"num_layers": arch.num_layers, "num_experts": experts, "hidden_size": arch.hidden_size,
         "vocab_size": arch.vocab_size},
        index_per_token=index,
    )  # fmt: skip
    fields = [FieldBytes(n, v, v, dense[n]) for n, v in logical.items()]
    dims = {
        "teacher": t.path or t.upcycle_from or "built from config",
        "model_type": model_type,
        "num_layers": arch.num_layers,
        "num_experts": experts,
        "hidden_size": arch.hidden_size,
        "vocab_size": arch.vocab_size,
        "cached_layers": cached,
        "width": width,
        "logits": f"{config.cache.logits_mode}-{k}",
        "states": describe_states(codec, config.cache.states_mass)
        if config.cache.store_expert_states
        else "not stored",
    }
    notes = [
        "projection from the config alone: uncompressed sizes (compression needs data; a built store's "
        "report shows the measured ratio)",
        f"index estimated for {seq}-token sequences with half of the tokens in the response",
    ]
    if codec.rank is not None and config.cache.store_expert_states:
        basis = cached * width * arch.hidden_size * (codec.rank + 1) * 4
        notes.append(
            f"plus the rank-{codec.rank} state basis, once per cache: {human_bytes(basis)} (not per token); "
            "what low rank and fp8/int8 cost the student (MC-loss error, gradient cosine) is measured on the "
            "demo teacher by jobs/benchmarks/bench_state_codecs.py, not for this model"
        )
    return StorageReport(
        source=source or f"config {config.name}",
        measured=False,
        dims=dims,
        fields=fields,
        projected_tokens=DEFAULT_PROJECTED_TOKENS if projected_tokens is None else float(projected_tokens),
        usd_per_gb_month=usd_per_gb_month,
        notes=notes,
    )


def normalize_model_name(name: str) -> str:
    """'meta-llama/Llama-3.1-8B-Instruct' -> 'llama-3.1-8b', 'Qwen/Qwen3-4B-Base' -> 'qwen3-4b'."""
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    base = re.sub(r"^meta-", "", base)
    base = re.sub(r"^llama-?(\d)", r"llama-\1", base)
    return re.sub(r"(-(instruct|base|hf|chat|moe))+$", "", base)


def resolve_architecture(name: str, role: str = "teacher") -> ModelDims:
    """Dimensions from a local config.json, the known-architecture table or the local Hugging Face cache --
    never a download, never the weights."""
    if (Path(name).expanduser() / "config.json").is_file():
        return read_dims(name, role=role)
    known = KNOWN_ARCHITECTURES.get(normalize_model_name(name))
    if known is not None:
        return known
    try:
        return read_dims(name, role=role, local_files_only=True)
    except ConfigError:
        raise ConfigError(
            f"unknown {role} {name!r}: its dimensions are not in the table of known architectures "
            f"({', '.join(sorted(KNOWN_ARCHITECTURES))}) nor in the local Hugging Face cache. Fix: give a "
            f"local path (a directory with the model's config.json) as {role}.path / {role}.upcycle_from, "
            "or report on a built store instead."
        ) from None


def _student_layers(config: Any) -> int:
    return model_dims(config.student, read=functools.partial(resolve_architecture, role="student")).num_layers


def _tokenizer_vocab(config: Any) -> int:
    path = config.tokenizer.path
    if path is None:
        return config.tokenizer.vocab_size  # the demo tokenizer is trained to this size
    local = Path(path).expanduser()
    if (local / "tokenizer.json").is_file():
        tok = json.loads((local / "tokenizer.json").read_text())
        return len(tok["model"]["vocab"]) + len(tok.get("added_tokens", []))
    vocab = resolve_architecture(path, role="tokenizer").vocab_size
    assert vocab is not None  # a checkpoint's config always has one
    return vocab


# --- rendering ----------------------------------------------------------------------------------------------
def format_storage_report(report: StorageReport) -> str:
    d = report.dims
    kind = "measured store" if report.measured else "projection"
    lines = [
        f"# Teacher cache storage ({kind}): {report.source}",
        "",
        f"Teacher {d['teacher']} ({d['model_type']}): {d['num_layers']} layers x {d['num_experts']} experts, "
        f"hidden {d['hidden_size']}, vocab {d['vocab_size']}. Cached: {d['cached_layers']} layers at width "
        f"{d['width']}, logits {d['logits']}, expert states {d['states']}.",
    ]
    if report.measured:
        lines.append(
            f"Store: {report.num_sequences} sequences, {report.num_tokens} distillation tokens, "
            f"{report.total_disk_bytes} bytes on disk ({human_bytes(report.total_disk_bytes or 0)}; every "
            "file under the directory)."
        )
    lines += [
        "",
        "| field | logical B/token | on disk B/token | compression | dense fp32 B/token | dense / cache |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for f in report.fields:
        ratio = (
            f.dense_fp32_per_token / f.disk_per_token if f.disk_per_token and f.dense_fp32_per_token else None
        )
        lines.append(
            f"| {f.name} | {f.logical_per_token:,.1f} | {f.disk_per_token:,.1f} | "
            f"{_ratio(f.compression)} | {_num(f.dense_fp32_per_token)} | {_ratio(ratio)} |"
        )
    total_ratio = report.dense_fp32_per_token / report.disk_per_token
    lines.append(
        f"| **total** | {report.logical_per_token:,.1f} | {report.disk_per_token:,.1f} | "
        f"{_ratio(report.logical_per_token / report.disk_per_token)} | {report.dense_fp32_per_token:,.1f} | "
        f"{_ratio(total_ratio)} |"
    )
    n = report.projected_tokens
    lines += [
        "",
        f"Projected for {n:,.0f} distillation tokens at ${report.usd_per_gb_month:g} per GB-month "
        "(GB = 2^30 B):",
        "",
        "| | size | USD / month |",
        "|---|---:|---:|",
    ]
    rows = [
        ("this cache (on disk)", report.disk_per_token),
        ("dense fp32 cache", report.dense_fp32_per_token),
    ]
    if not report.measured:
        rows[0] = ("this cache (uncompressed)", report.disk_per_token)
    for label, per_token in rows:
        lines.append(
            f"| {label} | {human_bytes(report.projected_bytes(per_token))} | "
            f"{report.monthly_usd(per_token):,.2f} |"
        )
    if report.notes:
        lines += ["", *[f"- {note}" for note in report.notes]]
    for section in report.sections:
        lines += ["", section]
    return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    return f"{x:,.1f}" if x else "–"


def _ratio(x: float | None) -> str:
    return "–" if x is None or x != x or math.isinf(x) else f"{x:.2f}x"


def plot_storage(report: StorageReport, png_path: str | Path) -> Path:
    """Grouped horizontal bars per field (log scale): logical, on disk and the dense fp32 baseline."""
    plt = pyplot()
    fields = [f for f in report.fields if f.logical_per_token or f.disk_per_token or f.dense_fp32_per_token]
    names = [*(f.name for f in fields), "total"]
    logical = [f.logical_per_token for f in fields] + [report.logical_per_token]
    disk = [f.disk_per_token for f in fields] + [report.disk_per_token]
    dense = [f.dense_fp32_per_token for f in fields] + [report.dense_fp32_per_token]
    series = [
        ("logical (uncompressed)", logical, "#9ecae1"),
        ("on disk" if report.measured else "on disk (= logical, projected)", disk, "#3182bd"),
        ("naive dense fp32", dense, "#e6550d"),
    ]
    fig, ax = plt.subplots(figsize=(8.5, 1.6 + 0.75 * len(names)))
    height = 0.26
    for i, (label, values, color) in enumerate(series):
        ys = [j + (i - 1) * height for j in range(len(names))]
        bars = ax.barh(
            ys, [max(v, 1e-3) if v else 0 for v in values], height * 0.95, label=label, color=color
        )
        ax.bar_label(bars, labels=[human_bytes(v) if v else "" for v in values], fontsize=7, padding=2)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("bytes per distillation token (log scale)")
    top = max(max(v for _, vals, _ in series for v in vals), 10)
    ax.set_xlim(1, top * 40)
    cache, dense_fp32 = report.disk_per_token, report.dense_fp32_per_token
    ax.set_title(
        f"Teacher cache storage per token — {report.dims['teacher']}\n"
        f"{report.projected_tokens:,.0f} tokens: {human_bytes(report.projected_bytes(cache))} "
        f"(USD {report.monthly_usd(cache):,.0f}/month) vs dense fp32 "
        f"{human_bytes(report.projected_bytes(dense_fp32))} "
        f"(USD {report.monthly_usd(dense_fp32):,.0f}/month)",
        fontsize=9,
    )
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=130)
    plt.close(fig)
    return png_path


def write_storage_report(
    report: StorageReport, out_dir: str | Path, stem: str = "storage"
) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}.md"
    md.write_text(format_storage_report(report))
    return md, plot_storage(report, out_dir / f"{stem}.png")
