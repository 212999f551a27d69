"""Typed configuration: YAML presets -> frozen dataclasses, strictly validated, with a stable content hash.

Every stage reads the same file, so one YAML describes a whole experiment: data, teacher, student, the
teacher cache, distillation and evaluation. Unknown keys and wrong types are errors that name the key and
the file, because a silently ignored typo in an ablation sweep wastes GPU hours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    source: str = "demo"  # "demo" (bundled generator), a .jsonl/.json path, or a datasets name/path
    split: str = "train"  # split passed to datasets.load_dataset
    num_demo_records: int = 3000
    max_records: int | None = None  # cap after loading (quick experiments)
    max_length: int = 128  # tokens; longer examples are dropped and counted, never silently truncated
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    seed: int = 0
    strict: bool = False  # malformed records: error (strict) or skip and count
    prompt_template: Literal["dolly"] = "dolly"  # pipeline.data.template (the one template so far)
    # The teacher-knows-more regime (docs/method.md, "The demo regime"): null = every stage trains on the
    # whole training split. N = the students (distillation, the cache, the dense pretraining of `init:
    # upcycle`) see a seeded subset of N training records, and the teacher fine-tunes on `teacher_train`:
    # "all" training records, or only the "rest" the students never see (so the cache is not built on what
    # it learnt).
    student_train_records: int | None = None
    teacher_train: Literal["all", "rest"] = "all"


@dataclass(frozen=True)
class TokenizerConfig:
    path: str | None = None  # HF id or local dir; None: train the demo tokenizer on the demo data
    vocab_size: int = 1024  # only for the demo tokenizer


@dataclass(frozen=True)
class ArchitectureConfig:
    """A tiny Qwen3-MoE built from scratch (demo and tests): the `build:` section of a model.

    pipeline.models.build.TinyMoEConfig extends it with the initialisation details a config never sets.
    """

    hidden_size: int = 256
    num_layers: int = 4
    num_experts: int = 4
    top_k: int = 2
    moe_intermediate_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class LoraMoEConfig:
    """`student.init: lora-moe` (MoE-KD's student, pipeline.models.lora_moe): the dense counterpart of
    `student.build` with a mixture of `student.build.num_experts` LoRA experts (top `student.build.top_k`) of
    rank `rank`, scaled by `alpha`, beside the MLP of `layers` (null: every decoder layer)."""

    layers: list[int] | None = None
    rank: int = 16  # the released Dolly SFT script's r
    alpha: float = 1.0  # the released code's default a


@dataclass(frozen=True)
class ModelConfig:
    """Where a model comes from: exactly one of `path`, `upcycle_from`, `build`."""

    path: str | None = None  # an MoE causal LM: HF hub id or local directory
    upcycle_from: str | None = None  # a dense causal LM (Qwen3 / Llama) turned into its MoE counterpart
    num_experts: int = 4  # for upcycling
    top_k: int = 2  # for upcycling
    upcycle_noise_std: float = 0.0
    build: ArchitectureConfig | None = None
    seed: int = 0
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Students only: "upcycle" starts from a dense counterpart of `build` pretrained for the fixed budget
    # `student_pretrain`, upcycled to MoE (pipeline.finetune.student_init); "random": from scratch;
    # "lora-moe": that dense student with LoRA experts (`lora_moe`), fine-tuned on the responses (MoE-KD).
    init: Literal["random", "upcycle", "lora-moe"] = "random"
    lora_moe: LoraMoEConfig = field(default_factory=LoraMoEConfig)


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = 1  # 0: in-process (Ray Train local mode; no persisted checkpoints, so no resume)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # e.g. {"student_node": 0.01}
    batch_size: int = 16  # per worker, per micro-step
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    max_grad_norm: float = 1.0
    checkpoint_every: int = 50  # optimizer steps
    keep_checkpoints: int = 2
    max_failures: int = 1  # FailureConfig: worker failures retried from the last checkpoint
    log_every: int = 10
    strategy: Literal["ddp", "fsdp"] = "ddp"
    seed: int = 0
    # CPU training: Ray sets OMP_NUM_THREADS to a worker's CPUs (often 1); a lone worker may use more.
    torch_threads: int | None = None


@dataclass(frozen=True)
class KnowledgeAugmentationConfig:
    """KA (pipeline/cache/build/augment.py): `repeats` stochastic-routing teacher forwards per sequence,
    each token routed by sampling with probability `sampling_prob`; the cache stores their averaged
    distribution."""

    repeats: int = 1
    sampling_prob: float = 0.0

    @property
    def is_plain(self) -> bool:
        return self.repeats == 1 and self.sampling_prob == 0.0


@dataclass(frozen=True)
class CacheConfig:
    root: str = "runs/caches"  # local path or fsspec URL (s3://bucket/caches)
    layers: Literal["paired", "all"] | list[int] = "paired"  # teacher MoE layers to cache
    width: int | None = None  # cached expert width W; None = the teacher's expert count
    logits_mode: Literal["topk", "sampled"] = "topk"
    logits_k: int = 64  # top-k entries, or number of importance samples
    states_dtype: Literal["float16", "bfloat16"] = "float16"
    # Expert-state codec (docs/cache-format.md, schema v2). null = states_dtype; when set it replaces it.
    # fp8/int8: 1 B per value + a float16 scale per row; states_rank r: r coefficients per row over a basis
    # fitted on states_basis_tokens tokens; states_token_fraction f: states for a hashed subset of tokens.
    states_codec: Literal["float16", "bfloat16", "fp8", "int8"] | None = None
    states_rank: int | None = None
    states_basis_tokens: int = 65536
    states_token_fraction: float = 1.0
    # Exact fp32 states of this many validation tokens kept beside a schema-2 cache (never trained on), for
    # `moedistill report states-fidelity`; 0: none.
    states_fidelity_tokens: int = 256
    # Mass-truncated states: per token and cached expert group, only the teacher experts carrying the top
    # states_mass of the group's router mass are computed (renormalised in the group); 1.0 = exact states.
    states_mass: float = 1.0
    store_expert_states: bool = True
    teacher_responses: Literal["none", "greedy", "sample"] = "none"  # for SeqKD
    max_new_tokens: int = 64
    num_actors: int = 1
    batch_size: int = 8  # sequences per teacher forward
    rows_per_shard: int = 64  # sequences per shard
    num_gpus_per_actor: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # e.g. {"teacher_node": 1}
    knowledge_augmentation: KnowledgeAugmentationConfig = field(default_factory=KnowledgeAugmentationConfig)


@dataclass(frozen=True)
class DistillConfig:
    method: str = "b-distill"
    k: int = 3  # MC exploration length
    alpha: float = 0.2  # MC damping
    beta: float = 0.1  # ERD entropy weight
    lambda_mc: float = 1.0
    lambda_erd: float = 1.0
    temperature: float = 1.0
    token_loss_kwargs: dict[str, float] = field(default_factory=dict)
    # MC variants (docs/method.md); the defaults are the paper as written. A method preset may fix them.
    mc_state_loss: Literal["mse", "relative", "cosine"] = "mse"  # per-draw distance of the MC term
    mc_grad_scope: Literal["model", "experts"] = "model"  # experts: MC trains the experts and P only
    # subspace (a low-rank cache, cache.states_rank): the MC distance on the cached coefficients, never
    # reconstructing [N, E, D] targets; equal to full on the reconstructed states (docs/method.md).
    mc_state_space: Literal["full", "subspace"] = "full"
    lambda_mc_warmup_steps: int = 0  # lambda_mc ramps linearly from 0 over these optimizer steps
    # Per-term gradient norms/cosines every train.log_every steps (one extra backward per term on those
    # steps); changes no weights, so it is not part of the run's settings fingerprint.
    diagnostics: bool = False
    # default: "<method>-k<k>-a<alpha>-b<beta>-e<E_S>-s<seed>-<settings fingerprint>"
    run_name: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class MultipleChoiceConfig:
    """One multiple-choice test set (pipeline.evaluate.multiple_choice): accuracy by option log-likelihood."""

    name: str  # its column in the results table
    path: str | None = None  # a local .jsonl / .json / .csv (formats: pipeline/evaluate/multiple_choice.py)
    # a `datasets` name, name:config (e.g. cais/mmlu:anatomy); "demo": the bundled demo-world set
    dataset: str | None = None
    split: str = "test"  # of a `datasets` source
    limit: int | None = None  # first N items
    # plain: "question, lettered choices, Answer:" (base LMs); instruction: the same in the training
    # template; response: the question alone in the template, each option scored as the response
    prompt_style: Literal["plain", "instruction", "response"] = "plain"


@dataclass(frozen=True)
class EvalConfig:
    num_seeds: int = 3
    greedy: bool = False  # protocol of the public KD papers: sampling, temperature 1, top_p 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 16
    max_examples: int | None = None
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # per actor, e.g. {"student_node": 1}
    test_sets: list[str] = field(default_factory=list)  # extra Dolly-format JSONL / datasets names
    # data.source demo: examples per held-out demo set (paraphrase, composition, entities:
    # docs/evaluation.md), at most max_examples; 0: the test split alone
    heldout_examples: int = 100
    multiple_choice: list[MultipleChoiceConfig] = field(default_factory=list)  # accuracy, not Rouge-L


@dataclass(frozen=True)
class Config:
    name: str
    output_dir: str = ""  # default: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    finetune: TrainConfig = field(default_factory=TrainConfig)
    # The dense student's pretraining budget when student.init is "upcycle" (the same for every method).
    student_pretrain: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


# ----------------------------------------------------------------------------------------------------------
# Loading and validation


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML preset into a validated Config; `overrides` uses dotted keys ("distill.k": 2)."""
    path = Path(path)
    if not path.is_file():
        presets = sorted(p.name for p in (Path(__file__).parent.parent / "jobs" / "configs").glob("*.yaml"))
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


# ----------------------------------------------------------------------------------------------------------
# Content hashing


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


_REGIME_DEFAULTS = {"student_train_records": None, "teacher_train": "all"}


_CODEC_DEFAULTS = {
    "states_codec": None,
    "states_rank": None,
    "states_basis_tokens": 65536,
    "states_token_fraction": 1.0,
    "states_fidelity_tokens": 256,
    "states_mass": 1.0,
}


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
