"""`moedistill cache [build|verify|ls]`: argument handling only; the work is in stage/verify."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pipeline.config import Config
from pipeline.errors import ConfigError


def run(args: argparse.Namespace, load_config: Callable[[argparse.Namespace], Config]) -> None:
    if args.action == "build":
        from pipeline.cache.stage import format_cache_info, run_cache
        from pipeline.ray_session import connect

        if not args.config:
            raise ConfigError(
                "`moedistill cache` needs a config to build from. Fix: pass --config C (or run `cache "
                "verify PATH` / `cache ls ROOT`)."
            )
        config = load_config(args)
        connect()
        print(format_cache_info(run_cache(config)))
        return
    if not args.target:
        what = "a cache directory (ROOT/<key>)" if args.action == "verify" else "a cache root"
        raise ConfigError(
            f"`moedistill cache {args.action}` needs {what}. Fix: `moedistill cache {args.action} PATH`."
        )
    if args.action == "verify":
        from pipeline.cache.verify import format_verify_report, verify_cache

        report = verify_cache(args.target)
        print(format_verify_report(report))
        if not report.ok:
            sys.exit(1)
        return
    from pipeline.cache.verify import format_cache_list, list_caches

    print(format_cache_list(list_caches(args.target)))
