"""`moedistill`: one subcommand per stage. Each stage's logic lives in its own module; this file only
parses arguments, connects to Ray and prints results. Errors users can act on print without a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from pipeline.errors import MoeDistillError


def load_cli_config(args: argparse.Namespace):
    """--config plus --set overrides, as every stage's subcommand reads them."""
    from pipeline.config import load_config
    from pipeline.placement import warn_if_job_local

    overrides = dict(_parse_override(o) for o in (getattr(args, "set", None) or []))
    config = load_config(args.config, overrides)
    warn_if_job_local(config)  # relative output paths under `ray job submit` land in a temporary dir
    return config


def _parse_override(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text:
        raise MoeDistillError(f"--set expects KEY=VALUE (e.g. distill.k=2), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def cmd_finetune_teacher(args: argparse.Namespace) -> None:
    from pipeline.finetune.stage import format_finetune_result, run_finetune
    from pipeline.ray_session import connect

    config = load_cli_config(args)
    connect()
    print(format_finetune_result(run_finetune(config, force=args.force)))


def cmd_cache(args: argparse.Namespace) -> None:
    from pipeline.cache import cli as cache_cli

    cache_cli.run(args, load_cli_config)


def cmd_distill(args: argparse.Namespace) -> None:
    from pipeline.distill.stage import format_distill_result, run_distill
    from pipeline.ray_session import connect

    config = load_cli_config(args)
    connect()
    print(format_distill_result(run_distill(config)))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pipeline.evaluate.stage import run_evaluate_cli

    run_evaluate_cli(args, load_cli_config(args))


def cmd_ablate(args: argparse.Namespace) -> None:
    from pipeline.sweep import run_ablate_cli

    run_ablate_cli(args)


def cmd_report(args: argparse.Namespace) -> None:
    from pipeline.reports.cli import run_report_cli

    run_report_cli(args)


def cmd_demo(args: argparse.Namespace) -> None:
    from pipeline.flows import run_demo_cli

    run_demo_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moedistill", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name: str, func: Callable, help_text: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config:
            p.add_argument("--config", required=True, help="YAML preset, e.g. jobs/configs/demo.yaml")
            p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. distill.k=2")
        p.set_defaults(func=func)
        return p

    ft = stage("finetune-teacher", cmd_finetune_teacher, "SFT of the MoE teacher with Ray Train")
    ft.add_argument("--force", action="store_true", help="retrain even if a finished export exists")

    cache = sub.add_parser(
        "cache",
        help="build, verify or list teacher caches",
        description="`cache --config C` builds (or resumes) the teacher cache; "
        "`cache verify PATH` re-checks a store; `cache ls ROOT` lists caches.",
    )
    cache.add_argument("action", nargs="?", default="build", choices=["build", "verify", "ls"])
    cache.add_argument("target", nargs="?", help="cache path (verify) or cache root (ls)")
    cache.add_argument("--config", help="YAML preset (build)")
    cache.add_argument("--set", action="append", metavar="KEY=VALUE")
    cache.set_defaults(func=cmd_cache)

    stage("distill", cmd_distill, "distil a student from the teacher cache with Ray Train")
    ev = stage("evaluate", cmd_evaluate, "generate + Rouge-L for the teacher and/or students")
    ev.add_argument(
        "--model",
        action="append",
        metavar="NAME=PATH",
        help="checkpoint(s) to evaluate; default: the config's teacher and every exported student",
    )

    ab = sub.add_parser("ablate", help="sweep student runs over one teacher cache")
    ab.add_argument("--config", required=True, help="sweep YAML (see jobs/configs/demo-sweep.yaml)")
    ab.set_defaults(func=cmd_ablate)

    rep = sub.add_parser("report", help="storage cost, gate heat maps, results tables")
    rep.add_argument("kind", choices=["storage", "gates", "results"])
    rep.add_argument(
        "target", nargs="?", help="cache path (storage), run dir (gates), sweep file/dir (results)"
    )
    rep.add_argument("--config", help="project storage from a config alone (storage)")
    rep.add_argument("--tokens", type=float, default=None, help="projected token count (storage)")
    rep.add_argument("--usd-per-gb-month", type=float, default=0.023, help="storage price (storage)")
    rep.add_argument("--out", help="output folder for PNG/markdown (default: beside the target)")
    rep.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="the whole pipeline on the embedded demo, offline, on a CPU")
    demo.add_argument("--config", default="jobs/configs/demo.yaml")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE")
    demo.add_argument("--stages", default="all", help="comma list: finetune,cache,distill,evaluate,report")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except MoeDistillError as exc:
        print(f"moedistill: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "moedistill: interrupted; rerun the same command to resume from committed work", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
