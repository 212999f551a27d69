"""What a teacher cache costs to store, per distillation token and projected to N tokens, against a naive
dense fp32 cache of the same teacher: the report, its fields and the dense baseline, and its rendering
(markdown, a bar chart).

Two sources fill it:
  * a built store (pipeline/reports/storage_measure.py): on-disk bytes are the sizes of the files actually in
    the directory (every file, so the total equals the directory's size), logical bytes are the uncompressed
    array sizes;
  * a config alone (pipeline/reports/storage_projection.py): no model is loaded; only logical sizes are known
    before a build (compression needs data), so on-disk = logical there.

Fields: logits (top-k/sampled indices int32 + log-probs fp16 + tail log-mass fp32), gates (fp16 [P, W]),
expert_states (fp16/bf16 [P, W, D]), index (the Parquet sequence index), metadata (manifest.json, shard
commit markers, zarr.json), other (anything else in the directory, e.g. leftovers of killed writes).
The naive dense baseline per token: full-vocabulary fp32 logits (V x 4 B), fp32 gates and fp32 expert
states of every teacher layer and expert (L_T x E_T x 4 B and L_T x E_T x D x 4 B), plus the same index.
Costs use GB = 2^30 bytes, the unit object stores bill in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cache.format.codecs import StatesCodec
from pipeline.plotting import pyplot
from pipeline.storage import human_bytes

GIB = 2**30
DEFAULT_PROJECTED_TOKENS = 1e9
# fidelity: the held-out sample of `report states-fidelity` (pipeline/cache/build/fidelity.py): once per
# cache, never read by training
FIELDS = ("logits", "gates", "expert_states", "index", "metadata", "fidelity", "other")


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


# --- shared by both sources ---------------------------------------------------------------------------------
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


def dense_fp32(teacher: dict[str, Any], index_per_token: float) -> dict[str, float]:
    """The naive dense fp32 cache's bytes per token by field (the module docstring), with the same index."""
    layers, experts, hidden = teacher["num_layers"], teacher["num_experts"], teacher["hidden_size"]
    return {
        "logits": teacher["vocab_size"] * 4.0,
        "gates": layers * experts * 4.0,
        "expert_states": layers * experts * hidden * 4.0,
        "index": index_per_token,
    }


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
