"""Config loading: presets parse, bad input names the key and the file, the cache hash is stable."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.paths import REPO

from pipeline.config import load_config, teacher_cache_hash, with_overrides
from pipeline.errors import ConfigError

DEMO = REPO / "jobs" / "configs" / "demo.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_demo_preset_loads_with_paper_defaults() -> None:
    config = load_config(DEMO)
    assert config.name == "demo"
    assert (config.distill.k, config.distill.alpha, config.distill.beta) == (3, 0.2, 0.1)
    assert config.teacher.build is not None and config.teacher.build.num_experts == 4
    assert config.out == Path.cwd() / "runs" / "demo"  # made absolute: Ray workers run elsewhere
    assert Path(config.cache.root).is_absolute()


@pytest.mark.parametrize("preset", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(preset: Path) -> None:
    if "\nbase:" in "\n" + preset.read_text():  # a sweep file: a `base:` preset plus a grid
        pytest.skip("sweep files are read by `moedistill ablate`")
    load_config(preset)


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ndistill:\n  kk: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*distill\.kk.*valid keys"):
        load_config(path)


def test_wrong_type_names_key(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ndistill:\n  k: three\n")
    with pytest.raises(ConfigError, match=r"distill\.k must be int"):
        load_config(path)


def test_bad_literal_lists_allowed_values(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ncache:\n  states_dtype: float8\n")
    with pytest.raises(ConfigError, match=r"cache\.states_dtype.*'float16', 'bfloat16'"):
        load_config(path)
    path = write(tmp_path, "name: x\ndata:\n  prompt_template: alpaca\n")  # not silently ignored
    with pytest.raises(ConfigError, match=r"data\.prompt_template='alpaca'; allowed values: 'dolly'"):
        load_config(path)


def test_missing_file_and_missing_model_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist.*presets"):
        load_config(tmp_path / "nope.yaml")
    path = write(tmp_path, f"name: x\nteacher:\n  path: {tmp_path}/missing-model\n")
    with pytest.raises(ConfigError, match=r"teacher model path .* does not exist"):
        load_config(path)


def test_model_needs_exactly_one_source(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nteacher:\n  path: org/model\n  upcycle_from: org/dense\n")
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(path)


def test_floats_accept_ints_and_scientific_strings(tmp_path: Path) -> None:
    models = "teacher:\n  path: org/moe\nstudent:\n  path: org/small-moe\ntokenizer:\n  path: org/moe\n"
    path = write(tmp_path, "name: x\n" + models + "distill:\n  alpha: 1\n  train:\n    lr: 1e-4\n")
    config = load_config(path)
    assert config.distill.alpha == 1.0 and config.distill.train.lr == pytest.approx(1e-4)


def test_cache_hash_ignores_student_side_settings() -> None:
    base = load_config(DEMO)
    same = with_overrides(
        base,
        {
            "distill.k": 5,
            "distill.beta": 0.3,
            "distill.method": "kd",
            "student.build.num_experts": 2,
            "distill.train.lr": 0.1,
        },
    )
    assert teacher_cache_hash(same) == teacher_cache_hash(base)
    for key, value in [
        ("cache.logits_k", 16),
        ("data.max_length", 64),
        ("teacher.seed", 3),
        ("cache.states_dtype", "bfloat16"),
        ("student.build.num_layers", 4),
    ]:
        assert teacher_cache_hash(with_overrides(base, {key: value})) != teacher_cache_hash(base), key


def test_cache_hash_is_stable_across_loads() -> None:
    assert teacher_cache_hash(load_config(DEMO)) == teacher_cache_hash(load_config(DEMO))


def test_zero_workers_means_in_process_and_negative_is_refused() -> None:
    config = with_overrides(load_config(DEMO), {"distill.train.num_workers": 0, "finetune.num_workers": 0})
    assert config.distill.train.num_workers == 0 and config.finetune.num_workers == 0
    with pytest.raises(ConfigError, match=r"num_workers must be >= 0 \(0: train in-process"):
        with_overrides(load_config(DEMO), {"distill.train.num_workers": -1})
