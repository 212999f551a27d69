"""`moedistill`: every subcommand's arguments and dispatch, in one table (SUBCOMMANDS).

Stage modules expose `run_<stage>(config, ...)` and return results; this file parses arguments, loads the
config, connects to Ray where a stage needs it and prints what came back. Errors users can act on print as
one line without a traceback (exit code 2); `cache verify` exits 1 when the store is damaged.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipeline.config import Config, load_config
from pipeline.console import configure as configure_console
from pipeline.console import log_traceback
from pipeline.errors import ConfigError, DataError, MoeDistillError, root_cause
from pipeline.network import hub_load_kwargs
from pipeline.ray_session import connect
from pipeline.workspace import config_output_paths, warn_if_job_local, warn_job_local_paths

if TYPE_CHECKING:  # the evaluation stage imports Ray Data and torch
    from pipeline.evaluate.stage import EvalResults

# Heavy stage modules (torch, transformers, Ray) are imported inside the command that runs them, so
# `moedistill --help`, `cache verify` and `report` start in a fraction of a second.


def load_cli_config(args: argparse.Namespace) -> Config:
    """--config plus --set overrides, as every stage's subcommand reads them."""
    given = getattr(args, "set", None) or []
    overrides = dict(_parse_override(o) for o in given)
    config = load_config(args.config)  # the file alone: its own errors name it
    if overrides:  # it loaded, so an error from here on is caused by the overrides
        try:
            config = load_config(args.config, overrides)
        except ConfigError as exc:
            reason = str(exc).removeprefix(f"{Path(args.config)}: ")
            shown = " ".join(f"--set {o}" for o in given)
            raise ConfigError(f"{shown} (applied to {args.config}): {reason}") from None
    warn_if_job_local(config)  # relative output paths under `ray job submit` land in a temporary dir
    from pipeline.storage import register_secrets  # why here: as in main(), fsspec only once a command runs

    model_paths = (config.teacher.path or "", config.student.path or "")
    register_secrets(*config_output_paths(config).values(), *model_paths)
    return config


def check_data(config: Config) -> None:
    """Records, splits and tokenizer ready (the demo's generated) before Ray starts: a data problem is an
    error in seconds, not after a cluster started. Every stage reuses what this prepares. Hub ids among the
    model sources are resolved first: an offline machine names the setting in seconds."""
    from pipeline.data.stage import prepare_data  # why here: the tokenizer code imports transformers

    for role in ("teacher", "student"):
        model = getattr(config, role)
        for key in ("path", "upcycle_from"):
            if getattr(model, key) is not None:
                hub_load_kwargs(getattr(model, key), f"{role}.{key}")
    if config.tokenizer.path is not None:
        hub_load_kwargs(config.tokenizer.path, "tokenizer.path")
    prepared = prepare_data(config)
    from pipeline.data.stage import load_tokenizer  # why here: as above
    from pipeline.data.tokenize import check_some_record_fits  # why here: as above

    tokenizer = load_tokenizer(prepared.tokenizer_path)
    check_some_record_fits(tokenizer, prepared.splits.train, config.data.max_length, "training split")


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise MoeDistillError(f"--set expects KEY=VALUE (e.g. distill.k=2), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


# --- commands -----------------------------------------------------------------------------------------------
def cmd_finetune_teacher(args: argparse.Namespace) -> None:
    config = load_cli_config(args)
    check_data(config)  # before the stage's torch import: a bad input fails in seconds
    # why: each command imports only its own stage, after the input checks (`--help` stays fast)
    from pipeline.finetune.stage import format_finetune_result, run_finetune

    connect(output_dir=config.out)
    print(format_finetune_result(run_finetune(config, force=args.force)))


def cmd_cache(args: argparse.Namespace) -> None:
    if args.action == "build":
        if not args.config:
            raise ConfigError(
                "`moedistill cache` needs a config to build from. Fix: pass --config C (or run `cache "
                "verify PATH` / `cache ls ROOT`)."
            )
        config = load_cli_config(args)
        check_data(config)  # before the stage's torch import: a bad input fails in seconds
        # why: each command imports only its own stage, after the input checks (`--help` stays fast)
        from pipeline.cache.stage import format_cache_info, run_cache, teacher_checkpoint, teacher_dims

        # no fine-tuned teacher, or one the adapter cannot read: the error before Ray starts
        teacher_dims(teacher_checkpoint(config))
        connect(output_dir=config.out)
        print(format_cache_info(run_cache(config)))
        return
    if args.action == "repair":
        # why: repair builds (torch, Ray); verify and ls below need neither
        from pipeline.cache.repair import format_repair_result, repair_cache

        if not args.config:
            raise ConfigError(
                "`moedistill cache repair` rebuilds damaged shards with the teacher and data of the config "
                "that built the cache. Fix: `moedistill cache repair PATH --config C`."
            )
        config = load_cli_config(args)
        check_data(config)
        connect(output_dir=config.out)
        print(format_repair_result(repair_cache(config, args.target)))
        return
    if not args.target:
        what = "a cache directory (ROOT/<key>)" if args.action == "verify" else "a cache root"
        raise ConfigError(
            f"`moedistill cache {args.action}` needs {what}. Fix: `moedistill cache {args.action} PATH`."
        )
    # why: only `cache verify|ls` load the cache format (torch, pyarrow)
    from pipeline.cache.integrity.verify import format_verify_report, verify_cache
    from pipeline.cache.read.listing import format_cache_list, list_caches

    if args.action == "verify":
        report = verify_cache(args.target)
        print(format_verify_report(report))
        if not report.ok:
            sys.exit(1)
        return
    print(format_cache_list(list_caches(args.target)))


def cmd_distill(args: argparse.Namespace) -> None:
    # why: only the commands that check a method or read sweep files import pipeline.sweep
    from pipeline.sweep import check_method

    config = load_cli_config(args)
    check_method(config, where="distill.method")  # before Ray starts
    check_data(config)  # before the stage's torch import: a bad input fails in seconds
    # why: each command imports only its own stage, after the input checks (`--help` stays fast)
    from pipeline.distill.stage import format_distill_result, run_distill
    from pipeline.models.stage import check_student_readable

    check_student_readable(config.student)  # a student the adapter cannot read: before Ray starts
    connect(output_dir=config.out)
    print(format_distill_result(run_distill(config)))


def cmd_evaluate(args: argparse.Namespace) -> None:
    evaluate_models(load_cli_config(args), args.model)


def evaluate_models(config: Config, model_specs: list[str] | None) -> EvalResults:
    """`moedistill evaluate`: `--model NAME=PATH` specs (default: the teacher and every finished student)."""
    # why: each command imports only its own stage, after the input checks (`--help` stays fast)
    from pipeline.evaluate.stage import check_models, default_models, parse_model_args, run_evaluate

    models = parse_model_args(model_specs) if model_specs else default_models(config)
    check_models(config, models)  # fail before starting Ray
    connect(output_dir=config.out)
    results = run_evaluate(config, models)
    print(results.markdown())
    print(f"wrote {results.csv_path}, {results.md_path}, {results.png_path}")
    for name, d in results.model_dirs.items():
        print(f"  {name}: {d / 'predictions.jsonl'}")
    return results


def cmd_ablate(args: argparse.Namespace) -> None:
    # why: the flows import every stage; only `ablate` and `demo` run them
    from pipeline.flows import run_ablate

    run_ablate(args.config)


def cmd_demo(args: argparse.Namespace) -> None:
    # why: as in cmd_ablate
    from pipeline.flows import STAGES, run_demo

    config = load_cli_config(args)
    stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(","))
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ConfigError(f"unknown demo stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    run_demo(config, stages)


def cmd_report(args: argparse.Namespace) -> list[Path]:
    """Each report writes a markdown file and a PNG and prints its text; returns the written files."""
    report = REPORTS[args.kind]
    if report.needs_target and not args.target:
        raise ConfigError(f"`moedistill report {args.kind}` needs a TARGET: {report.target}")
    return _done(report.run(args))


def _report_states_fidelity(args: argparse.Namespace) -> list[Path]:
    # why: each report loads only for its own `report KIND`
    from pipeline.reports.fidelity import format_fidelity, states_fidelity, write_fidelity

    sequences = 16 if args.sequences is None else args.sequences
    fidelity = states_fidelity(args.target, sequences, args.teacher, args.source)
    print(format_fidelity(fidelity))
    key = fidelity.path.rstrip("/").rsplit("/", 1)[-1]
    return [write_fidelity(fidelity, args.out or Path("reports") / "states-fidelity" / key)]


def _report_teacher_labels(args: argparse.Namespace) -> list[Path]:
    # why: each report loads only for its own `report KIND`
    from pipeline.reports.teacher_labels import format_teacher_labels, teacher_labels, write_teacher_labels

    report = teacher_labels(args.target, args.sequences)
    print(format_teacher_labels(report))
    key = report.cache.rstrip("/").rsplit("/", 1)[-1]
    out = Path(args.out) if args.out else Path("reports") / "teacher-labels" / key
    return [write_teacher_labels(report, out)]


def _report_router_sharpness(args: argparse.Namespace) -> list[Path]:
    # why: each report loads only for its own `report KIND`
    from pipeline.reports.router_sharpness import format_sharpness, router_sharpness, write_sharpness

    if not args.config:
        raise ConfigError("`moedistill report router-sharpness` needs --config CONFIG (teacher and data)")
    config = load_cli_config(args)
    sequences = 256 if args.sequences is None else args.sequences
    report = router_sharpness(config, sequences, args.teacher)
    print(format_sharpness(report))
    return [write_sharpness(report, args.out or Path("reports") / "router-sharpness" / config.name)]


def _report_terms(args: argparse.Namespace) -> list[Path]:
    # why: each report loads only for its own `report KIND`
    from pipeline.reports.terms import write_terms_report

    md, png = write_terms_report(args.target, args.out)
    print(md.read_text())
    return [md, png]


def _report_gates(args: argparse.Namespace) -> list[Path]:
    # why: each report loads only for its own `report KIND`
    from pipeline.reports.gates import format_gate_table, write_gate_report

    loads, md, png = write_gate_report(args.target, args.out)
    for g in loads:
        print(format_gate_table(g))
    return [md, png]


def _report_results(args: argparse.Namespace) -> list[Path]:
    # why: each report loads only for its own `report KIND`
    from pipeline.evaluate.results import collect_results, format_results_markdown, write_results_table

    target = Path(args.target)
    if target.suffix in (".yaml", ".yml"):
        target = _sweep_results(target)
    rows = collect_results(target)
    out = Path(args.out) if args.out else (target.parent if target.is_file() else target)
    print(format_results_markdown(rows))
    return list(write_results_table(rows, out))


def _sweep_results(sweep_file: Path) -> Path:
    """A sweep YAML -> the results.csv `moedistill ablate` wrote for it (<output_dir>/sweeps/<name>/)."""
    # why: as in cmd_distill
    from pipeline.sweep import load_sweep, sweep_results_dir

    sweep = load_sweep(sweep_file)
    csv_path = sweep_results_dir(sweep) / "results.csv"
    if not csv_path.is_file():
        raise DataError(
            f"sweep {sweep.name} has no results yet: {csv_path} does not exist. Fix: run "
            f"`moedistill ablate --config {sweep_file}` first (with `evaluate: true` in the sweep file)."
        )
    return csv_path


def _report_sample_divergence(args: argparse.Namespace) -> list[Path]:
    """The sweep's base config gives the validation data; its results.csv the models (teacher included)."""
    # why: as in _sweep_results
    from pipeline.sweep import load_sweep

    target = Path(args.target)
    if target.suffix not in (".yaml", ".yml"):
        raise ConfigError(
            f"`moedistill report sample-divergence` takes a sweep YAML file, got {target}. Fix: pass the "
            "file given to `moedistill ablate --config`."
        )
    sweep = load_sweep(target)
    results_csv = _sweep_results(target)
    config = load_config(sweep.base, sweep.overrides)
    # why: each report loads only for its own `report KIND`
    from pipeline.reports.sample_divergence import run_sample_divergence

    out = Path(args.out) if args.out else None
    return run_sample_divergence(config, results_csv, args.limit, args.device, out)


def _report_storage(args: argparse.Namespace) -> list[Path]:
    # why: each report loads only for its own `report KIND`
    from pipeline.reports.storage import format_storage_report, write_storage_report
    from pipeline.reports.storage_measure import measure_store
    from pipeline.reports.storage_projection import project_from_config

    if args.config and args.target:
        raise ConfigError("`report storage` takes a cache PATH or --config CONFIG, not both")
    if args.config:
        config = load_config(args.config)
        warn_job_local_paths({"output_dir": str(config.out)})  # a projection writes no cache
        report = project_from_config(
            config, args.tokens, args.usd_per_gb_month, source=f"config {args.config}"
        )
        # Local, never under the preset's output_dir: that is a cluster path (/mnt/shared/...) on a laptop.
        out = Path(args.out) if args.out else Path("reports") / "storage-projection" / config.name
        stem = "storage-projection"
    elif args.target:
        report = measure_store(args.target, args.tokens, args.usd_per_gb_month)
        # Never inside the store (its bytes are what we measure) and always local (stores may be on s3://).
        out = Path(args.out) if args.out else Path("reports") / "storage" / report.dims["key"]
        stem = "storage"
    else:
        raise ConfigError(
            "`moedistill report storage` needs a cache PATH (a built store) or --config CONFIG (a projection)"
        )
    print(format_storage_report(report))
    return list(write_storage_report(report, out, stem=stem))


@dataclass(frozen=True)
class Report:
    """One `moedistill report KIND`: what it runs and what its TARGET names (for the error without one)."""

    run: Callable[[argparse.Namespace], list[Path]]
    target: str
    needs_target: bool = True  # storage also projects from --config alone


REPORTS: dict[str, Report] = {
    "storage": Report(_report_storage, "a cache PATH or --config CONFIG", needs_target=False),
    "gates": Report(_report_gates, "a student run directory"),
    "terms": Report(_report_terms, "a student run directory"),
    "results": Report(
        _report_results, "a results CSV, an eval or sweep results directory, or a sweep YAML file"
    ),
    "states-fidelity": Report(_report_states_fidelity, "a teacher cache directory"),
    "teacher-labels": Report(_report_teacher_labels, "a teacher cache directory"),
    "router-sharpness": Report(_report_router_sharpness, "--config CONFIG", needs_target=False),
    "sample-divergence": Report(_report_sample_divergence, "a sweep YAML file whose sweep has finished"),
}


def _done(paths: list[Path]) -> list[Path]:
    print("wrote " + ", ".join(str(p) for p in paths))
    return paths


# --- the table of subcommands -------------------------------------------------------------------------------
def _config_args(p: argparse.ArgumentParser, required: bool = True, default: str | None = None) -> None:
    p.add_argument(
        "--config", required=required, default=default, help="YAML preset, e.g. jobs/configs/demo.yaml"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. distill.k=2")


def _finetune_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--force", action="store_true", help="retrain even if a finished export exists")


def _cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", default="build", choices=["build", "verify", "ls", "repair"])
    p.add_argument("target", nargs="?", help="cache path (verify, repair) or cache root (ls)")
    _config_args(p, required=False)


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument(
        "--model",
        action="append",
        metavar="NAME=PATH",
        help="checkpoint(s) to evaluate; default: the config's teacher and every exported student",
    )


def _ablate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="sweep YAML (see jobs/configs/demo-sweep.yaml)")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=list(REPORTS))
    p.add_argument(
        "target", nargs="?", help="cache path (storage), run dir (gates, terms), sweep file/dir (results)"
    )
    p.add_argument(
        "--config",
        help="project storage from a config alone (storage); the teacher and data (router-sharpness)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (router-sharpness)")
    p.add_argument("--tokens", type=float, default=None, help="projected token count (storage)")
    p.add_argument("--usd-per-gb-month", type=float, default=0.023, help="storage price (storage)")
    p.add_argument(
        "--source",
        choices=["auto", "stored", "teacher", "teacher-on-sample"],
        default="auto",
        help="exact states (states-fidelity): the held-out sample stored at cache time, a teacher rerun over "
        "cached sequences, or over the stored sample; auto = stored if the cache keeps one, else teacher",
    )
    p.add_argument(
        "--sequences",
        type=int,
        default=None,
        help="cached sequences compared (states-fidelity, teacher: 16), measured (router-sharpness: 256) or "
        "read (teacher-labels: all)",
    )
    p.add_argument(
        "--teacher",
        help="teacher checkpoint, default: the cache's (states-fidelity), the config's fine-tuned one "
        "(router-sharpness)",
    )
    p.add_argument(
        "--limit", type=int, default=128, help="validation records each model samples (sample-divergence)"
    )
    p.add_argument("--device", default="cpu", help="torch device of the models (sample-divergence)")
    p.add_argument("--out", help="output folder for PNG/markdown (default: beside the target)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    _config_args(p, required=False, default="jobs/configs/demo.yaml")
    p.add_argument("--stages", default="all", help="comma list: finetune,cache,distill,evaluate,report")


@dataclass(frozen=True)
class Subcommand:
    name: str
    run: Callable[[argparse.Namespace], object]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    help: str
    description: str | None = None


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "finetune-teacher", cmd_finetune_teacher, _finetune_args, "SFT of the MoE teacher with Ray Train"
    ),
    Subcommand(
        "cache",
        cmd_cache,
        _cache_args,
        "build, verify, repair or list teacher caches",
        "`cache --config C` builds (or resumes) the teacher cache; `cache verify PATH` re-checks a store; "
        "`cache repair PATH --config C` rebuilds its damaged parts; `cache ls ROOT` lists caches.",
    ),
    Subcommand(
        "distill", cmd_distill, _config_args, "distil a student from the teacher cache with Ray Train"
    ),
    Subcommand(
        "evaluate", cmd_evaluate, _evaluate_args, "generate + Rouge-L for the teacher and/or students"
    ),
    Subcommand("ablate", cmd_ablate, _ablate_args, "sweep student runs over one teacher cache"),
    Subcommand("report", cmd_report, _report_args, "storage cost, gate heat maps, results tables"),
    Subcommand("demo", cmd_demo, _demo_args, "the whole pipeline on the embedded demo, offline, on a CPU"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moedistill", description=__doc__)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging; Ray's worker logs live (else: a file)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors inside Ray tasks")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description or command.help)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_console(args.command, verbose=args.verbose)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    # why: fsspec (behind pipeline.storage) doubles the import time of `moedistill --help`
    from pipeline.storage import RedactingFilter, redact, register_secrets

    register_secrets(*(argv if argv is not None else sys.argv[1:]))  # URL credentials on the command line
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())  # no credentials of cache URLs in logs
    try:
        args.func(args)
    except MoeDistillError as exc:
        print(f"moedistill: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "moedistill: interrupted; rerun the same command to resume from committed work", file=sys.stderr
        )
        return 130
    except Exception as exc:
        if _from_ray(exc) and not args.debug:
            return _print_ray_failure(exc)
        return _print_unexpected(exc, args.debug)
    return 0


_STORAGE_LIBRARIES = {"fsspec", "s3fs", "botocore", "aiobotocore", "gcsfs", "adlfs"}


def _print_unexpected(exc: BaseException, debug: bool) -> int:
    """An error the project did not raise itself (a storage backend's, a library's, a bug): never with URL
    credentials in it. A storage error (an OSError, or a storage library's) is one line naming its cause;
    anything else keeps its traceback, redacted, so a bug stays reportable."""
    import traceback

    from pipeline.storage import redact  # why: as in main()

    storage = _storage_error(exc)
    if storage is not None and not debug:
        print(
            f"moedistill: error: {type(storage).__name__}: {redact(str(storage))}. Fix: check that path or "
            f"URL, its credentials, its free space and that its storage answers; {_where_traceback(exc)}.",
            file=sys.stderr,
        )
        return 1
    print(redact("".join(traceback.format_exception(exc))).rstrip(), file=sys.stderr)
    return 1


def _storage_error(exc: BaseException) -> BaseException | None:
    """The storage error behind `exc` (an OSError such as a full disk, or a storage library's), following
    its chain of causes (a cleanup step may raise while the first error is handled), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) or type(current).__module__.split(".")[0] in _STORAGE_LIBRARIES:
            return current
        current = current.__cause__ or current.__context__
    return None


def _from_ray(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("ray.")


def _print_ray_failure(exc: BaseException) -> int:
    """One screen for an exception that escaped a Ray task: the user's own error when one is inside, else
    the remote root cause."""
    from pipeline.storage import redact  # why: as in main()
    from pipeline.training.runner import find_user_error  # why: Ray Train, only after a Ray task failed

    user_error = find_user_error(exc)
    where = _where_traceback(exc)
    if user_error is not None:
        print(f"moedistill: error: {redact(str(user_error))}", file=sys.stderr)
        return 2
    print(
        f"moedistill: error: a Ray task failed: {redact(root_cause(exc))}. Fix: remove that cause and rerun "
        f"the same command (committed work is kept); {where}.",
        file=sys.stderr,
    )
    return 1


def _where_traceback(exc: BaseException) -> str:
    """Where the user finds the traceback: written (redacted) to the run log when there is one."""
    import traceback

    from pipeline.storage import redact  # why: as in main()

    path = log_traceback(redact("".join(traceback.format_exception(exc))))
    shown = "`moedistill --debug ...` shows it here"
    return f"the traceback is in {path} ({shown})" if path else shown.replace("it here", "the traceback")


if __name__ == "__main__":
    sys.exit(main())
