"""Seed statistics for sweep tables: mean ± std over training seeds per method, and the paired difference to
a baseline method (``kd``) over the seeds both ran, with a Student-t confidence interval.

Pairing by seed removes what the two runs share (data order, initialisation of the same seed), so a
difference can be told from seed noise with few seeds: the interval is mean(d) ± t_{(1+c)/2, n-1} sd(d) /
sqrt(n) over the n per-seed differences d = method - baseline. It needs n >= 2 shared seeds.

Rows are results rows (schema: pipeline.evaluate.results): one per run and test set, keyed here by
(method, setting) -- the grid point without the seed -- and ``seed``. A method's baseline is the baseline
method at the same setting when the sweep ran one there, else the baseline method without a setting; or, with
``reference_setting``, the same method at that setting (e.g. each codec's student against the float16
cache's student of the same method).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import DataError

DEFAULT_BASELINE = "kd"
DEFAULT_CONFIDENCE = 0.95
# Run-free rows (the teacher) are not methods to compare.
_NOT_METHODS = ("teacher",)


# --- Student t quantiles (no scipy dependency) -------------------------------------------------------------
def _incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), by its continued fraction (Lentz's method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast below this point: use the symmetry
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return math.exp(log_front) * frac / a


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t with df >= 1 degrees of freedom (bisection on t_cdf, |error| < 1e-10)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df!r}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < q:
        high *= 2.0
    while high - low > 1e-10 * max(1.0, high):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_cdf(mid, df) < q else (low, mid)
    return 0.5 * (low + high)


# --- statistics ---------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN for a single value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


@dataclass(frozen=True)
class PairedDifference:
    """mean(method - baseline) over the n shared seeds and its confidence interval [low, high]."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return interval_excludes_zero(self)


def interval_excludes_zero(diff: PairedDifference) -> bool:
    """Whether the interval lies strictly on one side of 0: the difference is beyond seed noise."""
    return diff.low > 0.0 or diff.high < 0.0


def paired_difference(
    values: Mapping[Any, float], baseline: Mapping[Any, float], confidence: float = DEFAULT_CONFIDENCE
) -> PairedDifference:
    """Per-seed differences values[s] - baseline[s] over the seeds in both; t interval at `confidence`."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    seeds = [s for s in values if s in baseline]
    if len(seeds) < 2:
        raise DataError(
            f"a paired difference needs at least 2 seeds run by both methods, got {len(seeds)} "
            f"(seeds {sorted(map(str, values))} vs {sorted(map(str, baseline))}). Fix: run more training "
            "seeds (distill.train.seed: [0, 1, 2] in the sweep grid) for both."
        )
    diffs = [float(values[s]) - float(baseline[s]) for s in seeds]
    mean, sd = mean_std(diffs)
    half = t_quantile(0.5 + confidence / 2.0, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return PairedDifference(mean, mean - half, mean + half, len(diffs), confidence)


@dataclass(frozen=True)
class SeedSummary:
    method: str
    setting: str | None
    seeds: list[Any]
    mean: float
    std: float  # NaN with one seed
    vs_baseline: PairedDifference | None  # None: this is the baseline, or fewer than 2 shared seeds

    @property
    def label(self) -> str:
        return f"{self.method} ({self.setting})" if self.setting else self.method


def values_by_seed(
    rows: Sequence[Mapping[str, Any]], column: str, test_set: str | None = None
) -> dict[tuple[str, str | None], dict[Any, float]]:
    """{(method, setting): {seed: value}} from results rows; the teacher is left out. With test_set=None a
    run's value is its mean over the test sets it has (a per-run column like val_loss is the same on each)."""
    per_run: dict[tuple[str, str | None], dict[Any, list[float]]] = {}
    for row in rows:
        method = row.get("method") or row.get("model")
        if method in _NOT_METHODS or (test_set is not None and row.get("test_set") != test_set):
            continue
        value = row.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        key = (str(method), row.get("setting") or None)
        per_run.setdefault(key, {}).setdefault(row.get("seed"), []).append(float(value))
    return {key: {s: statistics.fmean(v) for s, v in runs.items()} for key, runs in per_run.items()}


def seed_summaries(
    values: Mapping[tuple[str, str | None], Mapping[Any, float]],
    baseline: str = DEFAULT_BASELINE,
    confidence: float = DEFAULT_CONFIDENCE,
    reference_setting: str | None = None,
) -> list[SeedSummary]:
    """Mean ± std over seeds for every (method, setting), and its paired difference to the baseline method
    (at the same setting if run there, else without a setting; the baseline itself at a setting against
    the baseline without one) where at least 2 seeds are shared. With
    `reference_setting`, the difference is to the same method at that setting instead."""
    out = []
    for (method, setting), by_seed in values.items():
        if reference_setting is not None:
            base = values.get((method, reference_setting)) if setting != reference_setting else None
        elif method == baseline:  # the baseline at a setting (e.g. kd from another cache): against plain kd
            base = values.get((baseline, None)) if setting is not None else None
        else:
            base = values.get((baseline, setting)) or values.get((baseline, None))
        diff = None
        if base is not None and len([s for s in by_seed if s in base]) >= 2:
            diff = paired_difference(by_seed, base, confidence)
        mean, std = mean_std(list(by_seed.values()))
        out.append(SeedSummary(method, setting, list(by_seed), mean, std, diff))
    return out


def format_seed_table(
    summaries: Sequence[SeedSummary], value_name: str, baseline: str = DEFAULT_BASELINE, digits: int = 3
) -> str:
    """Markdown: label | mean ± std (n) | paired difference to the baseline [interval]; bold where the
    interval excludes 0."""
    levels = [s.vs_baseline.confidence for s in summaries if s.vs_baseline is not None]
    level = f"{100 * (levels[0] if levels else DEFAULT_CONFIDENCE):g}%"  # seed_summaries uses one level
    lines = [
        f"| method | {value_name}, mean ± std over seeds | difference to {baseline} (paired, {level} CI) |",
        "|---|---:|---:|",
    ]
    for s in summaries:
        std = "–" if math.isnan(s.std) else f"{s.std:.{digits}f}"
        cell = f"{s.mean:.{digits}f} ± {std} (n={len(s.seeds)})"
        if s.vs_baseline is None:
            diff = "–"
        else:
            d = s.vs_baseline
            diff = f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}]"
            if d.excludes_zero:
                diff = f"**{diff}**"
        lines.append(f"| {s.label} | {cell} | {diff} |")
    return "\n".join(lines) + "\n"


def seed_table_markdown(
    rows: Sequence[Mapping[str, Any]],
    column: str,
    value_name: str,
    test_set: str | None = None,
    baseline: str = DEFAULT_BASELINE,
    reference_setting: str | None = None,
) -> str:
    """The seed-statistics table of one results column ("val_loss", "rouge_l_mean", "accuracy") of a sweep:
    differences to `baseline`, or to the same method at `reference_setting` when given."""
    values = values_by_seed(rows, column, test_set)
    summaries = seed_summaries(values, baseline, reference_setting=reference_setting)
    against = baseline if reference_setting is None else f"the same method at {reference_setting}"
    return format_seed_table(summaries, value_name, against)
