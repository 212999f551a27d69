"""`student.init: upcycle`: the student starts as a pretrained dense model upcycled to MoE, as in the paper.

The paper's students are pretrained dense checkpoints upcycled to MoE; the demo's students start from random
weights. With `student.init: upcycle` a dense counterpart of `student.build` (same width, depth, heads; its
MLP as wide as one expert) is first trained as a plain language model on the training split's text (prompt
and response) for the fixed budget `student_pretrain` -- the same for every method -- then each distillation
run upcycles it with `pipeline.models.upcycle.upcycle_dense_to_moe` (every expert a copy of the dense MLP,
a fresh router seeded by `student.seed`).

The dense model is trained once per setting: its directory is named by a fingerprint of everything that
decides it (architecture, seed, data, tokenizer, budget), so every run of a sweep, every method and every
training seed reuses it, like the teacher.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import (
    ArchitectureConfig,
    Config,
    ModelConfig,
    stable_hash,
    teacher_fields,
    train_settings,
)
from pipeline.data.collate import pad_batch
from pipeline.data.stage import load_tokenizer, prepare_data
from pipeline.data.tokenize import tokenize_records
from pipeline.errors import ConfigError
from pipeline.locks import run_lock
from pipeline.models.build import build_tiny_dense
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


def resolve_student(config: Config) -> ModelConfig:
    """The student's ModelConfig as training builds it: itself, or the upcycled pretrained dense student
    (trained first when it does not exist yet; reused otherwise)."""
    student = config.student
    if student.init == "random":
        return student
    if student.build is None:
        raise ConfigError(
            "student.init: upcycle pretrains a dense counterpart of student.build, but this student comes "
            f"from {'student.path' if student.path else 'student.upcycle_from'}. Fix: set student.init: "
            "random (a checkpoint already carries its own pretraining), or describe the student with "
            "student.build."
        )
    final = dense_student_dir(config) / "final"
    # Every upcycled run of every sweep shares this student: one process pretrains it, the others wait for it.
    with run_lock(final.parent, "pretrained dense student"):
        if not export_is_complete(final):
            _pretrain_dense_student(config, final)
        else:
            print(f"[student-init] reusing the pretrained dense student at {final}", flush=True)
    return ModelConfig(
        upcycle_from=str(final),
        num_experts=student.build.num_experts,
        top_k=student.build.top_k,
        upcycle_noise_std=student.upcycle_noise_std,
        seed=student.seed,
        torch_dtype=student.torch_dtype,
    )


def _pretrain_dense_student(config: Config, final: Path) -> None:
    import ray  # the driver side of a Ray Train run

    run_dir = final.parent
    settings = dense_student_settings(config)
    claim_run_dir(
        run_dir,
        settings,
        what="the pretrained dense student",
        fix="delete that folder to pretrain it again, or give this config its own output_dir.",
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
    arch, seed, tokenizer_path = config.student.build, config.student.seed, prepared.tokenizer_path
    assert arch is not None
    print(
        f"[student-init] pretraining the dense student on {len(examples)} training texts for "
        f"{spec.total_steps} steps (student_pretrain), then upcycling it for every run",
        flush=True,
    )
    started = time.perf_counter()
    fit(
        lambda: DenseLanguageModelTask(arch, seed, tokenizer_path),
        spec,
        run_name=f"{config.name}-{run_dir.name}",
        storage_path=str(paths_for(config).ray_storage),
        datasets={"train": ray.data.from_items(examples)},
    )
    print(f"[student-init] dense student pretrained in {time.perf_counter() - started:.0f} s", flush=True)
