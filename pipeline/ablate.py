"""`moedistill ablate`: one sweep file -> one teacher cache (built once or found) -> many student runs ->
evaluation -> one results table. Finished runs are skipped when a sweep is rerun.

Sweep file (YAML):

    base: demo.yaml                # a config preset, relative to the sweep file
    set: {distill.train.epochs: 1} # overrides for every run (optional)
    grid:                          # the cross product of these student-side settings
      distill.method: [kd, b-distill]
      distill.k: [1, 3]
      student.build.num_experts: [2, 4]
    evaluate: true                 # evaluate every student (and the teacher) afterwards
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, load_config, teacher_cache_hash, with_overrides
from pipeline.errors import ConfigError

SWEEP_KEYS = {"base", "set", "grid", "evaluate", "name"}


@dataclass(frozen=True)
class Sweep:
    name: str
    base: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    evaluate: bool = True

    def runs(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.grid.values())]


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
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: `grid:` maps dotted config keys to non-empty lists of values")
    return Sweep(
        name=str(raw.get("name") or path.stem),
        base=(path.parent / raw["base"]).resolve(),
        overrides=dict(raw.get("set") or {}),
        grid={str(k): list(v) for k, v in grid.items()},
        evaluate=bool(raw.get("evaluate", True)),
    )


def plan_runs(sweep: Sweep) -> tuple[Config, list[Config]]:
    """The base config and one validated config per grid point; all must share the base's teacher cache."""
    base = load_config(sweep.base, sweep.overrides)
    configs = []
    for point in sweep.runs():
        run = with_overrides(base, point)
        if teacher_cache_hash(run) != teacher_cache_hash(base):
            raise ConfigError(
                f"sweep {sweep.name}: grid point {point} changes the teacher cache (a teacher-side setting "
                "such as data, teacher, cache or the student's depth). A sweep varies student-side settings "
                "only, so all runs share one cache; start a second sweep for the other teacher setting."
            )
        configs.append(run)
    return base, configs


def run_ablate(sweep_path: str | Path) -> dict[str, Any]:
    from pipeline.cache.stage import format_cache_info, run_cache
    from pipeline.distill.stage import format_distill_result, run_distill
    from pipeline.evaluate.stage import run_evaluate
    from pipeline.ray_session import connect
    from pipeline.reports.results import write_results_csv, write_results_table
    from pipeline.training.finetune import run_finetune
    from pipeline.workspace import paths_for

    sweep = load_sweep(sweep_path)
    base, configs = plan_runs(sweep)
    print(f"[ablate] sweep {sweep.name}: {len(configs)} student runs over one teacher cache", flush=True)
    connect()
    run_finetune(base)
    cache = run_cache(base)
    print(format_cache_info(cache), flush=True)
    results = []
    for config in configs:
        result = run_distill(config, cache_path=cache.path)
        print(format_distill_result(result), flush=True)
        results.append(result)
    trained = sum(not r.skipped for r in results)
    print(
        f"[ablate] teacher cache {cache.key}: {'built' if cache.status != 'exists' else 'found'} once, "
        f"read by {trained} student run(s); {len(results) - trained} finished run(s) skipped",
        flush=True,
    )
    summary: dict[str, Any] = {"cache": cache, "runs": results, "trained": trained}
    if sweep.evaluate:
        models = {"teacher": str(paths_for(base).teacher_final)}
        models.update({r.run_name: r.export_dir for r in results})
        evaluation = run_evaluate(base, models)
        val_loss = {r.run_name: r.val_loss for r in results}
        rows = [
            {**row, "val_loss": val_loss.get(row["model"], row.get("val_loss"))} for row in evaluation.rows
        ]
        out = paths_for(base).root / "sweeps" / sweep.name
        write_results_csv(rows, out / "results.csv")
        md, png = write_results_table(rows, out, title=f"sweep {sweep.name}: Rouge-L (%)")
        print(md.read_text())
        print(f"[ablate] results: {md}, {png}, {out / 'results.csv'}")
        summary.update(rows=rows, results_md=md, results_png=png)
    return summary


def run_ablate_cli(args: argparse.Namespace) -> None:
    run_ablate(args.config)
