"""Stage 2: distil a student from the teacher cache with Ray Train. For an offline method the teacher
checkpoint is never opened: everything teacher-side comes from the cache's manifest and arrays. An on-policy
method (one whose resolved method has `online` set) also starts the teacher service on the teacher's
resources (cache.resources / num_gpus_per_actor) for the run, to score the student's own samples."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.cache.read.reader import TeacherCache, open_cache, read_cache_dataset
from pipeline.cache.stage import cache_spec_from_config, locate_cache, teacher_checkpoint
from pipeline.config import Config, ModelConfig, model_settings, train_settings
from pipeline.data.stage import PreparedData, load_tokenizer, prepare_data
from pipeline.data.tokenize import tokenize_records
from pipeline.distill.methods import MethodSpec, ResolvedMethod, resolve_method
from pipeline.distill.onpolicy_task import OnPolicyTask
from pipeline.distill.task import DistillTask
from pipeline.errors import ConfigError, ModelError
from pipeline.finetune.student_init import resolve_student
from pipeline.locks import run_lock
from pipeline.models.alignment import layer_pairs
from pipeline.models.build import count_parameters
from pipeline.models.compat import check_models_share_tokenizer
from pipeline.models.dims import model_dims
from pipeline.models.export import export_is_complete
from pipeline.models.generate import validation_loss
from pipeline.models.stage import load_for_evaluation
from pipeline.placement import run_placed_like, small_cluster_cpu_share
from pipeline.run_identity import claim_run_dir, settings_fingerprint
from pipeline.storage import redact
from pipeline.teacher_service import TeacherService, TeacherServiceConfig, start_teacher_service
from pipeline.training.loop import LoopSpec, plan_total_steps
from pipeline.training.runner import fit
from pipeline.workspace import paths_for


def cache_fields_for(method: MethodSpec) -> set[str]:
    """Column projection: a run reads only what its loss terms need (SFT reads no teacher arrays at all)."""
    return set(method.cache_fields)


def run_settings(config: Config, cache_key: str, method: ResolvedMethod | None = None) -> dict[str, Any]:
    """Everything that decides the trained student: its model, the distillation settings (with the method
    preset's fixed ones filled in) and the cache. `diagnostics` only adds metrics, so it is left out.
    `method`: config.distill resolved (None: resolved here)."""
    method = method or resolve_method(config.distill)
    left_out = ("run_name", "train", "diagnostics")
    distill = {k: v for k, v in asdict(method.distill).items() if k not in left_out}
    settings = {
        "cache_key": cache_key,
        "student": model_settings(config.student),
        "distill": {**distill, "train": train_settings(config.distill.train)},
    }
    if config.student.init != "random":  # the pretrained starting point decides the student too
        settings["student_pretrain"] = train_settings(config.student_pretrain)
    online = method.online
    if online is not None:  # a preset's loss settings decide the student: a changed preset never reuses runs
        settings["on_policy"] = {"loss": online.loss, "loss_kwargs": online.loss_kwargs, "sgo": online.sgo}
    return settings


def default_run_name(config: Config, cache_key: str, method: ResolvedMethod | None = None) -> str:
    """Readable settings, then a fingerprint of them all: runs that differ anywhere never share a folder."""
    method = method or resolve_method(config.distill)
    d = method.distill
    if d.run_name:
        return d.run_name
    experts = config.student.build.num_experts if config.student.build else config.student.num_experts
    fingerprint = settings_fingerprint(run_settings(config, cache_key, method))
    return f"{d.method}-k{d.k}-a{d.alpha:g}-b{d.beta:g}-e{experts}-s{d.train.seed}-{fingerprint}"


@dataclass(frozen=True)
class DistillResult:
    run_name: str
    method: str
    export_dir: str
    skipped: bool
    wall_s: float
    val_loss: float
    num_parameters: int
    cache_path: str
    teacher_service: dict[str, Any] | None = None  # an on-policy run's service counters (ServiceCounters)


def run_distill(config: Config, cache_path: str | None = None) -> DistillResult:
    # The one resolution of distill.method for this run: everything below reads `method` (never its name).
    method = resolve_method(config.distill, config.student.init)
    online = method.online  # None: offline
    paths = paths_for(config)
    prepared = prepare_data(config)
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    check_models_share_tokenizer(config, tokenizer, roles=("student",))
    cache_path = cache_path or locate_cache(config)
    cache = open_cache(cache_path)
    cache.check_tokenizer(prepared.tokenizer_path)
    # The student's shape from its config: the driver never builds or loads the student.
    student = model_dims(config.student, vocab_size=len(tokenizer))
    num_experts = student.num_experts
    if num_experts is None:
        raise ModelError(
            f"the student ({config.student.path}) is a dense {student.model_type!r} model. Fix: give an MoE "
            "checkpoint as student.path, or upcycle a dense one with student.upcycle_from."
        )
    distill = method.distill
    if method.spec.uses_mc and distill.alpha == 0 and distill.k > num_experts:
        raise ConfigError(
            f"distill.alpha = 0 draws K = {distill.k} distinct experts per token, but the student has "
            f"{num_experts}. Fix: set distill.k <= {num_experts}, or distill.alpha > 0."
        )
    pairs = layer_pairs(int(cache.manifest["teacher"]["num_layers"]), student.num_layers)
    fields = cache_fields_for(method.spec)
    cache.check_student(
        vocab_size=student.vocab_size,  # logits width (a checkpoint's config), not len(tokenizer)
        teacher_layers_needed=[t for _, t in pairs] if fields & {"gates", "expert_states"} else [],
        num_student_experts=num_experts,
        fields=fields,
    )
    states_space = _states_space(method.spec, distill.mc_state_space, cache)
    run_name = default_run_name(config, cache.key, method)
    run_dir = paths.students / run_name
    claim_run_dir(
        run_dir,
        run_settings(config, cache.key, method),
        what=f"student run {run_name!r}",
        fix="choose another distill.run_name (or leave it unset: default names carry a settings "
        "fingerprint), or delete that folder to retrain under this name.",
    )
    # one process trains a run at a time: a second (another sweep sharing this run) waits, then reuses it
    with run_lock(run_dir, "student run"):
        export_dir = run_dir / "final"
        if export_is_complete(export_dir):
            print(f"[distill] {run_name}: already finished at {export_dir}; reusing it", flush=True)
            skipped, wall = True, 0.0
        else:
            skipped = False
            dataset = read_cache_dataset(
                cache_path,
                fields=fields,
                num_student_experts=num_experts,
                teacher_layers=[t for _, t in pairs],
                states_space=states_space,
                with_state_mask=True,  # the objective averages the MC term over expert_state_mask
            )
            rows = cache.num_sequences
            train = config.distill.train
            spec = LoopSpec(
                train=train,
                total_steps=plan_total_steps(train, rows),
                rows_per_epoch=rows,
                export_dir=str(export_dir),
                metrics_dir=str(run_dir / "metrics"),
            )
            print(
                f"[distill] {run_name}: {rows} cached sequences from {redact(cache_path)} (fields: "
                f"{', '.join(sorted(fields)) or 'none'}), {spec.total_steps} steps",
                flush=True,
            )
            if "expert_states" in fields and cache.states.subsampled and distill.mc_state_loss == "mse":
                # Measured, not a bug: fewer MC tokens per step make the unbounded MSE term noisier, and
                # every term trains slower (docs/method.md, "Token subsampling").
                print(
                    "[distill] warning: this cache keeps expert states for "
                    f"{cache.states.token_fraction:.0%} of the tokens, and the MSE MC distance trains worse "
                    "from it (demo: 2.41 validation loss against 1.89 from every token). Fix: "
                    "distill.mc_state_loss=cosine (b-distill-stable), or a cache with "
                    "cache.states_token_fraction: 1.",
                    flush=True,
                )
            # student.init: upcycle / lora-moe -> the workers build the student made from the pretrained dense
            # one (made once). The LoRA-MoE student trains on logits alone: no layer pairs to read.
            task_config = replace(config, student=resolve_student(config))
            student_pairs = [] if config.student.init == "lora-moe" else pairs
            started = time.perf_counter()
            tokenizer_path, teacher_hidden_size = prepared.tokenizer_path, cache.hidden_size
            service = _start_service(config, tokenizer_path, cache.width) if online else None
            client, total_steps = (service.client() if service else None), spec.total_steps
            # distillm-sgo validates during training (its adaptive schedule): the tokenised validation split
            val_examples = (
                _validation_examples(config, prepared, tokenizer) if online and online.sgo else None
            )

            def make_task() -> DistillTask:
                if client is None:
                    return DistillTask(
                        task_config,
                        tokenizer_path=tokenizer_path,
                        pairs=student_pairs,
                        teacher_hidden_size=teacher_hidden_size,
                        cache_path=cache_path,
                        method=method,
                    )
                return OnPolicyTask(  # student samples scored through `client` (token ids only)
                    task_config,
                    tokenizer_path=tokenizer_path,
                    pairs=pairs,
                    teacher_hidden_size=teacher_hidden_size,
                    client=client,
                    total_steps=total_steps,
                    validation_examples=val_examples,
                    method=method,
                )

            try:
                fit(
                    make_task,
                    spec,
                    run_name=f"{config.name}-{run_name}",
                    storage_path=str(paths.ray_storage),
                    datasets={"train": dataset},
                    reserved_cpus=_service_cpus(service),
                )
                service_stats = service.stats() if service else None
            finally:
                if service:
                    service.shutdown()
            wall = time.perf_counter() - started
        if skipped and (run_dir / "summary.json").exists():  # measured when the run finished
            summary = load_run_summary(run_dir)
            val_loss, num_parameters = float(summary["val_loss"]), int(summary["num_parameters"])
            service_stats = summary.get("teacher_service")
        else:  # where the student trains, never on the job driver (pipeline.placement.run_placed_like)
            if skipped:  # exported, but stopped before its summary was written: measure it now
                service_stats = None
            args = (
                str(export_dir),
                prepared.tokenizer_path,
                _validation_examples(config, prepared, tokenizer),
            )
            val_loss, num_parameters = run_placed_like(config.distill.train, _measure_student, *args)
        result = DistillResult(
            run_name=run_name,
            method=method.name,
            export_dir=str(export_dir),
            skipped=skipped,
            wall_s=wall,
            val_loss=val_loss,
            num_parameters=num_parameters,
            cache_path=cache_path,
            teacher_service=service_stats,
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        stored = {**asdict(result), "cache_path": redact(result.cache_path)}  # never store URL credentials
        (run_dir / "summary.json").write_text(json.dumps(stored, indent=2))
        return result


def _states_space(method: MethodSpec, mc_state_space: str, cache: TeacherCache) -> str:
    """How the run reads expert states: "subspace" (coefficients) only for an MC run on a low-rank cache."""
    if not method.needs_expert_states or mc_state_space == "full":
        return "full"
    if cache.states.rank is None:
        raise ConfigError(
            f"distill.mc_state_space: subspace needs a low-rank cache, but cache {cache.key} stores full "
            "expert states (cache.states_rank: null). Fix: set distill.mc_state_space: full, or rebuild the "
            "cache with cache.states_rank set (e.g. 64)."
        )
    return "subspace"


def _service_cpus(service: TeacherService | None) -> float:
    """CPUs the teacher service's actors hold while the students train."""
    return service.config.num_actors * service.config.num_cpus_per_actor if service else 0.0


def _start_service(config: Config, tokenizer_path: str, width: int) -> TeacherService:
    """The teacher service for an on-policy run: the cache's teacher (the fine-tuned checkpoint) and served
    format, on the cache stage's teacher placement, refused where it would share a GPU with the students."""
    spec = cache_spec_from_config(config, teacher_checkpoint(config), tokenizer_path)
    overrides: dict[str, Any] = {}
    share = (
        None
        if config.cache.num_gpus_per_actor
        else small_cluster_cpu_share(config.cache.num_actors, config.distill.train)
    )
    if share is not None:  # a small CPU cluster: whole CPUs for teacher and students would starve Ray Data
        overrides["num_cpus_per_actor"] = share
    print(f"[distill] starting the teacher service ({config.cache.num_actors} teacher actors)", flush=True)
    return start_teacher_service(
        spec, width, TeacherServiceConfig.from_cache(config.cache, **overrides), train=config.distill.train
    )


def _measure_student(export_dir: str, tokenizer_path: str, val_examples: list[dict]) -> tuple[float, int]:
    """(validation loss, parameter count) of the exported student, in one placed task."""
    tokenizer = load_tokenizer(tokenizer_path)
    student = load_for_evaluation(ModelConfig(path=export_dir), tokenizer)
    return validation_loss(student, val_examples, tokenizer.pad_token_id), count_parameters(student)


def _validation_examples(config: Config, prepared: PreparedData, tokenizer: Any) -> list[dict[str, Any]]:
    return tokenize_records(tokenizer, prepared.splits.validation, config.data.max_length)[0]


def format_distill_result(result: DistillResult) -> str:
    state = "reused finished run" if result.skipped else f"{result.wall_s:.0f} s"
    return (
        f"student {result.run_name} ({result.num_parameters / 1e6:.2f}M parameters, {state}): "
        f"validation loss {result.val_loss:.3f}; export {result.export_dir}"
    )


def load_run_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())
