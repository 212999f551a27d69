"""`student.init: upcycle` / `lora-moe`: the student starts from a pretrained dense model.

`upcycle`: the pretrained dense model upcycled to MoE, as in the paper.

The paper's students are pretrained dense checkpoints upcycled to MoE; the demo's students start from random
weights. With `student.init: upcycle` a dense counterpart of `student.build` (same width, depth, heads; its
MLP as wide as one expert) is first trained as a plain language model on the training split's text (prompt
and response) for the fixed budget `student_pretrain` -- the same for every method -- then each distillation
run upcycles it with `pipeline.models.upcycle.upcycle_dense_to_moe` (every expert a copy of the dense MLP,
a fresh router seeded by `student.seed`).

The dense model is trained once per setting: its directory is named by a fingerprint of everything that
decides it (architecture, seed, data, tokenizer, budget), so every run of a sweep, every method and every
training seed reuses it, like the teacher.

`lora-moe` (MoE-KD's student, docs/method.md "MoE-KD baseline"): the same pretrained dense model with a
mixture of LoRA experts beside the MLP of `student.lora_moe.layers` (pipeline.models.lora_moe), then
supervised-fine-tuned on the training responses for the `student_pretrain` budget, as MoE-KD fine-tunes its
student before distilling. That fine-tuned LoRA-MoE is made once per setting too, and every run loads it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import (
    ArchitectureConfig,
    Config,
    LoraMoEConfig,
    ModelConfig,
    stable_hash,
    teacher_fields,
    train_settings,
)
from pipeline.data.collate import pad_batch
from pipeline.data.stage import load_tokenizer, prepare_data
from pipeline.data.tokenize import tokenize_records
from pipeline.errors import ConfigError
from pipeline.finetune.task import SupervisedTask
from pipeline.locks import run_lock
from pipeline.models.build import build_tiny_dense, lora_moe_from_dense
from pipeline.models.export import export_hf_checkpoint, export_is_complete
from pipeline.run_identity import claim_run_dir
from pipeline.training.loop import LoopSpec, plan_total_steps
from pipeline.training.runner import fit
from pipeline.workspace import paths_for


class DenseLanguageModelTask:
    """Next-token cross-entropy on every token of the text (prompt and response): plain pretraining."""

    def __init__(self, arch: ArchitectureConfig, seed: int, tokenizer_path: str) -> None:
        self.arch = arch
        self.seed = seed
        self.tokenizer_path = tokenizer_path

    @property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.tokenizer_path)

    def build_model(self) -> torch.nn.Module:
        return build_tiny_dense(self.arch, self.tokenizer, seed=self.seed)

    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        padded = pad_batch(batch, self.tokenizer.pad_token_id)
        labels = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)
        return {
            "input_ids": padded["input_ids"],
            "attention_mask": padded["attention_mask"],
            "labels": labels,
        }

    def compute_loss(self, model, batch, step):
        loss = model(**batch).loss
        return loss, {"loss": float(loss.detach())}

    def export(self, model: torch.nn.Module, export_dir: str) -> None:
        export_hf_checkpoint(model, self.tokenizer, export_dir, info={"stage": "student-init"})


class LoraMoESupervisedTask(SupervisedTask):
    """MoE-KD's first stage: the LoRA-MoE built on the pretrained dense student, fine-tuned on the responses
    (every parameter trains, as the released code's `--train_mode full`)."""

    def __init__(
        self, dense_path: str, lora: LoraMoEConfig, arch: ArchitectureConfig, seed: int, tokenizer_path: str
    ) -> None:
        super().__init__(ModelConfig(path=dense_path), tokenizer_path)
        self.lora, self.arch, self.seed = lora, arch, seed

    def build_model(self) -> torch.nn.Module:
        arch, dense = self.arch, str(self.model_cfg.path)
        return lora_moe_from_dense(dense, self.lora, arch.num_experts, arch.top_k, self.seed).float()

    def export(self, model: torch.nn.Module, export_dir: str) -> None:
        export_hf_checkpoint(model, self.tokenizer, export_dir, info={"stage": "student-init"})


def dense_student_settings(config: Config) -> dict[str, Any]:
    """Everything that decides the pretrained dense student (its directory's fingerprint)."""
    assert config.student.build is not None
    return {
        "architecture": dataclasses.asdict(config.student.build),
        "seed": config.student.seed,
        "pretrain": train_settings(config.student_pretrain),
        # the data and tokenizer the text comes from: the teacher's, by construction
        "data": teacher_fields(config)["data"],
        "tokenizer": teacher_fields(config)["tokenizer"],
    }


def dense_student_dir(config: Config) -> Path:
    return paths_for(config).root / "student-init" / f"dense-{stable_hash(dense_student_settings(config), 8)}"


def lora_moe_student_settings(config: Config) -> dict[str, Any]:
    """Everything that decides the fine-tuned LoRA-MoE student: its dense start, the mixture, the budget."""
    return {
        "dense": dense_student_settings(config),
        "lora_moe": dataclasses.asdict(config.student.lora_moe),  # experts and top-k: in the architecture
        "sft": train_settings(config.student_pretrain),
    }


def lora_moe_student_dir(config: Config) -> Path:
    name = f"lora-moe-{stable_hash(lora_moe_student_settings(config), 8)}"
    return paths_for(config).root / "student-init" / name


def resolve_student(config: Config) -> ModelConfig:
    """The student's ModelConfig as training builds it: itself, the upcycled pretrained dense student, or
    the fine-tuned LoRA-MoE on it (each made first when it does not exist yet; reused otherwise)."""
    student = config.student
    if student.init == "random":
        return student
    if student.build is None:
        raise ConfigError(
            f"student.init: {student.init} pretrains a dense counterpart of student.build, but this "
            f"student comes from {'student.path' if student.path else 'student.upcycle_from'}. Fix: set "
            "student.init: random (a checkpoint already carries its own pretraining), or describe the "
            "student with student.build."
        )
    dense = dense_student_dir(config) / "final"
    arch, seed = student.build, student.seed
    # Every run of every sweep shares these students: one process trains each, the others wait for it.
    _train_once(
        config,
        dense,
        dense_student_settings(config),
        "pretrained dense student",
        lambda tokenizer_path: DenseLanguageModelTask(arch, seed, tokenizer_path),
    )
    if student.init == "upcycle":
        return ModelConfig(
            upcycle_from=str(dense),
            num_experts=student.build.num_experts,
            top_k=student.build.top_k,
            upcycle_noise_std=student.upcycle_noise_std,
            seed=student.seed,
            torch_dtype=student.torch_dtype,
        )
    final, lora = lora_moe_student_dir(config) / "final", student.lora_moe
    _train_once(
        config,
        final,
        lora_moe_student_settings(config),
        "fine-tuned LoRA-MoE student",
        lambda tokenizer_path: LoraMoESupervisedTask(str(dense), lora, arch, seed, tokenizer_path),
    )
    return ModelConfig(path=str(final), seed=student.seed, torch_dtype=student.torch_dtype)


def _train_once(
    config: Config, final: Path, settings: dict[str, Any], what: str, make_task: Callable[[str], Any]
) -> None:
    """Train `make_task(tokenizer_path)`'s model on the training split for the student_pretrain budget into
    `final`, unless a finished export is there; `settings` are its identity (run_identity)."""
    import ray  # the driver side of a Ray Train run

    run_dir = final.parent
    with run_lock(run_dir, what):
        if export_is_complete(final):
            print(f"[student-init] reusing the {what} at {final}", flush=True)
            return
        claim_run_dir(
            run_dir,
            settings,
            what=f"the {what}",
            fix="delete that folder to train it again, or give this config its own output_dir.",
        )
        prepared = prepare_data(config)
        tokenizer = load_tokenizer(prepared.tokenizer_path)
        examples, _ = tokenize_records(tokenizer, prepared.splits.train, config.data.max_length)
        train = config.student_pretrain
        spec = LoopSpec(
            train=train,
            total_steps=plan_total_steps(train, len(examples)),
            rows_per_epoch=len(examples),
            export_dir=str(final),
            metrics_dir=str(run_dir / "metrics"),
        )
        print(
            f"[student-init] training the {what} on {len(examples)} training texts for {spec.total_steps} "
            "steps (student_pretrain)",
            flush=True,
        )
        started, tokenizer_path = time.perf_counter(), prepared.tokenizer_path
        fit(
            lambda: make_task(tokenizer_path),
            spec,
            run_name=f"{config.name}-{run_dir.name}",
            storage_path=str(paths_for(config).ray_storage),
            datasets={"train": ray.data.from_items(examples)},
        )
        print(f"[student-init] {what} trained in {time.perf_counter() - started:.0f} s", flush=True)
