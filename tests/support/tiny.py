"""The one home of the tests' tiny things: MoE architectures, demo tokenizers, saved teachers and configs.

Every test builds its models and tokenizers through these helpers; what differs between tests (record
count, vocabulary, depth, experts, seeds) is an argument, so a test's own numbers stay visible where it
asserts on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.cache.format.spec import CacheSpec
from pipeline.config import Config, config_to_dict, load_config, with_overrides
from pipeline.data.demo_dataset import generate_demo_records
from pipeline.data.demo_tokenizer import record_texts, train_demo_tokenizer
from pipeline.data.records import Record
from pipeline.data.stage import load_tokenizer, prepare_data
from pipeline.data.template import TEMPLATE_SPEC
from pipeline.distill.student import DistillStudent
from pipeline.models.build import TinyMoEConfig, build_tiny_moe
from pipeline.models.export import export_hf_checkpoint
from pipeline.models.stage import materialize_model
from support.paths import TINY

# The shape most cache and service tests use for their teacher: 8 experts of width 32 over 4 heads of 8.
TEACHER_SHAPE: dict[str, Any] = dict(
    hidden_size=32,
    num_layers=4,
    num_experts=8,
    top_k=2,
    moe_intermediate_size=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=512,
    initializer_range=0.1,
)

# The session's shared fine-tuned teacher (conftest's `tiny_teacher_cache`): tiny.yaml plus these settings. A
# test that runs stages on a copy of it (or a sweep over it) gives the same ones, or the stages would see
# another teacher and cache.
SHARED_TEACHER: dict[str, Any] = {
    "finetune.num_workers": 0,  # in-process: fine-tuning itself is tested in tests/finetune
    "cache.teacher_responses": "greedy",  # for the on-policy methods that read teacher responses
    "cache.max_new_tokens": 16,
}


def tiny_arch(**overrides: Any) -> TinyMoEConfig:
    """TEACHER_SHAPE with `overrides` (e.g. num_layers=2, num_experts=4)."""
    return TinyMoEConfig(**{**TEACHER_SHAPE, **overrides})


def tiny_moe(arch: TinyMoEConfig, vocab_size: int = 64, seed: int = 0, tokenizer: Any = None) -> Any:
    """A random tiny Qwen3-MoE: `tokenizer`'s vocabulary and ids, or `vocab_size` with pad/bos/eos 0/1/2."""
    if tokenizer is not None:
        ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        return build_tiny_moe(arch, len(tokenizer), *ids, seed=seed)
    return build_tiny_moe(arch, vocab_size, 0, 1, 2, seed=seed)


# The objective and diagnostics tests' student: 2 layers, both paired with a teacher of width TEACHER_HIDDEN;
# untied, top-1 over OBJECTIVE_EXPERTS experts; head_dim, positions and init are TinyMoEConfig's defaults.
OBJECTIVE_VOCAB, TEACHER_HIDDEN, OBJECTIVE_EXPERTS = 64, 48, 2
OBJECTIVE_STUDENT_ARCH = tiny_arch(
    num_layers=2, num_experts=OBJECTIVE_EXPERTS, top_k=1, head_dim=16, max_position_embeddings=256,
    initializer_range=0.02, tie_word_embeddings=False,
)  # fmt: skip


def objective_student(arch: TinyMoEConfig = OBJECTIVE_STUDENT_ARCH) -> DistillStudent:
    """A DistillStudent of `arch` (seed 0, training mode), both layers paired with the TEACHER_HIDDEN one."""
    return DistillStudent(tiny_moe(arch, OBJECTIVE_VOCAB, seed=0).train(), [0, 1], TEACHER_HIDDEN)


def teacher_service_run(config: Config, method: str, steps: int) -> Config:
    """`config` (a copy of the shared teacher) set up for a short run through the teacher service on the
    session's 2-CPU cluster: half a teacher_node and half a student_node, 4 sequences a step, a checkpoint
    at the end, every step logged."""
    return with_overrides(
        config,
        {
            "cache.resources": {"teacher_node": 0.5},
            "distill.method": method,
            "distill.train.batch_size": 4,
            "distill.train.max_steps": steps,
            "distill.train.checkpoint_every": steps,
            "distill.train.log_every": 1,
            "distill.train.resources_per_worker": {"student_node": 0.5},
        },
    )


def demo_tokenizer(
    records: list[Record], out_dir: Path, vocab_size: int, extra_texts: Iterable[str] = ()
) -> Any:
    """The pipeline's demo BPE trained on `records`' texts (then `extra_texts`), saved to `out_dir`."""
    return train_demo_tokenizer([*record_texts(records), *extra_texts], out_dir, vocab_size=vocab_size)


@dataclass
class TeacherAssets:
    """Demo records, a tokenizer trained on them, and a saved random tiny teacher (root/tok, root/teacher)."""

    root: Path
    records: list[Record]
    tok: Any
    model: Any

    @property
    def teacher_path(self) -> str:
        return str(self.root / "teacher")

    @property
    def tokenizer_path(self) -> str:
        return str(self.root / "tok")


def teacher_assets(
    root: Path, num_records: int, records_seed: int, vocab_size: int, arch: TinyMoEConfig, model_seed: int
) -> TeacherAssets:
    records = generate_demo_records(num_records, seed=records_seed)
    tok = demo_tokenizer(records, root / "tok", vocab_size)
    model = tiny_moe(arch, seed=model_seed, tokenizer=tok)
    model.save_pretrained(root / "teacher")
    return TeacherAssets(root=root, records=records, tok=tok, model=model)


def teacher_cache_spec(assets: TeacherAssets, **fields: Any) -> CacheSpec:
    """A CacheSpec of `assets`' teacher and tokenizer: top-k logits and the chat template unless `fields`
    say otherwise; `fields` give the rest (cached_layers, width, logits_k, states_dtype, max_length, ...)."""
    defaults = {"logits_mode": "topk", "prompt_template": TEMPLATE_SPEC}
    return CacheSpec(
        teacher_path=assets.teacher_path, tokenizer_path=assets.tokenizer_path, **{**defaults, **fields}
    )


def tiny_config(root: Path, overrides: dict[str, Any] | None = None) -> Config:
    """tests/configs/tiny.yaml writing under `root` (output_dir root/run, caches root/caches)."""
    base = {"output_dir": str(root / "run"), "cache.root": str(root / "caches")}
    return with_overrides(load_config(TINY), {**base, **(overrides or {})})


def save_teacher(config: Config, dest: Path, seed: int) -> Path:
    """A tiny MoE teacher of `config.teacher.build` with the config's tokenizer, saved like an already
    fine-tuned checkpoint."""
    tok = load_tokenizer(prepare_data(config).tokenizer_path)
    model = materialize_model(dataclasses.replace(config.teacher, seed=seed), tok)
    export_hf_checkpoint(model, tok, dest, info={"stage": "test-teacher"})
    return dest


def with_saved_teacher(root: Path, overrides: dict[str, Any] | None = None) -> Config:
    """tiny_config(root) whose teacher is a saved random checkpoint (teacher.path; no fine-tuning)."""
    base = tiny_config(root)
    teacher = save_teacher(base, root / "teacher", seed=0)
    tokenizer = prepare_data(base).tokenizer_path
    fixed = {"teacher.build": None, "teacher.path": str(teacher), "tokenizer.path": tokenizer}
    return with_overrides(base, {**fixed, **(overrides or {})})


def write_config(config: Config, path: Path) -> str:
    """`config` as a YAML file the CLI reads."""
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return str(path)


def padded_batch(vocab_size: int, seed: int = 0) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, token_mask) [2, 9]: row 1 right-padded after 6 tokens, and a token mask
    that is a strict subset of the real positions -- what the adapter tests feed a tiny MoE."""
    import torch

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (2, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding
    input_ids[1, 6:] = 0
    token_mask = attention_mask.bool().clone()
    token_mask[0, :2] = False  # a strict subset of positions
    return input_ids, attention_mask, token_mask
