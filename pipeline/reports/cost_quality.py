"""What a cache setting costs against what its students lose: for a sweep whose runs read different caches
(`cache_grid: true`, e.g. expert-state codecs), per (method, setting) the cache's bytes per distillation token
on disk (whole cache and expert states, pipeline.reports.storage_measure.measure_store) beside the students'
validation loss and Rouge-L, mean ± std over training seeds.

    cost_quality.md   the table, cheapest cache first, Pareto-optimal rows (no cheaper cache with a lower or
                      equal mean validation loss for that method) marked
    cost_quality.png  bytes per token (log x) against validation loss, one line per method, ± std bars
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.evaluate.stats import mean_std, values_by_seed
from pipeline.plotting import pyplot
from pipeline.reports.storage_measure import measure_store


@dataclass(frozen=True)
class CostQualityRow:
    method: str
    setting: str | None
    cache_bytes_per_token: float  # whole cache, on disk
    states_bytes_per_token: float  # expert states, on disk
    val_loss: list[float]  # one per training seed
    rouge_l: list[float]
    pareto: bool = False


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """stats.mean_std, NaN for no values (a row without evaluated runs)."""
    return mean_std(values) if values else (math.nan, math.nan)


def cost_quality_rows(
    rows: Sequence[Mapping[str, Any]], cache_of_run: Mapping[str, str]
) -> list[CostQualityRow]:
    """Group results rows (one per run and test set; pipeline.evaluate.results schema) by (method, setting)
    with the on-disk bytes of the cache each run read; cheapest first, Pareto-optimal rows marked."""
    runs = [r for r in rows if str(r["model"]) in cache_of_run]  # not the teacher, nor other runs
    cache_of: dict[tuple[str, str | None], str] = {}
    for row in runs:
        key = (str(row.get("method") or row["model"]), row.get("setting") or None)
        cache = cache_of_run[str(row["model"])]
        if cache_of.setdefault(key, cache) != cache:
            raise ValueError(f"{key} mixes runs of two caches ({cache_of[key]}, {cache})")
    sizes = {}
    for cache in dict.fromkeys(cache_of.values()):
        report = measure_store(cache)
        sizes[cache] = (report.disk_per_token, report.field_bytes("expert_states").disk_per_token)
    # per seed: a run's value, averaged over its test sets (multiple-choice rows carry no Rouge-L)
    val, rouge = values_by_seed(runs, "val_loss"), values_by_seed(runs, "rouge_l_mean")
    out = [
        CostQualityRow(
            *key, *sizes[cache], list(val.get(key, {}).values()), list(rouge.get(key, {}).values())
        )
        for key, cache in cache_of.items()
    ]
    out.sort(key=lambda r: (r.method, r.cache_bytes_per_token))

    def dominated(r: CostQualityRow) -> bool:
        mean = _mean_std(r.val_loss)[0]
        return any(
            o.method == r.method
            and o.cache_bytes_per_token < r.cache_bytes_per_token
            and _mean_std(o.val_loss)[0] <= mean
            for o in out
        )

    return [replace(r, pareto=not dominated(r)) for r in out]


def format_cost_quality(rows: Sequence[CostQualityRow], title: str) -> str:
    lines = [
        f"## {title}",
        "",
        "| method | setting | cache B/token | expert states B/token | val loss | Rouge-L (%) | Pareto |",
        "|---|---|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        (vm, vs), (rm, rs) = _mean_std(r.val_loss), _mean_std(r.rouge_l)
        val = f"{vm:.3f} ± {'–' if math.isnan(vs) else f'{vs:.3f}'} (n={len(r.val_loss)})"
        rouge = f"{rm:.2f} ± {'–' if math.isnan(rs) else f'{rs:.2f}'}"
        lines.append(
            f"| {r.method} | {r.setting or '–'} | {r.cache_bytes_per_token:,.0f} | "
            f"{r.states_bytes_per_token:,.0f} | {val} | {rouge} | {'yes' if r.pareto else ''} |"
        )
    lines += [
        "",
        "Bytes are on disk per distillation token (every file of the cache, incl. its basis and fidelity "
        "sample). Pareto: no cheaper cache gives that method a lower or equal mean validation loss. "
        "± is the std over training seeds; whether a difference is beyond seed noise is in seeds.md.",
    ]
    return "\n".join(lines) + "\n"


def _short(setting: str | None) -> str:
    """'states_codec=fp8, states_rank=32' -> 'fp8 32' (the values: the x tick label)."""
    if not setting:
        return "base"
    return " ".join(part.split("=", 1)[-1] for part in setting.split(", "))


def plot_cost_quality(rows: Sequence[CostQualityRow], png_path: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        means = [_mean_std(r.val_loss) for r in mine]
        err = [0.0 if math.isnan(s) else s for _, s in means]
        x = [r.cache_bytes_per_token for r in mine]
        ax.errorbar(x, [m for m, _ in means], yerr=err, marker="o", capsize=3, label=method)
    ticks = {r.cache_bytes_per_token: f"{_short(r.setting)}\n{r.cache_bytes_per_token:,.0f} B" for r in rows}
    ax.set_xscale("log")
    ax.set_xticks(list(ticks), list(ticks.values()), fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("cache bytes per distillation token (on disk, log scale)")
    ax.set_ylabel("student validation loss (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def write_cost_quality(
    rows: Sequence[Mapping[str, Any]], cache_of_run: Mapping[str, str], out: Path, title: str
) -> tuple[Path, Path] | None:
    """cost_quality.md and cost_quality.png in `out`; None when the runs read fewer than two caches."""
    if len(set(cache_of_run.values())) < 2:
        return None
    table = cost_quality_rows(rows, cache_of_run)
    md = out / "cost_quality.md"
    out.mkdir(parents=True, exist_ok=True)
    md.write_text(format_cost_quality(table, title))
    return md, plot_cost_quality(table, out / "cost_quality.png", title)
