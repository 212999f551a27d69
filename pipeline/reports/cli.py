"""`moedistill report {storage,gates,results}`: thin dispatch onto the report modules; each writes a markdown
file and a PNG and prints the text. `report results` takes a results CSV, a directory holding results.csv
(or runs that each hold one), or a sweep YAML file (its `<output_dir>/sweeps/<name>/results.csv`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import ConfigError, DataError


def run_report_cli(args: argparse.Namespace) -> list[Path]:
    """Returns the written files (markdown first, then the PNG)."""
    kind = args.kind
    if kind == "storage":
        return _storage(args)
    if not args.target:
        what = (
            "a student run directory"
            if kind == "gates"
            else "a results CSV, an eval or sweep results directory, or a sweep YAML file"
        )
        raise ConfigError(f"`moedistill report {kind}` needs a TARGET: {what}")
    if kind == "gates":
        from pipeline.reports.gates import format_gate_table, write_gate_report

        loads, md, png = write_gate_report(args.target, args.out)
        for g in loads:
            print(format_gate_table(g))
        return _done([md, png])
    if kind == "results":
        from pipeline.evaluate.results import collect_results, format_results_markdown, write_results_table

        target = Path(args.target)
        if target.suffix in (".yaml", ".yml"):
            target = _sweep_results(target)
        rows = collect_results(target)
        out = Path(args.out) if args.out else (target.parent if target.is_file() else target)
        print(format_results_markdown(rows))
        return _done(list(write_results_table(rows, out)))
    raise ConfigError(f"unknown report kind {kind!r}; choose storage, gates or results")


def _sweep_results(sweep_file: Path) -> Path:
    """A sweep YAML -> the results.csv `moedistill ablate` wrote for it (<output_dir>/sweeps/<name>/)."""
    from pipeline.sweep import load_sweep, sweep_results_dir

    sweep = load_sweep(sweep_file)
    csv_path = sweep_results_dir(sweep) / "results.csv"
    if not csv_path.is_file():
        raise DataError(
            f"sweep {sweep.name} has no results yet: {csv_path} does not exist. Fix: run "
            f"`moedistill ablate --config {sweep_file}` first (with `evaluate: true` in the sweep file)."
        )
    return csv_path


def _storage(args: argparse.Namespace) -> list[Path]:
    from pipeline.reports.storage import (
        format_storage_report,
        measure_store,
        project_from_config,
        write_storage_report,
    )

    tokens = getattr(args, "tokens", None)
    price = getattr(args, "usd_per_gb_month", 0.023)
    if args.config and args.target:
        raise ConfigError("`report storage` takes a cache PATH or --config CONFIG, not both")
    if args.config:
        from pipeline.config import load_config
        from pipeline.placement import warn_job_local_paths
        from pipeline.workspace import paths_for

        config = load_config(args.config)
        warn_job_local_paths({"output_dir": str(config.out)})  # a projection writes no cache
        report = project_from_config(config, tokens, price, source=f"config {args.config}")
        out = Path(args.out) if args.out else paths_for(config).reports / "storage"
        stem = "storage-projection"
    elif args.target:
        report = measure_store(args.target, tokens, price)
        # Never inside the store (its bytes are what we measure) and always local (stores may be on s3://).
        out = Path(args.out) if args.out else Path("reports") / "storage" / report.dims["key"]
        stem = "storage"
    else:
        raise ConfigError(
            "`moedistill report storage` needs a cache PATH (a built store) or --config CONFIG (a projection)"
        )
    print(format_storage_report(report))
    return _done(list(write_storage_report(report, out, stem=stem)))


def _done(paths: list[Path]) -> list[Path]:
    print("wrote " + ", ".join(str(p) for p in paths))
    return paths
