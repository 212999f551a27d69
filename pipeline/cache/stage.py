"""Stage 1 from a config: which teacher, which records, which layers -> `build_teacher_cache`.

Also records, per config, where its cache lives (ROOT/by-config/<config hash>.json), so the student side
finds the cache from its config alone, without opening the teacher checkpoint to recompute the key.
"""

from __future__ import annotations

import functools
import json
import logging

from pipeline import storage as cfs
from pipeline.cache.build.builder import build_teacher_cache, teacher_dims
from pipeline.cache.format.spec import CacheInfo, CacheRuntime, CacheSpec, KnowledgeAugmentation
from pipeline.config import Config, ModelConfig, teacher_cache_hash, teacher_fields
from pipeline.data.stage import load_tokenizer, prepare_data
from pipeline.data.template import TEMPLATE_SPEC
from pipeline.errors import CacheError, ConfigError
from pipeline.models.alignment import layer_pairs
from pipeline.models.compat import check_models_share_tokenizer
from pipeline.models.dims import model_dims, read_dims
from pipeline.models.export import EXPORT_MARKER, export_is_complete
from pipeline.placement import check_placement
from pipeline.run_identity import SETTINGS_FILE
from pipeline.workspace import paths_for

log = logging.getLogger(__name__)


def teacher_checkpoint(config: Config) -> str:
    """The fine-tuned teacher the cache is built from: output_dir/teacher/final when `finetune-teacher` made
    it from this config's teacher, else teacher.path (an already fine-tuned MoE teacher)."""
    final = paths_for(config).teacher_final
    if export_is_complete(final):
        made_from = _finetuned_from(config)
        ours = teacher_fields(config)["teacher"]  # what finetune-teacher records (pipeline.config)
        if made_from is None or made_from == json.loads(json.dumps(ours, default=str)):
            return str(final)
        if config.teacher.path is None:
            raise ConfigError(
                f"the fine-tuned teacher at {final} was made from another teacher ({made_from}) than this "
                f"config's ({ours}). Fix: rerun `moedistill finetune-teacher --config ... "
                "--force` to fine-tune this config's teacher, or give this config its own output_dir."
            )
        log.warning(
            "note: %s was fine-tuned from another teacher (%s); building the cache from teacher.path=%s",
            final,
            made_from,
            cfs.redact(config.teacher.path),
        )
        return config.teacher.path
    if config.teacher.path is not None:
        return config.teacher.path  # an already fine-tuned MoE teacher
    raise ConfigError(
        f"no fine-tuned teacher at {final}. Fix: run `moedistill finetune-teacher --config ...` first "
        "(or set teacher.path to a fine-tuned MoE checkpoint)."
    )


def _finetuned_from(config: Config) -> dict | None:
    """The teacher settings `finetune-teacher` recorded beside output_dir/teacher (None: not recorded)."""
    recorded = paths_for(config).teacher_final.parent / SETTINGS_FILE
    try:
        return json.loads(recorded.read_text()).get("teacher")
    except (OSError, ValueError):
        return None


def student_num_layers(student: ModelConfig) -> int:
    """The student's depth, which "paired" cache layers follow (from its config, never its weights)."""
    fix = "check student.path / student.upcycle_from, or set cache.layers to an explicit list."
    return model_dims(student, read=functools.partial(read_dims, role="student", fix=fix)).num_layers


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
        states_codec=c.states_codec,
        states_rank=c.states_rank,
        states_basis_tokens=c.states_basis_tokens,
        states_token_fraction=c.states_token_fraction,
        states_fidelity_tokens=c.states_fidelity_tokens,
        states_mass=c.states_mass,
        knowledge_augmentation=KnowledgeAugmentation(
            c.knowledge_augmentation.repeats, c.knowledge_augmentation.sampling_prob
        ),
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
    prepared = prepare_data(config)
    check_models_share_tokenizer(config, load_tokenizer(prepared.tokenizer_path))
    spec = cache_spec_from_config(config, teacher_checkpoint(config), prepared.tokenizer_path)
    runtime = runtime or cache_runtime_from_config(config)
    check_placement(dict(config.cache.resources), what="teacher cache actors (cache.resources)")
    # The fidelity sample comes from the validation split: sequences no student trains on.
    info = build_teacher_cache(
        spec, prepared.splits.train, config.cache.root, runtime, heldout=prepared.splits.validation
    )
    remember_cache(config, info)
    return info


def _locator(config: Config) -> str:
    return cfs.join(config.cache.root, "by-config", f"{teacher_cache_hash(config)}.json")


def remember_cache(config: Config, info: CacheInfo) -> None:
    """Record where this config's cache lives (ROOT/by-config/<config hash>.json)."""
    fs, path = cfs.get_fs(_locator(config))
    # Relative to cache.root, so a moved or copied root resolves to itself (and stores no credentials).
    stored = cfs.relative_to(config.cache.root, info.path)
    locator = {"path": stored, "key": info.key, "teacher_export": _teacher_export_stamp(config)}
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
            f"no teacher cache for this config under {cfs.redact(config.cache.root)}. Fix: run "
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
    return cfs.resolve_under(config.cache.root, locator["path"])


def format_cache_info(info: CacheInfo) -> str:
    verb = {
        # the quick check saw sizes and commit markers; reading the whole cache to hash it is verify's job
        "exists": "already complete (nothing to do; sizes and commit markers checked, not checksums: every "
        "stage that reads it checks those, `moedistill cache verify PATH` checks all of them now)",
        "built": "built",
        "resumed": "resumed and completed",
    }
    return (
        f"teacher cache {info.key} {verb[info.status]}: {cfs.redact(info.path)}\n"
        f"  {info.num_sequences} sequences, {info.num_tokens} distillation tokens, "
        f"{info.num_bytes / 1e6:.1f} MB ({info.num_bytes / max(info.num_tokens, 1):.0f} B/token)"
    )
