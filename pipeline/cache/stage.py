"""Stage 1 from a config: which teacher, which records, which layers -> `build_teacher_cache`.

Also records, per config, where its cache lives (ROOT/by-config/<config hash>.json), so the student side
finds the cache from its config alone, without opening the teacher checkpoint to recompute the key.
"""

from __future__ import annotations

import json
import logging

from pipeline.cache import fs as cfs
from pipeline.cache.build import build_teacher_cache, teacher_dims
from pipeline.cache.spec import CacheInfo, CacheRuntime, CacheSpec
from pipeline.config import Config, ModelConfig, teacher_cache_hash
from pipeline.data.stage import load_tokenizer, prepare_data
from pipeline.data.template import TEMPLATE_SPEC
from pipeline.errors import CacheError, ConfigError
from pipeline.models.alignment import layer_pairs
from pipeline.models.compat import check_models_share_tokenizer
from pipeline.models.export import EXPORT_MARKER, export_is_complete
from pipeline.workspace import paths_for

log = logging.getLogger(__name__)


def teacher_checkpoint(config: Config) -> str:
    """The fine-tuned teacher the cache is built from."""
    final = paths_for(config).teacher_final
    if export_is_complete(final):
        return str(final)
    if config.teacher.path is not None:
        return config.teacher.path  # an already fine-tuned MoE teacher
    raise ConfigError(
        f"no fine-tuned teacher at {final}. Fix: run `moedistill finetune-teacher --config ...` first "
        "(or set teacher.path to a fine-tuned MoE checkpoint)."
    )


def student_num_layers(student: ModelConfig) -> int:
    if student.build is not None:
        return student.build.num_layers
    from transformers import AutoConfig

    name = student.path or student.upcycle_from
    try:
        return int(AutoConfig.from_pretrained(name).num_hidden_layers)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the student config {name!r} to pair layers: {exc}. Fix: check student.path / "
            "student.upcycle_from, or set cache.layers to an explicit list."
        ) from None


def cached_layers_for(config: Config, teacher_layers: int) -> tuple[int, ...]:
    layers = config.cache.layers
    if layers == "all":
        return tuple(range(teacher_layers))
    if layers == "paired":
        return tuple(t for _, t in layer_pairs(teacher_layers, student_num_layers(config.student)))
    return tuple(layers)


def cache_spec_from_config(config: Config, teacher_path: str, tokenizer_path: str) -> CacheSpec:
    c = config.cache
    return CacheSpec(
        teacher_path=teacher_path,
        tokenizer_path=tokenizer_path,
        cached_layers=cached_layers_for(config, teacher_dims(teacher_path)["num_layers"]),
        width=c.width,
        logits_mode=c.logits_mode,
        logits_k=c.logits_k,
        states_dtype=c.states_dtype,
        max_length=config.data.max_length,
        prompt_template=TEMPLATE_SPEC,
        store_expert_states=c.store_expert_states,
        teacher_responses=c.teacher_responses,
        max_new_tokens=c.max_new_tokens,
        compute_dtype="bfloat16" if c.num_gpus_per_actor > 0 else "float32",
    )


def cache_runtime_from_config(config: Config) -> CacheRuntime:
    c = config.cache
    return CacheRuntime(
        num_actors=c.num_actors,
        batch_size=c.batch_size,
        rows_per_shard=c.rows_per_shard,
        num_gpus_per_actor=c.num_gpus_per_actor,
        resources=dict(c.resources) or None,
    )


def run_cache(config: Config, runtime: CacheRuntime | None = None) -> CacheInfo:
    from pipeline.placement import check_placement

    prepared = prepare_data(config)
    check_models_share_tokenizer(config, load_tokenizer(prepared.tokenizer_path))
    spec = cache_spec_from_config(config, teacher_checkpoint(config), prepared.tokenizer_path)
    runtime = runtime or cache_runtime_from_config(config)
    check_placement(dict(config.cache.resources), what="teacher cache actors (cache.resources)")
    info = build_teacher_cache(spec, prepared.splits.train, config.cache.root, runtime)
    _remember(config, info)
    return info


def _locator(config: Config) -> str:
    return cfs.join(config.cache.root, "by-config", f"{teacher_cache_hash(config)}.json")


def _remember(config: Config, info: CacheInfo) -> None:
    fs, path = cfs.get_fs(_locator(config))
    locator = {"path": info.path, "key": info.key, "teacher_export": _teacher_export_stamp(config)}
    cfs.write_atomic(fs, path, json.dumps(locator).encode())


def _teacher_export_stamp(config: Config) -> float | None:
    """When this config's fine-tuned teacher was exported (its small marker file, not the weights)."""
    marker = paths_for(config).teacher_final / EXPORT_MARKER
    try:
        return float(json.loads(marker.read_text())["time"])
    except (OSError, ValueError, KeyError):
        return None


def locate_cache(config: Config) -> str:
    """The cache built for this config's teacher-side settings; CacheError naming the fix otherwise."""
    fs, path = cfs.get_fs(_locator(config))
    if not fs.exists(path):
        raise CacheError(
            f"no teacher cache for this config under {config.cache.root}. Fix: run "
            "`moedistill cache --config <this config>` first (the student never runs the teacher itself)."
        )
    locator = cfs.read_json(fs, path)
    recorded, current = locator.get("teacher_export"), _teacher_export_stamp(config)
    if recorded is not None and current is not None and recorded != current:
        raise CacheError(
            f"the teacher at {paths_for(config).teacher_final} was fine-tuned again after cache "
            f"{locator['key']} was built from it, so that cache holds the old teacher's targets. Fix: run "
            "`moedistill cache --config <this config>` to cache the current teacher."
        )
    return locator["path"]


def format_cache_info(info: CacheInfo) -> str:
    verb = {
        "exists": "already complete (nothing to do)",
        "built": "built",
        "resumed": "resumed and completed",
    }
    return (
        f"teacher cache {info.key} {verb[info.status]}: {info.path}\n"
        f"  {info.num_sequences} sequences, {info.num_tokens} distillation tokens, "
        f"{info.num_bytes / 1e6:.1f} MB ({info.num_bytes / max(info.num_tokens, 1):.0f} B/token)"
    )
