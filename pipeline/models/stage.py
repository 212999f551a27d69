"""Turn a `ModelConfig` into a model: load an MoE checkpoint, upcycle a dense one, or build a tiny one."""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedModel

from pipeline.config import ModelConfig
from pipeline.models.adapter import check_adapter_reads
from pipeline.models.build import TinyMoEConfig, build_tiny_moe, load_causal_lm
from pipeline.models.dims import read_dims
from pipeline.models.upcycle import upcycle_dense_to_moe


def materialize_model(model_cfg: ModelConfig, tokenizer) -> PreTrainedModel:
    """Deterministic for a given config: every Ray worker that calls it gets identical weights."""
    if model_cfg.path is not None:
        return load_causal_lm(model_cfg.path, torch_dtype=model_cfg.torch_dtype, setting="the model path")
    if model_cfg.upcycle_from is not None:
        return upcycle_dense_to_moe(
            model_cfg.upcycle_from,
            num_experts=model_cfg.num_experts,
            top_k=model_cfg.top_k,
            noise_std=model_cfg.upcycle_noise_std,
            seed=model_cfg.seed,
        )
    assert model_cfg.build is not None  # validate_config guarantees exactly one source
    arch = TinyMoEConfig(**dataclasses.asdict(model_cfg.build))
    return build_tiny_moe(
        arch,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=model_cfg.seed,
    )


def check_student_readable(student: ModelConfig) -> None:
    """Before Ray starts: an MoE `student.path` of a family the adapter cannot read fails naming what is
    missing (built and upcycled students are families this pipeline makes; a dense path is the distillation
    stage's own error)."""
    if student.path is None:
        return
    dims = read_dims(student.path, role="student", fix="check student.path.")
    if dims.num_experts is not None:
        check_adapter_reads(dims, student.path, "student")


def load_for_evaluation(model_cfg: Any, tokenizer: Any) -> Any:
    """The model of `model_cfg` (a ModelConfig) for one placed task: on its GPU in bfloat16 when Ray gave it
    one (a teacher too large for fp32 on one GPU still fits), else on the CPU in float32."""
    import torch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    return materialize_model(model_cfg, tokenizer).to(device=device, dtype=dtype)
