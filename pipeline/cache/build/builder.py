"""build_teacher_cache: the Ray Data teacher stage, from records to a complete, content-addressed store.

    one row per pending shard (records)  --map_batches, CPU tasks-->  tokenised shard rows
      --map_batches(TeacherShardStage, ActorPoolStrategy(size=n), num_gpus, resources)-->  one row per shard
      --write_datasink(TeacherCacheDatasink)-->  shards committed one by one  --driver-->  manifest.json

Resume is by construction: committed shards are filtered out of the input before the pipeline runs, and
shards are deterministic, so a resumed store is byte-identical to an uninterrupted one. What else decides the
bytes without being content (shard size, micro-batch size, torch thread count: STORED_LAYOUT) is recorded in
the manifest layout by the first build and forced from there on every resume, with a note when the config
asks for something else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy
from tqdm.auto import tqdm

from pipeline import storage as cfs
from pipeline.cache.build.basis import actor_threads, ensure_state_basis
from pipeline.cache.build.fidelity import ensure_fidelity_sample
from pipeline.cache.build.sink import ProgressActor, ProgressBar, TeacherCacheDatasink
from pipeline.cache.build.teacher import TeacherShardStage, compute_shard, tokenize_shard
from pipeline.cache.format.key import cache_key, key_inputs
from pipeline.cache.format.manifest import finalize_manifest, new_manifest, read_manifest, write_manifest
from pipeline.cache.format.shard import ShardMeta, commit_shard, committed_shards, remove_staging
from pipeline.cache.format.spec import CacheInfo, CacheRuntime, CacheSpec
from pipeline.cache.integrity.checks import reopen_if_damaged
from pipeline.data.records import Record
from pipeline.data.stage import load_tokenizer
from pipeline.errors import CacheError, ConfigError, root_cause
from pipeline.locks import DirectoryLock
from pipeline.models.adapter import SUPPORTED_MODEL_TYPES, check_adapter_reads
from pipeline.models.dims import read_dims
from pipeline.placement import teacher_actor_options

logger = logging.getLogger(__name__)

# Tokenise and write tasks are light next to the teacher; small CPU requests keep them schedulable while the
# teacher actors hold whole CPUs (a 2-CPU test cluster with 2 CPU actors would otherwise starve them).
_LIGHT_TASK_CPUS = 0.25


def teacher_dims(teacher_path: str) -> dict[str, Any]:
    """The manifest's teacher record (model type, MoE layer/expert counts, sizes, and `moe_layers`: the
    decoder layers of the MoE layers where some are dense), from the teacher's config: the weights stay
    unloaded. A model the adapter cannot read is refused here, before Ray starts."""
    dims = read_dims(teacher_path, role="teacher", fix="check teacher_path.")
    if dims.num_experts is None:
        raise ConfigError(
            f"teacher {teacher_path!r} is a {dims.model_type!r} model; the cache stage supports MoE models: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (docs/model-families.md). Fix: point teacher_path at an MoE "
            "checkpoint of one of these types (pipeline.models.upcycle turns a dense Qwen3/Llama into one)."
        )
    check_adapter_reads(dims, teacher_path, "teacher")
    return dims.as_dict()


def resolve_width(spec: CacheSpec, teacher: dict[str, Any]) -> int:
    e_t, l_t = teacher["num_experts"], teacher["num_layers"]
    bad_layers = [i for i in spec.cached_layers if not 0 <= i < l_t]
    if bad_layers:
        raise ConfigError(
            f"cached_layers {bad_layers} are out of range: the teacher has {l_t} MoE layers (0-based "
            f"0..{l_t - 1}). Fix: list layers in 0..{l_t - 1} (or use cache.layers: paired / all)."
        )
    width = e_t if spec.width is None else spec.width
    if not 1 <= width <= e_t:
        raise ConfigError(
            f"cache width={width} is not between 1 and the teacher's {e_t} experts. Fix: set cache.width "
            f"to a value in 1..{e_t}, or null (= {e_t}, no aggregation)."
        )
    if spec.logits_k > teacher["vocab_size"]:
        raise ConfigError(
            f"logits_k={spec.logits_k} exceeds the teacher vocabulary ({teacher['vocab_size']} entries). "
            f"Fix: set cache.logits_k <= {teacher['vocab_size']}."
        )
    return width


def cache_path_for(
    spec: CacheSpec, records: Sequence[Any], root: str, heldout: Sequence[Any] = ()
) -> tuple[str, str, dict[str, Any], dict[str, Any], int]:
    """(cache URL, key, key inputs, teacher dims, width) without building anything."""
    teacher = teacher_dims(spec.teacher_path)
    width = resolve_width(spec, teacher)
    inputs = key_inputs(spec, records, width, heldout)
    key = cache_key(inputs)
    return cfs.join(root, key), key, inputs, teacher, width


def build_teacher_cache(
    spec: CacheSpec,
    records: Sequence[Any],
    root: str,
    runtime: CacheRuntime,
    heldout: Sequence[Any] = (),
) -> CacheInfo:
    """Build (or resume, or find complete) the teacher cache for `records` under ROOT/<key>. `heldout`
    (records no student trains on: the validation split) supplies the fidelity sample of a lossy cache."""
    if not records:
        raise ConfigError(
            "build_teacher_cache got no records. Fix: point the data config at a non-empty dataset."
        )
    url, key, inputs, teacher, width = cache_path_for(spec, records, root, heldout)
    with DirectoryLock(url):  # one writer per cache directory; only the holder clears staging leftovers
        return _build_locked(spec, records, heldout, runtime, url, key, inputs, teacher, width)


def _build_locked(
    spec: CacheSpec,
    records: Sequence[Any],
    heldout: Sequence[Any],
    runtime: CacheRuntime,
    url: str,
    key: str,
    inputs: dict[str, Any],
    teacher: dict[str, Any],
    width: int,
) -> CacheInfo:
    manifest = read_manifest(url)
    if manifest is not None and manifest["complete"]:
        _check_same_key(manifest, key, url)
        manifest = reopen_if_damaged(url, manifest)  # quick check: shards lost or cut short get rebuilt
    if manifest is not None and manifest["complete"]:
        check_not_empty(manifest, spec.max_length)
        logger.info(
            "teacher cache %s is complete at %s (%d sequences, %d tokens): nothing to do",
            key,
            url,
            manifest["totals"]["num_sequences"],
            manifest["totals"]["num_tokens"],
        )
        return _info(url, manifest, "exists")

    if manifest is None:
        sources = manifest_sources(spec)
        settings = layout_settings(runtime)
        rows = settings.pop("rows_per_shard")
        manifest = new_manifest(key, inputs, sources, teacher, rows, len(records), settings)
        write_manifest(url, manifest)
        status = "built"
    else:
        _check_same_key(manifest, key, url)
        status = "resumed"
        runtime = stored_runtime(manifest["layout"], runtime, key)
    removed = remove_staging(url)
    done = committed_shards(url)
    pending = [i for i in range(manifest["layout"]["num_shards"]) if i not in done]
    if status == "resumed":
        logger.info(
            "resuming teacher cache %s: %d of %d shards already committed (%d partial writes discarded)",
            key,
            len(done),
            manifest["layout"]["num_shards"],
            removed,
        )
    stats: dict[str, float] = {}
    if "states_fidelity" in inputs:  # also when every shard is there (a repair dropped a damaged sample)
        try:
            manifest = ensure_state_basis(url, manifest, spec, records, width, runtime)  # the sample's codec
            manifest = ensure_fidelity_sample(url, manifest, spec, heldout, width, runtime)
        except Exception as e:
            raise CacheError(
                f"teacher cache build of {cfs.redact(url)} failed computing its fidelity sample: "
                f"{root_cause(e)}. Fix: remove the cause, then rerun `moedistill cache --config ...` to "
                "resume it."
            ) from e
    if pending:
        meta = ShardMeta(
            cached_layers=spec.cached_layers,
            width=width,
            hidden_size=teacher["hidden_size"],
            vocab_size=teacher["vocab_size"],
            logits_mode=spec.logits_mode,
            logits_k=spec.logits_k,
            states_dtype=spec.states_dtype,
            store_expert_states=spec.store_expert_states,
            teacher_responses=spec.teacher_responses != "none",
            states=spec.states,
        )
        try:
            manifest = ensure_state_basis(url, manifest, spec, records, width, runtime)  # before any shard
            run = _run_local if runtime.executor == "local" else _run_pipeline
            stats = run(spec, records, url, runtime, meta, width, pending)
        except Exception as e:
            n_done = len(committed_shards(url))
            raise CacheError(
                f"teacher cache build of {cfs.redact(url)} failed with {n_done} of "
                f"{manifest['layout']['num_shards']} "
                f"shards committed: {root_cause(e)}. Fix: remove the cause, then rerun `moedistill cache "
                "--config ...` to resume it (committed shards are kept)."
            ) from e
    final = finalize_manifest(url, manifest, check=lambda built: check_not_empty(built, spec.max_length))
    logger.info(
        "teacher cache %s %s at %s: %d sequences, %d tokens, %.1f MB",
        key,
        status,
        url,
        final["totals"]["num_sequences"],
        final["totals"]["num_tokens"],
        final["totals"]["num_bytes"] / 1e6,
    )
    return _info(url, final, status, stats)


def manifest_sources(spec: CacheSpec) -> dict[str, Any]:
    """Where the teacher-side inputs came from (informational; the key hashes their content)."""
    return {
        "teacher_path": cfs.redact(spec.teacher_path),
        "tokenizer_path": cfs.redact(spec.tokenizer_path),
        "prompt_template": spec.prompt_template[:200],
    }


def check_not_empty(manifest: dict[str, Any], max_length: int) -> None:
    """Print how many records were dropped; CacheError when no sequence is left to distil from."""
    t = manifest["totals"]
    records, dropped = int(manifest["layout"]["num_records"]), int(t["num_dropped"])
    if dropped:
        logger.info(
            "teacher cache %s: dropped %d of %d records (longer than max_length=%d tokens); %d sequences",
            manifest["key"],
            dropped,
            records,
            max_length,
            t["num_sequences"],
        )
    if t["num_sequences"] == 0:
        raise CacheError(
            f"teacher cache {manifest['key']} holds 0 usable sequences: all {dropped} of {records} records "
            f"are longer than max_length={max_length} tokens, so nothing could be distilled from it. Fix: "
            "raise data.max_length (or shorten the records), then rerun `moedistill cache --config ...`."
        )


# Runtime settings that change the cached bytes without being content (shard boundaries, float rounding):
# manifest layout field = CacheRuntime field -> what the config calls it. Recorded at the first write, forced
# from the manifest on every resume.
STORED_LAYOUT = {
    "rows_per_shard": "cache.rows_per_shard",
    "batch_size": "cache.batch_size",
    "torch_threads": "torch threads (num_cpus_per_actor)",
}


def layout_settings(runtime: CacheRuntime) -> dict[str, int]:
    """The STORED_LAYOUT values of a first build."""
    return {
        "rows_per_shard": runtime.rows_per_shard,
        "batch_size": runtime.batch_size,
        "torch_threads": runtime.threads,
    }


def stored_runtime(layout: dict[str, Any], runtime: CacheRuntime, key: str) -> CacheRuntime:
    """`runtime` with the STORED_LAYOUT values of the manifest `layout` (a resume must round like the first
    build did); warns, naming each setting the stored value overrides. A field missing from an older manifest
    keeps the runtime's value."""
    forced = {f: int(layout[f]) for f in STORED_LAYOUT if f in layout}
    asked = layout_settings(runtime)
    changed = [f"{STORED_LAYOUT[f]}={v} (asked: {asked[f]})" for f, v in forced.items() if asked[f] != v]
    if changed:
        logger.warning(
            "note: resuming teacher cache %s with the values its first build stored, so that the resumed "
            "shards are byte-identical: %s",
            key,
            ", ".join(changed),
        )
    return dataclasses.replace(runtime, **forced)


def _check_same_key(manifest: dict[str, Any], key: str, url: str) -> None:
    if manifest.get("key") != key:
        raise CacheError(
            f"{url} holds a cache with key {manifest.get('key')!r}, not {key!r}: the directory was renamed "
            "or copied over. Fix: delete it, or point the cache root elsewhere."
        )


def _info(
    url: str, manifest: dict[str, Any], status: str, stats: dict[str, float] | None = None
) -> CacheInfo:
    t = manifest["totals"]
    totals = (t["num_sequences"], t["num_tokens"], t["num_bytes"])
    return CacheInfo(url, manifest["key"], status, *totals, stats=stats or {})  # type: ignore[arg-type]


def _tokenize_batch(batch: Any, tokenizer_path: str, max_length: int) -> Any:
    """CPU task: rows {shard_id, first_seq_id, records_json} -> tokenised shard rows (Arrow, no pickling)."""
    tokenizer = load_tokenizer(tokenizer_path)
    cols: dict[str, list[Any]] = {
        k: [] for k in ("shard_id", "num_records", "seq_id", "input_ids", "response_mask")
    }
    for row in batch.to_pylist():
        records = [Record(**r) for r in json.loads(row["records_json"])]
        examples = tokenize_shard(tokenizer, records, row["first_seq_id"], max_length)
        cols["shard_id"].append(row["shard_id"])
        cols["num_records"].append(len(records))
        cols["seq_id"].append([e["seq_id"] for e in examples])
        cols["input_ids"].append([e["input_ids"] for e in examples])
        cols["response_mask"].append([e["response_mask"] for e in examples])
    return pa.table(
        {
            "shard_id": pa.array(cols["shard_id"], pa.int64()),
            "num_records": pa.array(cols["num_records"], pa.int64()),
            "seq_id": pa.array(cols["seq_id"], pa.list_(pa.int64())),
            "input_ids": pa.array(cols["input_ids"], pa.list_(pa.list_(pa.int32()))),
            "response_mask": pa.array(cols["response_mask"], pa.list_(pa.list_(pa.int8()))),
        }
    )


def _record_dict(r: Any) -> dict[str, Any]:
    return r.to_dict() if hasattr(r, "to_dict") else dict(r)


def _run_pipeline(
    spec: CacheSpec,
    records: Sequence[Any],
    url: str,
    runtime: CacheRuntime,
    meta: ShardMeta,
    width: int,
    pending: list[int],
) -> dict[str, float]:
    rows_per_shard = runtime.rows_per_shard
    items = [
        {
            "shard_id": i,
            "first_seq_id": i * rows_per_shard,
            "records_json": json.dumps(
                [_record_dict(r) for r in records[i * rows_per_shard : (i + 1) * rows_per_shard]]
            ),
        }
        for i in pending
    ]
    total_records = sum(len(json.loads(it["records_json"])) for it in items)
    progress = ProgressActor.remote()
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Few, long-lived tokenise/write workers: each new worker process pays the transformers (tokenise) or zarr
    # (write) import. One tokeniser keeps up with ~4 GPU teachers; >= 2 writers overlap writing with compute.
    tokenizers = max(1, -(-runtime.num_actors // 4))
    writers = max(2, runtime.num_actors)
    ds = ds.map_batches(
        _tokenize_batch,
        fn_kwargs={"tokenizer_path": spec.tokenizer_path, "max_length": spec.max_length},
        compute=TaskPoolStrategy(size=tokenizers),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=_LIGHT_TASK_CPUS,
    )
    ds = ds.map_batches(
        TeacherShardStage,
        fn_constructor_kwargs={
            "spec": spec,
            "width": width,
            "micro_batch": runtime.batch_size,
            "num_gpus": runtime.num_gpus_per_actor,
            "cpu_threads": runtime.threads,
            "cache_url": url,
        },
        compute=ActorPoolStrategy(size=min(runtime.num_actors, len(items))),
        batch_size=1,  # one row = one whole shard
        batch_format="pyarrow",
        **teacher_actor_options(runtime.num_gpus_per_actor, runtime.num_cpus_per_actor, runtime.resources),
    )
    sink = TeacherCacheDatasink(
        url,
        meta,
        progress=progress,
        fail_after_shards=runtime.fail_after_shards,
        write_barrier=runtime.write_barrier,
    )
    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars)
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False  # our bar counts records and tokens
    t0 = time.perf_counter()
    try:
        with ProgressBar(progress, total_records, enabled=runtime.progress):
            ds.write_datasink(sink, ray_remote_args={"num_cpus": _LIGHT_TASK_CPUS}, concurrency=writers)
        c = ray.get(progress.get.remote())
        dt = time.perf_counter() - t0
        stats = stage_stats(dt, ray.get(progress.commits.remote()))
        logger.info(
            "cache stage: %d shards, %d sequences, %d tokens in %.1f s (%.1f seq/s, %.0f tokens/s)",
            c["shards"],
            c["sequences"],
            c["tokens"],
            dt,
            c["sequences"] / dt,
            c["tokens"] / dt,
        )
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars = saved
        ray.kill(progress)
    return stats


def stage_stats(wall_s: float, commits: list[tuple[float, int]]) -> dict[str, float]:
    """wall_s, tokens, and the steady-state rate between the first and the last shard commit."""
    commits = sorted(commits)
    out = {"wall_s": wall_s, "tokens": float(sum(k for _, k in commits)), "shards": float(len(commits))}
    if len(commits) >= 2 and commits[-1][0] > commits[0][0]:
        out["steady_tokens_per_s"] = sum(k for _, k in commits[1:]) / (commits[-1][0] - commits[0][0])
    return out


def _run_local(
    spec: CacheSpec,
    records: Sequence[Any],
    url: str,
    runtime: CacheRuntime,
    meta: ShardMeta,
    width: int,
    pending: list[int],
) -> dict[str, float]:
    """The same per-shard steps as the Ray pipeline, sequentially in this process."""
    tokenizer = load_tokenizer(spec.tokenizer_path)
    stage = TeacherShardStage(spec, width, runtime.batch_size, runtime.num_gpus_per_actor, cache_url=url)
    # Behave like one Ray actor, which runs with OMP_NUM_THREADS = its CPUs: CPU float results depend on the
    # thread count, and matching it keeps local and Ray shards byte-identical.
    with actor_threads(runtime):
        return _local_shards(spec, records, url, runtime, meta, pending, tokenizer, stage)


def _local_shards(
    spec: CacheSpec,
    records: Sequence[Any],
    url: str,
    runtime: CacheRuntime,
    meta: ShardMeta,
    pending: list[int],
    tokenizer: Any,
    stage: TeacherShardStage,
) -> dict[str, float]:
    rows_per_shard = runtime.rows_per_shard
    t0, tokens, commits = time.perf_counter(), 0, []
    for n, shard_id in enumerate(
        tqdm(pending, desc="teacher cache (local)", unit="shard", disable=not runtime.progress)
    ):
        first = shard_id * rows_per_shard
        shard_records = records[first : first + rows_per_shard]
        examples = tokenize_shard(tokenizer, shard_records, first, spec.max_length)
        data = compute_shard(
            stage.adapter,
            examples,
            shard_id,
            len(shard_records),
            stage.out,
            runtime.batch_size,
            stage.pad_id,
            stage.basis,
        )
        fail = runtime.fail_after_shards is not None and n >= runtime.fail_after_shards
        commit_shard(data, meta, url, fail_before_commit=fail)
        tokens += data.total_tokens
        commits.append((time.time(), data.total_tokens))
        logger.info(
            "committed shard %d: %d seqs, %d tokens (%.0f tokens/s so far)",
            shard_id,
            len(data.seq_ids),
            data.total_tokens,
            tokens / (time.perf_counter() - t0),
        )
    return stage_stats(time.perf_counter() - t0, commits)
