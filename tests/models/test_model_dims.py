"""The model-dimension probe: a model's shape from its config alone, equal to what the built model has."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from support.tiny import tiny_moe
from transformers import LlamaConfig, MixtralConfig

from pipeline.config import ArchitectureConfig, ModelConfig
from pipeline.errors import ConfigError
from pipeline.models.build import TinyMoEConfig, tiny_moe_hf_config
from pipeline.models.dims import ModelDims, model_dims, read_dims


def _dims_of_built(model) -> ModelDims:
    c = model.config
    return ModelDims(c.model_type, c.num_hidden_layers, c.num_experts, c.hidden_size, c.vocab_size)


def test_a_build_section_gives_the_dims_of_the_model_it_builds() -> None:
    arch = ArchitectureConfig(hidden_size=32, num_layers=3, num_experts=2, top_k=1, moe_intermediate_size=32,
                              num_heads=2, num_kv_heads=1, head_dim=16)  # fmt: skip
    built = tiny_moe(TinyMoEConfig(**dataclasses.asdict(arch)), vocab_size=300, seed=0)
    assert model_dims(ModelConfig(build=arch), vocab_size=300) == _dims_of_built(built)
    assert model_dims(ModelConfig(build=arch)).vocab_size is None  # no tokenizer given: width unknown


def test_checkpoint_configs_are_read_without_weights_or_torch(tmp_path: Path) -> None:
    tiny_moe_hf_config(TinyMoEConfig(num_layers=3, num_experts=6, top_k=2), 500, 0, 1, 2).save_pretrained(
        tmp_path / "qwen"
    )
    MixtralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=32, num_attention_heads=2,
                  num_local_experts=4, vocab_size=320).save_pretrained(tmp_path / "mixtral")  # fmt: skip
    LlamaConfig(num_hidden_layers=5, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                vocab_size=100).save_pretrained(tmp_path / "dense")  # fmt: skip
    assert not list((tmp_path / "qwen").glob("*.safetensors"))  # a config only: nothing to load
    assert read_dims(str(tmp_path / "qwen")) == ModelDims("qwen3_moe", 3, 6, 64, 500)
    assert read_dims(str(tmp_path / "mixtral")) == ModelDims("mixtral", 2, 4, 32, 320)
    assert read_dims(str(tmp_path / "dense")) == ModelDims("llama", 5, None, 16, 100)
    # Upcycling keeps the dense shape and takes the configured expert count.
    upcycled = model_dims(ModelConfig(upcycle_from=str(tmp_path / "dense"), num_experts=3))
    assert upcycled == ModelDims("llama", 5, 3, 16, 100)
    assert model_dims(ModelConfig(path=str(tmp_path / "mixtral"))).num_experts == 4


def test_the_probe_module_stays_light() -> None:
    import subprocess

    code = "import sys, pipeline.models.dims; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unreadable_configs_name_the_role_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the teacher config at .*Fix: check teacher_path"):
        read_dims(str(tmp_path / "missing"), role="teacher", fix="check teacher_path.")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "vit", "hidden_size": 8}')
    with pytest.raises(ConfigError, match=r"has no 'num_hidden_layers': not a decoder LM config\. Fix:"):
        read_dims(str(tmp_path / "odd"))
