"""Content identities: the stable hash of a config's fields that decide what is built (the teacher, its
cache's by-config pointer) or trained (a run's settings fingerprint, pipeline.run_identity).

A field added to the config must leave every existing identity unchanged (tests/base/test_identity_pins.py):
new fields enter a hash only when set away from their default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pipeline.config.schema import CacheConfig, Config, DataConfig, ModelConfig, TrainConfig


def stable_hash(payload: Any, length: int = 16) -> str:
    """sha256 of canonical JSON: the same content gives the same hash on every machine and Python."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# Training fields that decide how a run executes, not what it learns (placement, cadence, retries, logs).
RUNTIME_ONLY_TRAIN_FIELDS = frozenset(
    {
        "use_gpu",
        "resources_per_worker",
        "torch_threads",
        "checkpoint_every",
        "keep_checkpoints",
        "max_failures",
        "log_every",
    }
)


def model_settings(model: ModelConfig) -> dict[str, Any]:
    """A model's fields that decide it: `lora_moe` only where `init` uses it, so a model of another init
    keeps the fingerprints it had before the setting existed."""
    fields = dataclasses.asdict(model)
    if model.init != "lora-moe":
        del fields["lora_moe"]
    return fields


def train_settings(train: TrainConfig) -> dict[str, Any]:
    """The training fields that change the trained weights."""
    return {k: v for k, v in dataclasses.asdict(train).items() if k not in RUNTIME_ONLY_TRAIN_FIELDS}


def teacher_fields(config: Config) -> dict[str, Any]:
    """The config fields that decide the fine-tuned teacher: its model, its training, its data and tokenizer.

    `data.strict` is absent: it only decides whether bad records raise or are skipped and counted.
    """
    data = config.data
    return {
        # `init` is a student-only switch (validate_config refuses it for the teacher).
        "teacher": {k: v for k, v in model_settings(config.teacher).items() if k != "init"},
        # The teacher the cache is built from is the one `finetune-teacher` trains with these settings.
        "finetune": train_settings(config.finetune),
        "tokenizer": dataclasses.asdict(config.tokenizer),
        "data": {
            k: getattr(data, k)
            for k in (
                "source",
                "split",
                "num_demo_records",
                "max_records",
                "seed",
                "val_fraction",
                "test_fraction",
                "prompt_template",
                "max_length",
            )
        }
        # The regime fields only when set: configs without them keep their hash (and every key built on it).
        | {k: getattr(data, k) for k, v in _REGIME_DEFAULTS.items() if getattr(data, k) != v},
    }


def _defaults(section: type, names: tuple[str, ...]) -> dict[str, Any]:
    """The schema's defaults of `names` in a config section: what a config that never set them holds."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    return {name: fields[name].default for name in names}


# Fields that enter a hash only when set away from their default, so configs written before they existed keep
# their hashes (and every cache and run named from them).
_REGIME_DEFAULTS = _defaults(DataConfig, ("student_train_records", "teacher_train"))
_CODEC_DEFAULTS = _defaults(
    CacheConfig,
    (
        "states_codec",
        "states_rank",
        "states_basis_tokens",
        "states_token_fraction",
        "states_fidelity_tokens",
        "states_mass",
    ),
)


def teacher_cache_fields(config: Config) -> dict[str, Any]:
    """Exactly the config fields that determine the teacher cache's content (docs/cache-format.md, "The key"):
    the teacher's (`teacher_fields`) and the cache's own.

    Student-side choices (method, K, alpha, beta, lambdas, student experts, training) are deliberately absent
    so that every ablation reuses one cache. The cache key itself also hashes the teacher weights and
    tokenizer files, which a config cannot see.
    """
    cache = config.cache
    return {
        **teacher_fields(config),
        "cache": {
            k: getattr(cache, k)
            for k in (
                "layers",
                "width",
                "logits_mode",
                "logits_k",
                "states_dtype",
                "store_expert_states",
                "teacher_responses",
                "max_new_tokens",
            )
        }
        # Codec settings only when changed: configs without them keep their hash (and cache locator).
        | {k: getattr(cache, k) for k, v in _CODEC_DEFAULTS.items() if getattr(cache, k) != v}
        # KA likewise: plain (R = 1, p = 0) computes the plain cache and keeps its hash.
        | (
            {}
            if cache.knowledge_augmentation.is_plain
            else {"knowledge_augmentation": dataclasses.asdict(cache.knowledge_augmentation)}
        ),
        # "paired" layers depend on the student's depth, so it is part of the key only through them.
        "student_layers": _student_depth(config) if cache.layers == "paired" else None,
    }


def teacher_cache_hash(config: Config) -> str:
    return stable_hash(teacher_cache_fields(config))


def _student_depth(config: Config) -> int | None:
    return config.student.build.num_layers if config.student.build is not None else None
