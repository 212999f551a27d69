"""Loading a config: YAML presets -> the frozen dataclasses of pipeline/config/schema.py, strictly validated.

Unknown keys and wrong types are errors that name the key and the file, because a silently ignored typo in an
ablation sweep wastes GPU hours.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from pipeline.config.schema import ArchitectureConfig, Config, ModelConfig, MultipleChoiceConfig
from pipeline.errors import ConfigError

# jobs/configs/ of this checkout: the presets a missing config file's message lists
PRESETS_DIR = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML preset into a validated Config; `overrides` uses dotted keys ("distill.k": 2)."""
    path = Path(path)
    if not path.is_file():
        presets = sorted(p.name for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(
            f"config file {path} does not exist; presets in jobs/configs/: {', '.join(presets)}"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    config = config_from_dict(raw, source=str(path))
    validate_config(config, source=str(path))
    return absolute_paths(config)


def absolute_paths(config: Config) -> Config:
    """Local relative paths made absolute against the current directory: Ray workers run elsewhere.

    URLs (s3://...) and hub ids (org/name) are left alone.
    """

    def fix(value: str | None) -> str | None:
        if value is None or "://" in value or not _looks_local(value):
            return value
        return str(Path(value).expanduser().resolve())

    def fix_model(model: ModelConfig) -> ModelConfig:
        return dataclasses.replace(model, path=fix(model.path), upcycle_from=fix(model.upcycle_from))

    data_source = config.data.source
    if data_source != "demo" and Path(data_source).exists():
        data_source = str(Path(data_source).resolve())
    return dataclasses.replace(
        config,
        output_dir=str(config.out.expanduser().resolve()),
        data=dataclasses.replace(config.data, source=data_source),
        tokenizer=dataclasses.replace(config.tokenizer, path=fix(config.tokenizer.path)),
        teacher=fix_model(config.teacher),
        student=fix_model(config.student),
        cache=dataclasses.replace(config.cache, root=fix(config.cache.root) or config.cache.root),
        evaluate=dataclasses.replace(
            config.evaluate,
            multiple_choice=[
                dataclasses.replace(mc, path=fix(mc.path)) for mc in config.evaluate.multiple_choice
            ],
        ),
    )


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    return _build(Config, raw, source, prefix="")


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def with_overrides(config: Config, overrides: dict[str, Any], *, validate: bool = True) -> Config:
    """A new Config with dotted-key overrides applied (used by ablation sweeps), validated unless `validate`
    is False (one key of a grid point alone may be inconsistent: top_k before its num_experts)."""
    raw = config_to_dict(config)
    for dotted, value in overrides.items():
        _set_dotted(raw, dotted, value)
    new = config_from_dict(raw, source="override")
    if validate:
        validate_config(new, source="override")
    return new


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"section {prefix.rstrip('.')!r}" if prefix else "the top level"
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)} in {where}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], source, prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {prefix + name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, source, key)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {key}={value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(
                f"{source}: {key}={value!r}; allowed values: {', '.join(map(repr, get_args(tp)))}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, prefix=key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp)
        return {
            _coerce(key_tp, k, source, key): _coerce(val_tp, v, source, f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads 1e-3 as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is tp):
        return value
    if tp is typing.Any:
        return value
    raise ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_plain_name(value: str, key: str, source: str) -> None:
    """A name that becomes one directory under an output directory: no separators, no `..`, not absolute,
    so what it names is written inside that directory and nowhere else."""
    if not value or value in (".", "..") or "/" in value or "\\" in value or value.startswith("~"):
        raise ConfigError(
            f"{source}: {key}={value!r} must be a plain name (one folder under the output directory: no '/', "
            "'..', '~' or absolute path). Fix: choose a name such as 'kd-seed1'."
        )


def _check_architecture(build: ArchitectureConfig, role: str, source: str) -> None:
    """Model shapes that cannot be built, found before any stage (and Ray) starts."""
    sizes = {k: v for k, v in dataclasses.asdict(build).items() if isinstance(v, int)}
    bad = [f"{role}.build.{k}={v}" for k, v in sizes.items() if v < 1]
    if bad:
        raise ConfigError(f"{source}: {', '.join(bad)} must be >= 1. Fix: --set {bad[0].split('=')[0]}=<n>")
    if build.top_k > build.num_experts:
        raise ConfigError(
            f"{source}: {role}.build.top_k={build.top_k} routes to more experts than "
            f"{role}.build.num_experts={build.num_experts}. Fix: --set {role}.build.top_k=<at most "
            f"{build.num_experts}>"
        )


def _check_lora_moe(student: ModelConfig, source: str) -> None:
    assert student.build is not None  # init != random needs student.build (checked first)
    depth, lora = student.build.num_layers, student.lora_moe
    layers = lora.layers if lora.layers is not None else []
    bad = [i for i in layers if not 0 <= i < depth]
    if lora.layers == [] or bad or len(set(layers)) != len(layers):
        raise ConfigError(
            f"{source}: student.lora_moe.layers={lora.layers} must name distinct decoder layers of the "
            f"{depth}-layer student. Fix: --set student.lora_moe.layers=<a list within [0, {depth})>, or "
            "null for every layer."
        )
    if lora.rank < 1:
        raise ConfigError(
            f"{source}: student.lora_moe.rank={lora.rank} must be >= 1. Fix: --set student.lora_moe.rank=16"
        )


def validate_config(config: Config, source: str) -> None:
    """Cross-field checks that types alone cannot express."""
    if config.distill.run_name is not None:
        check_plain_name(config.distill.run_name, "distill.run_name", source)
    cache = config.cache
    for key in ("batch_size", "rows_per_shard", "num_actors", "logits_k"):  # runtime integers, known now
        value = getattr(cache, key)
        if value < 1:
            raise ConfigError(f"{source}: cache.{key}={value} must be >= 1. Fix: --set cache.{key}=<n >= 1>")
    if cache.num_gpus_per_actor < 0:
        raise ConfigError(
            f"{source}: cache.num_gpus_per_actor={cache.num_gpus_per_actor} must be >= 0. Fix: --set "
            "cache.num_gpus_per_actor=<0 for CPU, or the GPUs per teacher actor>"
        )
    for role in ("teacher", "student"):
        model: ModelConfig = getattr(config, role)
        if model.build is not None:
            _check_architecture(model.build, role, source)
        if model.upcycle_from is not None and not 1 <= model.top_k <= model.num_experts:
            raise ConfigError(
                f"{source}: {role}.top_k={model.top_k} and {role}.num_experts={model.num_experts} "
                f"(upcycling) need 1 <= top_k <= num_experts. Fix: --set {role}.num_experts=<n> "
                f"{role}.top_k=<k <= n>"
            )
        chosen = [k for k in ("path", "upcycle_from", "build") if getattr(model, k) is not None]
        if len(chosen) != 1:
            raise ConfigError(
                f"{source}: {role} needs exactly one of {role}.path (an MoE model), {role}.upcycle_from "
                f"(a dense model to upcycle) or {role}.build (a tiny architecture); got {chosen or 'none'}"
            )
        if model.init != "random" and (role == "teacher" or model.build is None):
            raise ConfigError(
                f"{source}: {role}.init: {model.init} pretrains a dense counterpart of student.build, so it "
                f"needs the student described by student.build (got {role}.{chosen[0]}). Fix: set "
                f"{role}.init: random (a checkpoint carries its own pretraining)."
            )
        if model.init == "lora-moe":
            _check_lora_moe(model, source)
        local = model.path or model.upcycle_from
        if local and _looks_local(local) and not Path(local).exists():
            raise ConfigError(
                f"{source}: {role} model path {local} does not exist (a hub id looks like org/name)"
            )
    if (
        config.tokenizer.path
        and _looks_local(config.tokenizer.path)
        and not Path(config.tokenizer.path).exists()
    ):
        raise ConfigError(f"{source}: tokenizer.path {config.tokenizer.path} does not exist")
    src = config.data.source
    if src != "demo" and Path(src).suffix in (".json", ".jsonl") and not Path(src).exists():
        raise ConfigError(f"{source}: data.source file {src} does not exist")
    # Without tokenizer.path the tokenizer is the teacher's (teacher.path) or trained on the demo data.
    if config.tokenizer.path is None and config.teacher.path is None and config.data.source != "demo":
        raise ConfigError(f"{source}: tokenizer.path is required unless data.source is 'demo'")
    if not 0 <= config.data.val_fraction < 1 or not 0 <= config.data.test_fraction < 1:
        raise ConfigError(f"{source}: data.val_fraction and data.test_fraction must lie in [0, 1)")
    if config.data.student_train_records is not None and config.data.student_train_records < 1:
        raise ConfigError(
            f"{source}: data.student_train_records must be >= 1 (null: the students train on the whole "
            f"training split), got {config.data.student_train_records}"
        )
    d = config.distill
    if d.k < 1:
        raise ConfigError(f"{source}: distill.k must be >= 1 (MC exploration length), got {d.k}")
    if not 0 <= d.alpha <= 1:
        raise ConfigError(
            f"{source}: distill.alpha must lie in [0, 1] (0: MC draws without replacement), got {d.alpha}"
        )
    if d.lambda_mc_warmup_steps < 0:
        raise ConfigError(
            f"{source}: distill.lambda_mc_warmup_steps must be >= 0 (0: no ramp), got "
            f"{d.lambda_mc_warmup_steps}"
        )
    for section in (config.finetune, config.distill.train):
        if section.num_workers < 0 or section.batch_size < 1 or section.grad_accum_steps < 1:
            raise ConfigError(
                f"{source}: num_workers must be >= 0 (0: train in-process, Ray Train's local mode), "
                "batch_size and grad_accum_steps >= 1"
            )
    _validate_multiple_choice(config.evaluate.multiple_choice, source)


def _validate_multiple_choice(sets: list[MultipleChoiceConfig], source: str) -> None:
    names = [mc.name for mc in sets]
    for i, mc in enumerate(sets):
        key = f"evaluate.multiple_choice[{i}]"
        if not mc.name.strip():
            raise ConfigError(f"{source}: {key}.name is empty. Fix: name the set (its results-table column).")
        if names.count(mc.name) > 1:
            raise ConfigError(f"{source}: {key}.name {mc.name!r} is used twice. Fix: give each set its own.")
        if (mc.path is None) == (mc.dataset is None):
            raise ConfigError(
                f"{source}: {key} ({mc.name}) needs exactly one of path (a local .jsonl/.csv file) or "
                "dataset (a `datasets` name such as cais/mmlu:anatomy, or demo for the bundled set)"
            )
        if mc.path is not None and Path(mc.path).suffix not in (".jsonl", ".json", ".csv"):
            raise ConfigError(
                f"{source}: {key}.path {mc.path} is not a .jsonl, .json or .csv file. Fix: convert it, or "
                "name a `datasets` source with dataset: instead."
            )
        if mc.path is not None and not Path(mc.path).expanduser().is_file():
            raise ConfigError(f"{source}: {key}.path {mc.path} does not exist. Fix: check the path.")
        if mc.limit is not None and mc.limit < 1:
            raise ConfigError(f"{source}: {key}.limit must be >= 1 (null: every item), got {mc.limit}")


def _looks_local(name: str) -> bool:
    """A filesystem path, not a hub id ("org/name", "gpt2"): explicit prefix, deeper path, or on disk."""
    return name.startswith((".", "/", "~")) or name.count("/") >= 2 or Path(name).exists()
