"""One flow for the demo and for sweeps: fine-tune the teacher -> cache it once -> distil every student run
from that one cache -> evaluate teacher and students -> one results table holding only those models.

`run_demo` (`moedistill demo`) runs it for the demo's methods and adds the storage report, gate heat maps and
a final summary; `run_ablate` (`moedistill ablate`) runs it for the grid points of a sweep file. Every stage
reuses finished work, so a rerun after a kill resumes and a finished flow is a quick no-op.

The demo's results table (<output_dir>/reports/results.csv|md|png and the final summary) holds the teacher and
this demo's students only; <output_dir>/eval/results.* also lists students evaluated earlier there. A sweep's
table lives under <output_dir>/sweeps/<name>/ (pipeline.sweep).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cache.format.spec import CacheInfo
from pipeline.cache.stage import format_cache_info, run_cache
from pipeline.config import Config, teacher_cache_hash, with_overrides
from pipeline.data.stage import prepare_data
from pipeline.distill.stage import DistillResult, format_distill_result, run_distill
from pipeline.evaluate.results import rows_of_runs, write_results_csv, write_results_table
from pipeline.evaluate.stage import EvalResults, run_evaluate
from pipeline.evaluate.stats import seed_table_markdown, values_by_seed
from pipeline.finetune.stage import FinetuneResult, format_finetune_result, run_finetune
from pipeline.ray_session import connect
from pipeline.reports.cost_quality import write_cost_quality
from pipeline.reports.gates import write_gate_report
from pipeline.reports.storage import format_storage_report, write_storage_report
from pipeline.reports.storage_measure import measure_store
from pipeline.sweep import load_sweep, plan_runs, sweep_results_dir, sweep_rows
from pipeline.workspace import paths_for, warn_if_job_local

DEMO_METHODS = ("sft", "kd", "b-distill", "b-distill-stable")
STAGES = ("finetune", "cache", "distill", "evaluate", "report")


@dataclass
class StageTimer:
    """Runs one stage with a header and records its wall time (the demo's summary lists them)."""

    wall: dict[str, float] = field(default_factory=dict)

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        print(f"\n=== {stage} ===", flush=True)
        started = time.perf_counter()
        result = fn()
        self.wall[stage] = time.perf_counter() - started
        print(f"=== {stage} done in {self.wall[stage]:.0f} s ===", flush=True)
        return result


@dataclass(frozen=True)
class ResultsFiles:
    rows: list[dict[str, Any]]  # the teacher's and this flow's runs' rows only
    csv_path: Path
    md_path: Path
    png_path: Path


@dataclass
class FlowResult:
    finetune: FinetuneResult | None = None
    cache: CacheInfo | None = None  # the base config's cache (the only one unless a sweep has cache_grid)
    caches: dict[str, CacheInfo] = field(default_factory=dict)  # teacher_cache_hash -> cache, in build order
    runs: list[DistillResult] = field(default_factory=list)
    evaluation: EvalResults | None = None
    results: ResultsFiles | None = None


def run_flow(
    base: Config,
    runs: Sequence[tuple[dict[str, Any], Config]],
    results_dir: Path,
    title: str,
    stages: Sequence[str] = STAGES,
    timer: StageTimer | None = None,
) -> FlowResult:
    """The stages of `stages` for the teacher of `base` and each student run (grid point, config).

    Every run reads its teacher cache, built (or found) once: the one cache of `base`, or one per distinct
    cache setting when a sweep varies `cache.*` (pipeline.sweep checks that all runs share the teacher). The
    results table holds the teacher and these runs only, each row labelled by its grid point."""
    timer = timer or StageTimer()
    flow = FlowResult()
    if "finetune" in stages:
        flow.finetune = timer.run("fine-tune the teacher (Ray Train)", lambda: run_finetune(base))
        print(format_finetune_result(flow.finetune), flush=True)
    if "cache" in stages:
        settings: dict[str, Config] = {}
        for config in (base, *(c for _, c in runs)):
            settings.setdefault(teacher_cache_hash(config), config)
        for i, (key, config) in enumerate(settings.items()):
            what = f"teacher cache {i + 1}/{len(settings)}" if len(settings) > 1 else "cache the teacher once"
            flow.caches[key] = timer.run(f"{what} (Ray Data)", lambda c=config: run_cache(c))
            print(format_cache_info(flow.caches[key]), flush=True)
        flow.cache = flow.caches[teacher_cache_hash(base)]
    if "distill" in stages:
        for i, (point, config) in enumerate(runs):
            cache = flow.caches.get(teacher_cache_hash(config))
            what = ", ".join(f"{k}={v}" for k, v in point.items()) or config.distill.method
            result = timer.run(
                f"distil student {i + 1}/{len(runs)}: {what} (Ray Train)",
                lambda c=config, cache=cache: run_distill(c, cache_path=cache.path if cache else None),
            )
            print(format_distill_result(result), flush=True)
            flow.runs.append(result)
    if "evaluate" in stages:
        models = {"teacher": str(paths_for(base).teacher_final)}
        models.update({r.run_name: r.export_dir for r in flow.runs})
        flow.evaluation = timer.run(
            "evaluate teacher and students (Ray Data)", lambda: run_evaluate(base, models)
        )
        points = [point for point, _ in runs][: len(flow.runs)]
        rows = sweep_rows(points, flow.runs, flow.evaluation.rows)
        flow.results = write_results(rows, results_dir, title)
    return flow


def write_results(rows: list[dict[str, Any]], out: Path, title: str) -> ResultsFiles:
    """results.csv|md|png in `out` for exactly `rows`."""
    csv_path = write_results_csv(rows, out / "results.csv")
    md, png = write_results_table(rows, out, title=title)
    return ResultsFiles(rows, csv_path, md, png)


def write_seed_tables(
    rows: list[dict[str, Any]], out: Path, reference_setting: str | None = None
) -> Path | None:
    """seeds.md in `out` when some method ran several training seeds: per method the mean ± std over seeds of
    the validation loss, of Rouge-L, of task accuracy (where test sets have answer keys) and (when
    multiple-choice sets were scored) of accuracy, each a run's
    mean over its test sets, and the paired difference to `kd` on the same seeds with its 95% interval (bold
    where the interval excludes 0) -- or, with `reference_setting` (a sweep's `compare_to`), to the same
    method at that grid setting; None when every method ran one seed."""
    students = [r for r in rows if (r.get("method") or r["model"]) != "teacher"]
    if not any(len(s) > 1 for s in values_by_seed(students, "val_loss").values()):
        return None
    columns = [("val_loss", "val loss", "validation loss (lower is better)")]
    columns.append(("rouge_l_mean", "Rouge-L", "Rouge-L (%) (higher is better)"))
    if any(r.get("task_accuracy") is not None for r in students):
        columns.append(("task_accuracy", "task accuracy", "task accuracy (%) (higher is better)"))
    if any(r.get("accuracy") is not None for r in students):
        columns.append(("accuracy", "accuracy", "multiple-choice accuracy (%) (higher is better)"))
    parts = []
    for column, name, title in columns:
        parts.append(("\n" if parts else "") + f"## Training seeds: {title}\n")
        parts.append(seed_table_markdown(students, column, name, reference_setting=reference_setting))
    parts += [
        "\nPaired differences use only the seeds both methods ran; t interval over those seeds.\n",
    ]
    path = out / "seeds.md"
    path.write_text("".join(parts))
    return path


def write_demo_results(
    config: Config, evaluation_rows: list[dict[str, Any]], students: Iterable[Any]
) -> ResultsFiles:
    """results.csv|md|png under <output_dir>/reports for the teacher and `students` (DistillResults) only,
    with each student's validation loss from its run."""
    rows = rows_of_runs(evaluation_rows, students)
    return write_results(rows, paths_for(config).reports, title=f"{config.name}: Rouge-L, task accuracy (%)")


# --- the demo -----------------------------------------------------------------------------------------------
def run_demo(
    config: Config, stages: tuple[str, ...] = STAGES, methods: tuple[str, ...] = DEMO_METHODS
) -> dict[str, Any]:
    started = time.perf_counter()
    prepare_data(config)  # data problems surface before Ray starts
    connect(output_dir=config.out)
    timer = StageTimer()
    runs = [({}, with_overrides(config, {"distill.method": m})) for m in methods]
    flow = run_flow(
        config,
        runs,
        paths_for(config).reports,
        f"{config.name}: Rouge-L, task accuracy (%)",
        stages=stages,
        timer=timer,
    )
    summary: dict[str, Any] = {"stages": timer.wall}
    if flow.finetune is not None:
        summary["finetune"] = flow.finetune
    if flow.cache is not None:
        summary["cache"] = flow.cache
    if "distill" in stages:
        methods_run = [c.distill.method for _, c in runs]
        summary["students"] = dict(zip(methods_run, flow.runs, strict=True))
    if flow.evaluation is not None:
        summary["evaluation"] = flow.evaluation
        summary["results"] = flow.results
    if "report" in stages:
        summary["reports"] = timer.run("reports", lambda: _reports(config, summary))
    total = time.perf_counter() - started
    print(_final_summary(summary, total))
    return summary


def _reports(config: Config, summary: dict[str, Any]) -> list[Path]:
    out = paths_for(config).reports
    written: list[Path] = []
    if "cache" in summary:
        report = measure_store(summary["cache"].path, projected_tokens=1e9)
        print(format_storage_report(report))
        written += write_storage_report(report, out)
    for result in summary.get("students", {}).values():
        run_dir = Path(result.export_dir).parent
        _, md, png = write_gate_report(run_dir, out_dir=out / "gates" / result.run_name)
        written += [md, png]
    return written


def _summary_table(rows: list[dict[str, Any]], md_path: Path) -> list[str]:
    """One line per model: its validation loss, then per test set its task accuracy (where the set has
    answer keys) and Rouge-L, or a multiple-choice set's accuracy."""
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    test_sets = list(dict.fromkeys(str(r["test_set"]) for r in rows))
    by_cell = {(str(r["model"]), str(r["test_set"])): r for r in rows}
    width = max(len("model"), *(len(m) for m in models))
    cell_width = {ts: max(18, len(ts)) for ts in test_sets}
    multiple_choice = {str(r["test_set"]) for r in rows if r.get("rouge_l_mean") is None}
    head = f"{'model':<{width}} {'val loss':>9}" + "".join(f"  {ts:>{cell_width[ts]}}" for ts in test_sets)
    pair = f"{'acc.':>5}  {'Rouge-L':>11}"
    sub = f"{'':<{width}} {'':>9}" + "".join(
        f"  {'acc.' if ts in multiple_choice else pair:>{cell_width[ts]}}" for ts in test_sets
    )
    lines = [head, sub]
    for model in models:
        loss = next(
            (r.get("val_loss") for r in rows if r["model"] == model and r.get("val_loss") is not None), None
        )
        line = f"{model:<{width}} " + (f"{loss:9.3f}" if loss is not None else f"{'-':>9}")
        for ts in test_sets:
            row = by_cell.get((model, ts))
            if row is None:
                text = "-"
            elif row.get("rouge_l_mean") is None:  # a multiple-choice set
                text = f"{row['accuracy']:.1f}"
            else:
                acc = row.get("task_accuracy")
                rouge = f"{row['rouge_l_mean']:.1f} ± {row['rouge_l_std'] or 0.0:.1f}"
                text = f"{acc:5.1f}  {rouge:>11}" if acc is not None else f"{'-':>5}  {rouge:>11}"
            line += f"  {text:>{cell_width[ts]}}"
        lines.append(line)
    lines.append(
        f"(sampling T=1 over {rows[0].get('num_seeds') or '?'} seeds; acc.: task accuracy, responses judged "
        f"correct against the generator's answer keys (%), or a multiple-choice set's; table: {md_path})"
    )
    return lines


def _final_summary(summary: dict[str, Any], total: float) -> str:
    results: ResultsFiles | None = summary.get("results")
    table = _summary_table(results.rows, results.md_path) if results is not None and results.rows else []
    rule = "=" * max(78, *(len(line) for line in table[:-1]), 0)
    lines = ["", rule, "moe-distill demo: results", rule, *table]
    plots = [results.png_path] if results is not None else []
    plots += [p for p in summary.get("reports", []) if str(p).endswith(".png")]
    if plots:
        lines.append("plots: " + ", ".join(str(p) for p in plots))
    lines.append(
        "stage wall times: " + ", ".join(f"{k.split(' (')[0]} {v:.0f}s" for k, v in summary["stages"].items())
    )
    lines.append(f"total wall time: {total / 60:.1f} min")
    return "\n".join(lines)


# --- sweeps -------------------------------------------------------------------------------------------------
def run_ablate(sweep_path: str | Path) -> dict[str, Any]:
    """`moedistill ablate`: the flow over a sweep file's grid points (pipeline.sweep), one cache for all."""
    sweep = load_sweep(sweep_path)
    base, configs = plan_runs(sweep)
    warn_if_job_local(base)
    caches = len({teacher_cache_hash(c) for c in configs})
    over = "one teacher cache" if caches == 1 else f"{caches} teacher caches of one teacher (cache_grid)"
    print(f"[ablate] sweep {sweep.name}: {len(configs)} student runs over {over}", flush=True)
    prepare_data(base)  # data problems surface before Ray starts
    connect(output_dir=base.out)
    stages = ("finetune", "cache", "distill", *(("evaluate",) if sweep.evaluate else ()))
    out = sweep_results_dir(sweep, base)
    flow = run_flow(
        base, list(zip(sweep.runs(), configs, strict=True)), out, f"sweep {sweep.name}: Rouge-L (%)", stages
    )
    trained = sum(not r.skipped for r in flow.runs)
    for cache in flow.caches.values():
        readers = [r for r in flow.runs if r.cache_path == cache.path]
        fresh = sum(not r.skipped for r in readers)
        print(
            f"[ablate] teacher cache {cache.key}: {'built' if cache.status != 'exists' else 'found'} once, "
            f"read by {fresh} student run(s); {len(readers) - fresh} finished run(s) skipped",
            flush=True,
        )
    summary: dict[str, Any] = {"cache": flow.cache, "runs": flow.runs, "trained": trained}
    if flow.results is not None:
        print(flow.results.md_path.read_text())
        seeds = write_seed_tables(flow.results.rows, out, sweep.reference_setting())
        if seeds is not None:
            print(seeds.read_text())
        cache_of_run = {r.run_name: r.cache_path for r in flow.runs}
        title = f"sweep {sweep.name}: cost vs quality"
        costs = write_cost_quality(flow.results.rows, cache_of_run, out, title)
        if costs is not None:
            print(costs[0].read_text())
            print(f"[ablate] cost vs quality: {costs[0]}, {costs[1]}")
        print(f"[ablate] results: {flow.results.md_path}, {flow.results.png_path}, {flow.results.csv_path}")
        files = flow.results
        summary.update(rows=files.rows, results_md=files.md_path, results_png=files.png_path)
    return summary
