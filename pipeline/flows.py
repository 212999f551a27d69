"""`moedistill demo`: every stage on the embedded demo, in order, each one reusing finished work.

fine-tune teacher -> cache it once -> distil SFT, KD and B-Distill students from that cache -> evaluate
teacher and students -> results table, storage report and plots under <output_dir>/reports.

The demo's results table (<output_dir>/reports/results.csv|md|png and the final summary) holds the teacher and
this demo's students only; <output_dir>/eval/results.* also lists students evaluated earlier there.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, with_overrides

DEMO_METHODS = ("sft", "kd", "b-distill")
STAGES = ("finetune", "cache", "distill", "evaluate", "report")


@dataclass
class DemoTimer:
    wall: dict[str, float] = field(default_factory=dict)

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        print(f"\n=== {stage} ===", flush=True)
        started = time.perf_counter()
        result = fn()
        self.wall[stage] = time.perf_counter() - started
        print(f"=== {stage} done in {self.wall[stage]:.0f} s ===", flush=True)
        return result


def run_demo(
    config: Config, stages: tuple[str, ...] = STAGES, methods: tuple[str, ...] = DEMO_METHODS
) -> dict:
    from pipeline.cache.stage import format_cache_info, run_cache
    from pipeline.distill.stage import format_distill_result, run_distill
    from pipeline.evaluate.stage import run_evaluate
    from pipeline.finetune.stage import format_finetune_result, run_finetune
    from pipeline.ray_session import connect
    from pipeline.workspace import paths_for

    started = time.perf_counter()
    connect()
    timer = DemoTimer()
    summary: dict[str, Any] = {"stages": timer.wall}
    if "finetune" in stages:
        finetune = timer.run("fine-tune the teacher (Ray Train)", lambda: run_finetune(config))
        print(format_finetune_result(finetune))
        summary["finetune"] = finetune
    if "cache" in stages:
        cache = timer.run("cache the teacher once (Ray Data)", lambda: run_cache(config))
        print(format_cache_info(cache))
        summary["cache"] = cache
    students: dict[str, Any] = {}
    if "distill" in stages:
        for method in methods:
            run_config = with_overrides(config, {"distill.method": method})
            result = timer.run(
                f"distil the {method} student (Ray Train)", lambda c=run_config: run_distill(c)
            )
            print(format_distill_result(result))
            students[method] = result
        summary["students"] = students
    if "evaluate" in stages:
        models = {"teacher": str(paths_for(config).teacher_final)}
        models.update({r.run_name: r.export_dir for r in students.values()})
        evaluation = timer.run(
            "evaluate teacher and students (Ray Data)", lambda: run_evaluate(config, models)
        )
        summary["evaluation"] = evaluation
        summary["results"] = write_demo_results(config, evaluation.rows, students.values())
    if "report" in stages:
        summary["reports"] = timer.run("reports", lambda: _reports(config, summary))
    total = time.perf_counter() - started
    print(_final_summary(summary, total))
    return summary


@dataclass(frozen=True)
class DemoResults:
    rows: list[dict[str, Any]]  # the teacher's and this demo's students' rows only
    csv_path: Path
    md_path: Path
    png_path: Path


def write_demo_results(
    config: Config, evaluation_rows: list[dict[str, Any]], students: Iterable[Any]
) -> DemoResults:
    """results.csv|md|png under <output_dir>/reports for the teacher and `students` (DistillResults) only,
    with each student's validation loss from its run."""
    from pipeline.evaluate.results import rows_of_runs, write_results_csv, write_results_table
    from pipeline.workspace import paths_for

    rows = rows_of_runs(evaluation_rows, students)
    out = paths_for(config).reports
    csv_path = write_results_csv(rows, out / "results.csv")
    md, png = write_results_table(rows, out, title=f"{config.name}: Rouge-L (%)")
    return DemoResults(rows, csv_path, md, png)


def _reports(config: Config, summary: dict[str, Any]) -> list[Path]:
    from pipeline.reports.gates import write_gate_report
    from pipeline.reports.storage import format_storage_report, measure_store, write_storage_report
    from pipeline.workspace import paths_for

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


def _final_summary(summary: dict[str, Any], total: float) -> str:
    results: DemoResults | None = summary.get("results")
    table: list[str] = []
    if results is not None and results.rows:
        rows = results.rows  # students' val loss from their runs, the teacher's from its fine-tuning
        width = max(len("model"), *(len(str(r["model"])) for r in rows))
        test_sets = list(dict.fromkeys(r["test_set"] for r in rows))
        ts_width = max(len("test set"), *(len(str(t)) for t in test_sets)) if len(test_sets) > 1 else 0
        ts_head = f" {'test set':<{ts_width}}" if ts_width else ""
        table.append(f"{'model':<{width}}{ts_head} {'val loss':>9} {'Rouge-L (%)':>16}")
        for row in rows:
            loss = row.get("val_loss")
            loss_text = f"{loss:9.3f}" if loss is not None else f"{'-':>9}"
            score = f"{row['rouge_l_mean']:.1f} ± {row['rouge_l_std'] or 0.0:.1f}"
            ts_cell = f" {row['test_set']:<{ts_width}}" if ts_width else ""
            table.append(f"{row['model']:<{width}}{ts_cell} {loss_text} {score:>16}")
        table.append(
            f"(Rouge-L: sampling T=1 over {rows[0].get('num_seeds') or '?'} seeds on "
            f"{rows[0].get('num_examples') or '?'} test prompts; table: {results.md_path})"
        )
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


def run_demo_cli(args: argparse.Namespace) -> None:
    from pipeline.cli import load_cli_config

    config = load_cli_config(args)
    stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(","))
    unknown = set(stages) - set(STAGES)
    if unknown:
        from pipeline.errors import ConfigError

        raise ConfigError(f"unknown demo stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    run_demo(config, stages)
