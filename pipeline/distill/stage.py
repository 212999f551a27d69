"""Stage 2: distil a student from the teacher cache with Ray Train. The teacher checkpoint is never opened:
everything teacher-side comes from the cache's manifest and arrays."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, ModelConfig, train_settings
from pipeline.data.collate import distill_positions, pad_batch
from pipeline.data.stage import load_tokenizer, prepare_data
from pipeline.distill.methods import MethodSpec, get_method
from pipeline.distill.objective import ObjectiveWeights, distill_objective
from pipeline.distill.student import DistillStudent
from pipeline.errors import CacheError
from pipeline.models.alignment import layer_pairs
from pipeline.models.compat import check_models_share_tokenizer
from pipeline.models.export import export_hf_checkpoint, export_is_complete
from pipeline.models.generate import validation_loss
from pipeline.models.stage import load_for_evaluation, materialize_model
from pipeline.placement import run_placed_like
from pipeline.run_identity import claim_run_dir, settings_fingerprint
from pipeline.training.loop import LoopSpec, plan_total_steps
from pipeline.training.parallel import decoder_layers
from pipeline.training.runner import fit
from pipeline.workspace import paths_for

PER_TOKEN_COLUMNS = ("logit_indices", "logit_values", "logit_tail_logmass", "gates", "expert_states")


def cache_fields_for(method: MethodSpec) -> set[str]:
    """Column projection: a run reads only what its loss needs (SFT reads no teacher arrays at all)."""
    fields: set[str] = set()
    if method.token_loss is not None:
        fields.add("logits")
    if method.uses_erd or method.uses_mc:
        fields.add("gates")
    if method.uses_mc:
        fields.add("expert_states")
    if method.uses_teacher_responses:
        fields.add("teacher_responses")
    return fields


def run_settings(config: Config, cache_key: str) -> dict[str, Any]:
    """Everything that decides the trained student: its model, the distillation settings and the cache."""
    distill = {k: v for k, v in asdict(config.distill).items() if k not in ("run_name", "train")}
    return {
        "cache_key": cache_key,
        "student": asdict(config.student),
        "distill": {**distill, "train": train_settings(config.distill.train)},
    }


def default_run_name(config: Config, cache_key: str) -> str:
    """Readable settings, then a fingerprint of them all: runs that differ anywhere never share a folder."""
    d = config.distill
    if d.run_name:
        return d.run_name
    experts = config.student.build.num_experts if config.student.build else config.student.num_experts
    fingerprint = settings_fingerprint(run_settings(config, cache_key))
    return f"{d.method}-k{d.k}-a{d.alpha:g}-b{d.beta:g}-e{experts}-s{d.train.seed}-{fingerprint}"


class DistillTask:
    """Built inside each Ray Train worker; holds no teacher, only the cache's per-token targets."""

    def __init__(
        self,
        student_cfg: ModelConfig,
        tokenizer_path: str,
        method: MethodSpec,
        weights: ObjectiveWeights,
        pairs: list[tuple[int, int]],
        teacher_hidden_size: int,
        seed: int,
    ) -> None:
        self.student_cfg = student_cfg
        self.tokenizer_path = tokenizer_path
        self.method = method
        self.weights = weights
        self.pairs = pairs
        self.teacher_hidden_size = teacher_hidden_size
        self.seed = seed
        self._tokenizer = None
        self._generator: torch.Generator | None = None
        self._last_step, self._micro = -1, 0

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def build_model(self) -> torch.nn.Module:
        student = materialize_model(self.student_cfg, self.tokenizer).float()
        return DistillStudent(student, [s for s, _ in self.pairs], self.teacher_hidden_size)

    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if self.method.uses_teacher_responses:
            batch = _with_teacher_responses(batch)
        padded = pad_batch(batch, self.tokenizer.pad_token_id)
        out = {k: padded[k] for k in ("input_ids", "attention_mask", "response_mask")}
        expected = int(distill_positions(out["response_mask"]).sum())
        for name in PER_TOKEN_COLUMNS:
            if name in batch and not self.method.uses_teacher_responses:
                out[name] = torch.from_numpy(np.concatenate([np.asarray(a) for a in batch[name]], axis=0))
                if out[name].shape[0] != expected:
                    raise CacheError(
                        f"cached {name} has {out[name].shape[0]} token rows for a batch with {expected} "
                        "distillation positions: the cache was built from different tokenisation. Rebuild "
                        "it with `moedistill cache --config ...` for this config."
                    )
        return out

    def fsdp_units(self, model: DistillStudent) -> list[torch.nn.Module]:
        """Decoder layers FSDP may shard on their own: all but the paired ones when the MC term reads every
        expert's weights after the forward (pipeline.training.parallel explains why)."""
        layers = decoder_layers(model)
        if not self.method.uses_mc:
            return layers
        paired = {id(model.student.model.layers[s]) for s, _ in self.pairs}
        return [layer for layer in layers if id(layer) not in paired]

    def mc_generator(self, device: torch.device, step: int) -> torch.Generator:
        """MC draws seeded by (seed, rank, step, micro-batch): independent across workers and identical
        after a resume, with no generator state to checkpoint. Lives on the gates' device (multinomial
        refuses a CPU generator for CUDA probabilities)."""
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        self._micro = self._micro + 1 if step == self._last_step else 0
        self._last_step = step
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        seed = hash((self.seed, rank, step, self._micro)) & 0x7FFF_FFFF_FFFF_FFFF
        return self._generator.manual_seed(seed)

    def compute_loss(self, model, batch, step):
        generator = self.mc_generator(batch["input_ids"].device, step) if self.method.uses_mc else None
        token_mask = distill_positions(batch["response_mask"])
        forward = model(
            batch["input_ids"],
            batch["attention_mask"],
            token_mask,
            with_experts=self.method.uses_mc,
        )
        return distill_objective(self.method, self.weights, forward, batch, token_mask, generator)

    def export(self, model: torch.nn.Module, export_dir: str) -> None:
        # Only the HF student is exported; the projections P are training-only (DESIGN.md).
        export_hf_checkpoint(
            model.student, self.tokenizer, export_dir, info={"stage": "distill", "method": self.method.name}
        )


def _with_teacher_responses(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """SeqKD: the prompt followed by the teacher's cached response instead of the dataset's."""
    ids, masks = [], []
    for input_ids, mask, response in zip(
        batch["input_ids"], batch["response_mask"], batch["teacher_response"], strict=True
    ):
        mask = np.asarray(mask)
        prompt_len = int(np.argmax(mask == 1)) if mask.any() else len(mask)
        prompt = list(np.asarray(input_ids)[:prompt_len])
        resp = list(np.asarray(response))
        ids.append(prompt + resp)
        masks.append([0] * len(prompt) + [1] * len(resp))
    return {"input_ids": ids, "response_mask": masks, "seq_id": list(batch["seq_id"])}


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


def run_distill(config: Config, cache_path: str | None = None) -> DistillResult:

    from pipeline.cache.reader import open_cache, read_cache_dataset
    from pipeline.cache.stage import locate_cache

    method = get_method(config.distill.method)
    paths = paths_for(config)
    prepared = prepare_data(config)
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    check_models_share_tokenizer(config, tokenizer, roles=("student",))
    cache_path = cache_path or locate_cache(config)
    cache = open_cache(cache_path)
    cache.check_tokenizer(prepared.tokenizer_path)
    student_probe = materialize_model(config.student, tokenizer)
    student_layers = student_probe.config.num_hidden_layers
    num_experts = (
        student_probe.config.num_experts
        if hasattr(student_probe.config, "num_experts")
        else (student_probe.config.num_local_experts)
    )
    pairs = layer_pairs(int(cache.manifest["teacher"]["num_layers"]), student_layers)
    fields = cache_fields_for(method)
    cache.check_student(
        vocab_size=int(student_probe.config.vocab_size),  # logits width, not len(tokenizer)
        teacher_layers_needed=[t for _, t in pairs] if fields & {"gates", "expert_states"} else [],
        num_student_experts=num_experts,
        fields=fields,
    )
    run_name = default_run_name(config, cache.key)
    run_dir = paths.students / run_name
    claim_run_dir(
        run_dir,
        run_settings(config, cache.key),
        what=f"student run {run_name!r}",
        fix="choose another distill.run_name (or leave it unset: default names carry a settings "
        "fingerprint), or delete that folder to retrain under this name.",
    )
    export_dir = run_dir / "final"
    num_parameters = sum(p.numel() for p in student_probe.parameters())
    if export_is_complete(export_dir):
        print(f"[distill] {run_name}: already finished at {export_dir}; reusing it", flush=True)
        skipped, wall = True, 0.0
    else:
        skipped = False
        dataset = read_cache_dataset(
            cache_path, fields=fields, num_student_experts=num_experts, teacher_layers=[t for _, t in pairs]
        )
        rows = cache.num_sequences
        d = config.distill
        weights = ObjectiveWeights(d.k, d.alpha, d.beta, d.lambda_mc, d.lambda_erd, d.temperature)
        if d.token_loss_kwargs:
            method = MethodSpec(**{**asdict(method), "token_loss_kwargs": dict(d.token_loss_kwargs)})
        spec = LoopSpec(
            train=d.train,
            total_steps=plan_total_steps(d.train, rows),
            rows_per_epoch=rows,
            export_dir=str(export_dir),
            metrics_dir=str(run_dir / "metrics"),
        )
        task_args = (
            config.student,
            prepared.tokenizer_path,
            method,
            weights,
            pairs,
            cache.hidden_size,
            d.train.seed,
        )
        print(
            f"[distill] {run_name}: {rows} cached sequences from {cache_path} (fields: "
            f"{', '.join(sorted(fields)) or 'none'}), {spec.total_steps} steps",
            flush=True,
        )
        started = time.perf_counter()
        fit(
            lambda: DistillTask(*task_args),
            spec,
            run_name=f"{config.name}-{run_name}",
            storage_path=str(paths.ray_storage),
            datasets={"train": dataset},
        )
        wall = time.perf_counter() - started
    if skipped and (run_dir / "summary.json").exists():  # measured when the run finished
        val_loss = float(load_run_summary(run_dir)["val_loss"])
    else:  # where the student trains, never on the job driver (pipeline.training.placed)
        args = (str(export_dir), prepared.tokenizer_path, _validation_examples(config, prepared, tokenizer))
        val_loss = run_placed_like(config.distill.train, _student_validation_loss, *args)
    result = DistillResult(
        run_name=run_name,
        method=method.name,
        export_dir=str(export_dir),
        skipped=skipped,
        wall_s=wall,
        val_loss=val_loss,
        num_parameters=num_parameters,
        cache_path=cache_path,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def _student_validation_loss(export_dir: str, tokenizer_path: str, val_examples: list[dict]) -> float:
    tokenizer = load_tokenizer(tokenizer_path)
    student = load_for_evaluation(ModelConfig(path=export_dir), tokenizer)
    return validation_loss(student, val_examples, tokenizer.pad_token_id)


def _validation_examples(config: Config, prepared, tokenizer) -> list[dict[str, Any]]:
    from pipeline.data.tokenize import tokenize_records

    return tokenize_records(tokenizer, prepared.splits.validation, config.data.max_length)[0]


def format_distill_result(result: DistillResult) -> str:
    state = "reused finished run" if result.skipped else f"{result.wall_s:.0f} s"
    return (
        f"student {result.run_name} ({result.num_parameters / 1e6:.2f}M parameters, {state}): "
        f"validation loss {result.val_loss:.3f}; export {result.export_dir}"
    )


def load_run_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())
