"""Typed configuration: YAML presets -> frozen dataclasses, strictly validated, with a stable content hash.

  schema.py    the dataclasses, one per section of a preset, with their defaults
  load.py      YAML -> Config, overrides, validation (load_config, with_overrides, validate_config)
  identity.py  the content hashes of what a config builds (teacher_cache_hash, teacher_fields, stable_hash)

Every name is re-exported here: `from pipeline.config import X` is how the rest of the pipeline imports them.
"""

from pipeline.config.identity import (
    RUNTIME_ONLY_TRAIN_FIELDS,
    model_settings,
    stable_hash,
    teacher_cache_fields,
    teacher_cache_hash,
    teacher_fields,
    train_settings,
)
from pipeline.config.load import (
    absolute_paths,
    check_plain_name,
    config_from_dict,
    config_to_dict,
    load_config,
    validate_config,
    with_overrides,
)
from pipeline.config.schema import (
    ArchitectureConfig,
    CacheConfig,
    Config,
    DataConfig,
    DistillConfig,
    EvalConfig,
    KnowledgeAugmentationConfig,
    LoraMoEConfig,
    ModelConfig,
    MultipleChoiceConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "RUNTIME_ONLY_TRAIN_FIELDS",
    "ArchitectureConfig",
    "CacheConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "KnowledgeAugmentationConfig",
    "LoraMoEConfig",
    "ModelConfig",
    "MultipleChoiceConfig",
    "TokenizerConfig",
    "TrainConfig",
    "absolute_paths",
    "check_plain_name",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "model_settings",
    "stable_hash",
    "teacher_cache_fields",
    "teacher_cache_hash",
    "teacher_fields",
    "train_settings",
    "validate_config",
    "with_overrides",
]
