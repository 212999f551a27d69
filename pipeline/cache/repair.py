"""`moedistill cache repair PATH --config C`: make a damaged cache whole again with the least teacher work.

0. A missing or damaged low-rank state basis is refitted from its seeded sample and must match the bytes the
   manifest records (else nothing is written).
1. A manifest that is missing or unreadable is rebuilt from the config (key, inputs, teacher dims: what a
   build would write) and the shards' commit markers (the layout they were written with).
2. A full verify (sizes, sha256, schema, commit markers) finds the damaged shards; they are un-committed.
3. The ordinary build resumes: it asks the teacher for exactly the uncommitted shards' records, with the
   layout stored in the manifest, so the rebuilt shards are byte-identical to the lost ones.
4. A final verify must pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeline import storage as cfs
from pipeline.cache.build.basis import restore_state_basis
from pipeline.cache.build.builder import (
    build_teacher_cache,
    cache_path_for,
    layout_settings,
    manifest_sources,
)
from pipeline.cache.format.manifest import (
    infer_rows_per_shard,
    new_manifest,
    read_manifest,
    reopen_manifest,
    write_manifest,
)
from pipeline.cache.format.shard import committed_shards
from pipeline.cache.format.side_files import fidelity_problems
from pipeline.cache.format.spec import CacheInfo
from pipeline.cache.integrity.checks import uncommit_shards, uncommitted_shard_dirs
from pipeline.cache.integrity.verify import VerifyReport, format_verify_report, verify_cache
from pipeline.cache.stage import (
    cache_runtime_from_config,
    cache_spec_from_config,
    remember_cache,
    teacher_checkpoint,
)
from pipeline.config import Config
from pipeline.data.stage import prepare_data
from pipeline.errors import CacheError
from pipeline.locks import DirectoryLock

log = logging.getLogger(__name__)


@dataclass
class RepairResult:
    path: str
    manifest_rebuilt: bool
    rebuilt_shards: list[int] = field(default_factory=list)
    fidelity_recomputed: bool = False
    basis_restored: bool = False
    info: CacheInfo | None = None
    report: VerifyReport | None = None


def repair_cache(config: Config, path: str | None = None) -> RepairResult:
    """Repair the cache of `config` (at `path`, default: where the config's cache lives); CacheError when
    `path` holds another config's cache or the final verify fails."""
    prepared = prepare_data(config)
    records, heldout = prepared.splits.train, prepared.splits.validation
    spec = cache_spec_from_config(config, teacher_checkpoint(config), prepared.tokenizer_path)
    runtime = cache_runtime_from_config(config)
    url, key, inputs, teacher, width = cache_path_for(spec, records, config.cache.root, heldout)
    path = (path or url).rstrip("/")
    name = path.rsplit("/", 1)[-1]
    if name != key:
        raise CacheError(
            f"{cfs.redact(path)} is not this config's cache: the config's teacher, data and cache settings "
            f"give key {key}, the directory is {name!r}. Fix: pass the config that built that cache, or the "
            f"directory `moedistill cache ls` lists for this one."
        )
    root = path[: -len(name)].rstrip("/") or "/"
    result = RepairResult(path=path, manifest_rebuilt=False)
    with DirectoryLock(path):
        try:
            manifest = read_manifest(path)
        except CacheError as e:
            log.warning("%s; rebuilding it from the shards' commit markers", e.args[0].split(". Fix:")[0])
            manifest = None
        if manifest is not None and manifest.get("key") != key:
            manifest = None  # renamed or overwritten: rebuild from the commits, which the verify then checks
        if manifest is None:
            commits = committed_shards(path)
            settings = layout_settings(runtime)
            rows = infer_rows_per_shard(commits, settings.pop("rows_per_shard"))
            manifest = new_manifest(
                key, inputs, manifest_sources(spec), teacher, rows, len(records), settings
            )
            write_manifest(path, manifest)
            result.manifest_rebuilt = True
        # The basis is seeded and deterministic: refit it, byte-identical, before the verify below counts it
        # (and before anything touches the manifest, which a failed refit leaves as it was).
        result.basis_restored = restore_state_basis(path, manifest, spec, records, width, runtime)
        # A shard directory without its commit marker would block the rebuilt copy's rename: remove it.
        uncommit_shards(path, uncommitted_shard_dirs(path))
        damaged = verify_cache(path).damaged
        if damaged:
            log.warning("cache repair: rebuilding damaged shards %s of %s", damaged, cfs.redact(path))
            uncommit_shards(path, damaged)
            if manifest["complete"]:
                reopen_manifest(path, manifest)
        if fidelity_problems(path, manifest):  # no shard depends on it: the resumed build recomputes it
            log.warning("cache repair: recomputing the fidelity sample of %s", cfs.redact(path))
            manifest = {k: v for k, v in manifest.items() if k != "states_fidelity"}
            if manifest["complete"]:
                manifest = reopen_manifest(path, manifest)
            else:
                write_manifest(path, manifest)
            result.fidelity_recomputed = True
        committed = committed_shards(path)
        result.rebuilt_shards = [i for i in range(manifest["layout"]["num_shards"]) if i not in committed]
    # The build takes the lock itself; it resumes the reopened manifest (teacher work: uncommitted shards).
    result.info = build_teacher_cache(spec, records, root, runtime, heldout=heldout)
    if root == config.cache.root.rstrip("/"):
        remember_cache(config, result.info)
    result.report = verify_cache(path)
    if not result.report.ok:
        raise CacheError(
            f"cache repair of {cfs.redact(path)} did not end with a passing verify:\n"
            f"{format_verify_report(result.report)}\nFix: delete the cache directory and rebuild it with "
            "`moedistill cache --config ...`."
        )
    return result


def format_repair_result(result: RepairResult) -> str:
    done = []
    if result.manifest_rebuilt:
        done.append("manifest rebuilt from the commit markers")
    if result.rebuilt_shards:
        done.append(f"shards {result.rebuilt_shards} rebuilt")
    if result.fidelity_recomputed:
        done.append("fidelity sample recomputed")
    if result.basis_restored:
        done.append("state basis refitted (byte-identical)")
    head = f"repaired teacher cache {cfs.redact(result.path)}: " + ("; ".join(done) or "nothing was damaged")
    assert result.report is not None
    return f"{head}\n{format_verify_report(result.report)}"
