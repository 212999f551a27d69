"""Any listed MoE family as teacher or student, end to end through the command line: a tiny random teacher
of the family saved beside the demo tokenizer -> `moedistill cache` -> two b-distill steps of a student
(`student.path`) -> an exported student. Cross-family pairs share the tokenizer: DeepSeek-V3 (sigmoid router,
selection bias, shared expert, a dense first layer) into Qwen3-MoE, gpt-oss (biased router, clamped SwiGLU,
expert biases) into OLMoE. The exactness of every family's reading is tests/models/test_model_families.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.families import family_model
from support.tiny import tiny_config, write_config

from pipeline.cache.stage import locate_cache
from pipeline.cli import main
from pipeline.config import with_overrides
from pipeline.data.stage import load_tokenizer, prepare_data
from pipeline.models.export import EXPORT_MARKER, export_hf_checkpoint

pytestmark = pytest.mark.integration

# (teacher family, student family): the two cross-family pairs, then families whose blocks differ most.
CASES = [
    ("deepseek_v3", "qwen3_moe"),
    ("gpt_oss", "olmoe"),
    ("qwen2_moe", "qwen2_moe"),  # gated shared expert, mlp_only_layers
    ("llama4_text", "llama4_text"),  # input-scaled top-1 experts, interleaved dense layers
    ("jetmoe", "jetmoe"),  # ParallelExperts, an output bias
    ("granitemoeshared", "glm4_moe"),  # a shared MLP on the decoder layer; GLM's sigmoid router
]


def _save(model_type: str, dest: Path, tok, seed: int, **shape) -> str:
    ids = (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    model = family_model(model_type, seed=seed, vocab_size=len(tok), token_ids=ids, **shape)
    export_hf_checkpoint(model, tok, dest, info={"stage": "test-family"})
    return str(dest)


@pytest.mark.parametrize(("teacher_type", "student_type"), CASES, ids=[f"{t}-to-{s}" for t, s in CASES])
def test_family_teacher_cache_and_student_distill_from_the_cli(
    ray_cluster: None, tmp_path: Path, teacher_type: str, student_type: str
) -> None:
    base = tiny_config(tmp_path, {"data.num_demo_records": 60})
    prepared = prepare_data(base)
    tok = load_tokenizer(prepared.tokenizer_path)
    teacher = _save(teacher_type, tmp_path / "teacher", tok, seed=0, layers=3, experts=8, top_k=2)
    student = _save(student_type, tmp_path / "student", tok, seed=1, layers=2, experts=4, top_k=1, hidden=16)
    config = with_overrides(
        base,
        {
            "teacher.build": None,
            "teacher.path": teacher,
            "student.build": None,
            "student.path": student,
            "tokenizer.path": prepared.tokenizer_path,
            "distill.method": "b-distill",
            "distill.train.num_workers": 0,
            "distill.train.max_steps": 2,
            "distill.train.checkpoint_every": 2,
            "distill.train.log_every": 1,
        },
    )
    config_path = write_config(config, tmp_path / "config.yaml")
    assert main(["cache", "--config", config_path]) == 0
    manifest = json.loads((Path(locate_cache(config)) / "manifest.json").read_text())
    assert manifest["teacher"]["model_type"] == teacher_type
    if teacher_type in ("deepseek_v3", "qwen2_moe"):  # a dense first layer: MoE layers 0, 1 are decoder 1, 2
        assert manifest["teacher"]["moe_layers"] == [1, 2] and manifest["teacher"]["num_layers"] == 2
    assert main(["distill", "--config", config_path]) == 0
    exports = list((tmp_path / "run").glob(f"**/final/{EXPORT_MARKER}"))
    assert len(exports) == 1, exports
    metrics = [json.loads(x) for x in (exports[0].parent.parent / "metrics" / "metrics.jsonl").open()]
    assert {"loss_mc", "loss_erd", "loss_forward_kl"} <= set(metrics[-1])
