"""Sweep files for `moedistill ablate`: one sweep file -> one teacher cache (built once or found) -> many
student runs -> evaluation -> one results table (the flow itself is pipeline.flows.run_ablate). Finished runs
are skipped when a sweep is rerun.

Sweep file (YAML):

    base: demo.yaml                # a config preset, relative to the sweep file
    set: {distill.train.epochs: 1} # overrides for every run (optional)
    grid:                          # the cross product of these student-side settings
      distill.method: [kd, b-distill]
      distill.k: [1, 3]
      student.build.num_experts: [2, 4]
    evaluate: true                 # evaluate every student (and the teacher) afterwards

`grid:` may also be a list of such mappings: the runs are the union of their cross products, in order (e.g.
every method on one student init, a subset on another); a grid point listed twice is refused.

Leave `distill.run_name` unset: each run is then named `<method>-k..-s<seed>-<settings fingerprint>`, so
grid points never share a run directory (a fixed run_name is refused up front).

Outputs, under `<output_dir>/sweeps/<name>/`: results.csv (schema: pipeline/evaluate/results.py), results.md
and results.png, holding the teacher and this sweep's runs only (never students evaluated earlier in the
same output_dir). Each run's row is labelled "method (grid point)", the grid point written with the
shortest unambiguous key suffixes (`lambda_mc=0.5, num_experts=2`); `distill.method` is the method itself
and `distill.train.seed` is left out, so several seeds of one grid point are aggregated (mean ± std, n=).
`moedistill report results <sweep file>` re-renders that table.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import (
    Config,
    check_plain_name,
    load_config,
    teacher_cache_hash,
    teacher_fields,
    with_overrides,
)
from pipeline.errors import ConfigError
from pipeline.evaluate.results import format_setting, rows_of_runs
from pipeline.workspace import paths_for

SWEEP_KEYS = {"base", "set", "grid", "evaluate", "name", "cache_grid", "compare_to"}
# Grid keys that are not part of a row's `setting` label: the method has its own column, and training seeds
# of one grid point are aggregated by the results table (mean ± std across runs).
UNLABELLED_KEYS = ("distill.method", "distill.train.seed")


@dataclass(frozen=True)
class Sweep:
    name: str
    base: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    grids: tuple[dict[str, list[Any]], ...] = ()  # each a cross product; the runs are their union
    evaluate: bool = True
    # Opt-in: `cache.*` grid keys may give runs their own teacher cache (one per distinct cache setting,
    # of the same fine-tuned teacher), e.g. a sweep over expert-state codecs.
    cache_grid: bool = False
    # Optional: seeds.md compares each method with the same method at this grid setting (e.g. the float16
    # cache) instead of with kd.
    compare_to: dict[str, Any] | None = None

    def reference_setting(self) -> str | None:
        """The `setting` label of the grid points that `compare_to` names (None without compare_to)."""
        if self.compare_to is None:
            return None
        for point in self.runs():
            labelled = {k: v for k, v in point.items() if k not in UNLABELLED_KEYS}
            if labelled == self.compare_to:
                return grid_setting(point)
        raise ConfigError(
            f"sweep {self.name}: compare_to {self.compare_to} matches no grid point; it must give every "
            f"labelled grid key of one point ({sorted(k for k in self.grid if k not in UNLABELLED_KEYS)}). "
            "Fix: copy one grid point's values into compare_to."
        )

    @property
    def grid(self) -> dict[str, list[Any]]:
        """Every grid key with the values any of the grids gives it, in first-seen order."""
        merged: dict[str, list[Any]] = {}
        for grid in self.grids:
            for key, values in grid.items():
                merged.setdefault(key, []).extend(v for v in values if v not in merged.get(key, []))
        return merged

    def runs(self) -> list[dict[str, Any]]:
        points: list[dict[str, Any]] = []
        for grid in self.grids or ({},):
            keys = list(grid)
            points += [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]
        return points


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist (example: jobs/configs/demo-sweep.yaml)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with keys {sorted(SWEEP_KEYS)}")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {unknown}; valid: {sorted(SWEEP_KEYS)}")
    if "base" not in raw:
        raise ConfigError(f"{path}: `base:` (the config preset every run starts from) is required")
    grid = raw.get("grid") or {}
    grids = grid if isinstance(grid, list) else [grid]
    if not grids or not all(
        isinstance(g, dict) and all(isinstance(v, list) and v for v in g.values()) for g in grids
    ):
        raise ConfigError(
            f"{path}: `grid:` maps dotted config keys to non-empty lists of values (or is a list of such "
            "mappings, whose cross products are run one after another)"
        )
    name = str(raw.get("name") or path.stem)
    check_plain_name(name, "name", str(path))  # results go to <output_dir>/sweeps/<name>
    sweep = Sweep(
        name=name,
        base=(path.parent / raw["base"]).resolve(),
        overrides=dict(raw.get("set") or {}),
        grids=tuple({str(k): list(v) for k, v in g.items()} for g in grids),
        evaluate=bool(raw.get("evaluate", True)),
        cache_grid=bool(raw.get("cache_grid", False)),
        compare_to=_compare_to(path, raw.get("compare_to")),
    )
    sweep.reference_setting()  # a compare_to that names no grid point is refused here, before any work
    return sweep


def _compare_to(path: Path, raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw or any(k in UNLABELLED_KEYS for k in raw):
        raise ConfigError(
            f"{path}: `compare_to:` maps grid keys (not {', '.join(UNLABELLED_KEYS)}) to one value each, "
            "e.g. {cache.states_codec: float16, cache.states_rank: null}"
        )
    return {str(k): v for k, v in raw.items()}


def plan_runs(sweep: Sweep) -> tuple[Config, list[Config]]:
    """The base config and one validated config per grid point; all must share the base's teacher cache, or
    (`cache_grid: true`) at least its fine-tuned teacher, differing only in `cache.*` settings."""
    base = load_config(sweep.base)  # the preset alone: its own errors name it
    if sweep.overrides:  # it loaded, so an error from here on is caused by the sweep's `set:`
        try:
            base = load_config(sweep.base, sweep.overrides)
        except ConfigError as exc:
            reason = str(exc).removeprefix(f"{sweep.base}: ")
            raise ConfigError(f"sweep {sweep.name}: `set:` (applied to {sweep.base}): {reason}") from None
    points = sweep.runs()
    configs = []
    for point in points:
        run = with_overrides(base, point)
        cache_side = [k for k, v in point.items() if _changes_cache(base, k, v)]
        same_teacher = teacher_fields(run) == teacher_fields(base)
        if sweep.cache_grid and same_teacher and all(k.startswith("cache.") for k in cache_side):
            configs.append(run)
            continue
        if teacher_cache_hash(run) != teacher_cache_hash(base):
            raise ConfigError(
                f"sweep {sweep.name}: grid point {point} changes the teacher cache (a teacher-side setting "
                "such as data, teacher, cache or the student's depth). A sweep varies student-side settings "
                "only, so all runs share one cache; start a second sweep for the other teacher setting (for "
                "cache.* settings of one teacher, `cache_grid: true` in the sweep file gives one cache per "
                "distinct cache setting)."
            )
        configs.append(run)
    for point, run in zip(points, configs, strict=True):
        check_method(run, where=f"sweep {sweep.name}: grid point {point}")
    _check_distinct_runs(sweep, points, configs)
    return base, configs


def check_method(config: Config, where: str) -> None:
    """The run's method exists, can run, and its preset agrees with the config: checked before Ray starts
    (and before any teacher work), so a typo in a sweep's grid never costs a fine-tuning."""
    # why here: the method registry imports torch; `moedistill report results <sweep>` needs none of it.
    from pipeline.distill.methods import resolve_method

    try:
        resolve_method(config.distill, config.student.init)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _changes_cache(base: Config, key: str, value: Any) -> bool:
    """Whether setting `key` alone changes the teacher cache (a teacher-side setting)."""
    alone = with_overrides(base, {key: value}, validate=False)  # the whole point is validated in plan_runs
    return teacher_cache_hash(alone) != teacher_cache_hash(base)


def _check_distinct_runs(sweep: Sweep, points: list[dict[str, Any]], configs: list[Config]) -> None:
    """Every grid point must get its own run directory (else later runs would reuse or clash with earlier)."""
    first: dict[str, dict[str, Any]] = {}
    for point, config in zip(points, configs, strict=True):
        name = config.distill.run_name
        if name and first.setdefault(name, point) is not point:
            raise ConfigError(
                f"sweep {sweep.name}: distill.run_name is fixed to {name!r}, so grid points {first[name]} "
                f"and {point} would share one run directory (students/{name}). Fix: leave distill.run_name "
                "unset (in the base config, `set:` and `grid:`), so every run's name carries a settings "
                "fingerprint."
            )
    for i, config in enumerate(configs):
        for j in range(i):
            if configs[j] == config:
                raise ConfigError(
                    f"sweep {sweep.name}: grid points {points[j]} and {points[i]} give identical settings "
                    "(a value listed twice?). Fix: remove the duplicate from `grid:`."
                )


def sweep_results_dir(sweep: Sweep, base: Config | None = None) -> Path:
    """`<output_dir>/sweeps/<sweep name>`: where `run_ablate` writes results.csv, results.md, results.png."""
    base = base or load_config(sweep.base, sweep.overrides)
    return paths_for(base).root / "sweeps" / sweep.name


def grid_setting(point: dict[str, Any]) -> str | None:
    """The `setting` label of a grid point (None when only the method and/or seed vary)."""
    return format_setting({k: v for k, v in point.items() if k not in UNLABELLED_KEYS}) or None


def sweep_rows(
    points: list[dict[str, Any]], runs: list[Any], evaluation_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The sweep's own table: the teacher's and this sweep's runs' rows only (`run_evaluate` also returns
    models evaluated earlier in the output_dir), each run labelled with its grid point and its val loss.
    `runs` are DistillResults (run_name, val_loss) in the order of `points`."""
    setting = {run.run_name: grid_setting(point) for point, run in zip(points, runs, strict=True)}
    rows = rows_of_runs(evaluation_rows, runs)
    for row in rows:
        if row["model"] in setting:
            row["setting"] = setting[row["model"]]
    return rows
