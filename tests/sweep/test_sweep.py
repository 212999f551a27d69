"""Sweep files: parsing, planning, refusal of teacher-side grids and shared run directories, and the sweep's
own results table (the Ray run is in tests/distill/test_distill.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from support.paths import CONFIGS, TINY

from pipeline.errors import ConfigError
from pipeline.evaluate.results import format_results_markdown, format_setting
from pipeline.sweep import grid_setting, load_sweep, plan_runs, sweep_results_dir, sweep_rows


def write_sweep(tmp_path: Path, grid: dict, **extra) -> Path:
    sweep = {
        "name": "t",
        "base": str(TINY),
        "set": {
            "output_dir": str(tmp_path / "run"),
            "cache.root": str(tmp_path / "caches"),
            "finetune.max_steps": 4,
            "distill.train.max_steps": 2,
            "evaluate.max_examples": 4,
            "evaluate.num_seeds": 1,
        },
        "grid": grid,
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_grid_over_a_teacher_side_setting_is_refused(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, {"cache.logits_k": [4, 8]})
    with pytest.raises(ConfigError, match="changes the teacher cache"):
        plan_runs(load_sweep(path))


def test_sweep_file_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: x.yaml\ngrids: {}\n")
    with pytest.raises(ConfigError, match="unknown sweep key"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")


def test_fixed_run_name_or_duplicate_grid_point_is_refused(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, {"distill.method": ["kd", "sft"]})
    raw = yaml.safe_load(path.read_text())
    raw["set"]["distill.run_name"] = "mine"  # every grid point would train into students/mine
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"share one run directory.*leave distill.run_name unset"):
        plan_runs(load_sweep(path))
    # One name per grid point is fine; a value listed twice is not.
    plan_runs(load_sweep(write_sweep(tmp_path, {"distill.run_name": ["a", "b"]})))
    with pytest.raises(ConfigError, match="identical settings"):
        plan_runs(load_sweep(write_sweep(tmp_path, {"distill.lambda_mc": [0.5, 0.5]})))


def test_a_list_of_grids_runs_the_union_of_their_cross_products(tmp_path: Path) -> None:
    grids = [
        {"distill.method": ["kd", "sft"], "distill.train.seed": [0, 1]},
        {"distill.method": ["kd"], "distill.lambda_mc": [0.5]},
    ]
    sweep = load_sweep(write_sweep(tmp_path, grids))
    _, runs = plan_runs(sweep)
    assert sweep.runs() == [
        {"distill.method": "kd", "distill.train.seed": 0},
        {"distill.method": "kd", "distill.train.seed": 1},
        {"distill.method": "sft", "distill.train.seed": 0},
        {"distill.method": "sft", "distill.train.seed": 1},
        {"distill.method": "kd", "distill.lambda_mc": 0.5},
    ]
    assert [r.distill.method for r in runs] == ["kd", "kd", "sft", "sft", "kd"]
    merged = {"distill.method": ["kd", "sft"], "distill.train.seed": [0, 1], "distill.lambda_mc": [0.5]}
    assert sweep.grid == merged
    # a point that two grids both give is one run listed twice: refused
    twice = write_sweep(tmp_path, [{"distill.method": ["kd"]}, {"distill.method": ["kd", "sft"]}])
    with pytest.raises(ConfigError, match="identical settings"):
        plan_runs(load_sweep(twice))
    with pytest.raises(ConfigError, match="list of such"):
        load_sweep(write_sweep(tmp_path, [{"distill.method": "kd"}]))


def test_an_error_caused_by_the_sweeps_set_names_the_sweep_not_the_preset(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, {"distill.method": ["kd"]})
    raw = yaml.safe_load(path.read_text())
    raw["set"]["cache.torch_threads"] = 1  # not a cache key
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"^sweep t: `set:` \(applied to .*tiny.yaml\): unknown key"):
        plan_runs(load_sweep(path))


def test_setting_labels_use_the_shortest_unambiguous_key() -> None:
    point = {"distill.lambda_mc": 0.5, "distill.train.lr": 3e-4, "distill.method": "kd"}
    assert format_setting(point) == "lambda_mc=0.5, lr=0.0003, method=kd"
    assert grid_setting(point) == "lambda_mc=0.5, lr=0.0003"  # the method has its own column
    assert grid_setting({"distill.method": "kd", "distill.train.seed": 1}) is None
    clash = {"student.num_experts": 2, "student.build.num_experts": 4}
    assert format_setting(clash) == "student.num_experts=2, build.num_experts=4"


def _eval_row(model: str, method: str, score: float, seed: int | None = None) -> dict:
    return {"model": model, "method": method, "setting": "K=3, α=0.2, β=0.1, E=2", "seed": seed,
            "test_set": "tiny-test", "num_seeds": 1, "rouge_l_mean": score, "rouge_l_std": 0.0}  # fmt: skip


def test_sweep_table_has_only_its_runs_labelled_by_grid_point(tmp_path: Path) -> None:
    """A grid over fields outside the run name (lambda_mc) gives distinct rows; seeds of one point are
    aggregated; a student evaluated earlier in the same output_dir (returned by run_evaluate) is left out."""
    path = write_sweep(
        tmp_path, {"distill.lambda_mc": [0.5, 2.0], "distill.method": ["kd"], "distill.train.seed": [0, 1]}
    )
    sweep = load_sweep(path)
    base, configs = plan_runs(sweep)
    points = sweep.runs()
    assert len({c.distill.lambda_mc for c in configs}) == 2
    names = [f"kd-k3-a0.2-b0.1-e2-s{p['distill.train.seed']}-00000{i}" for i, p in enumerate(points)]
    runs = [SimpleNamespace(run_name=n, val_loss=1.0 + i) for i, n in enumerate(names)]
    evaluation = [_eval_row("teacher", "teacher", 40.0)]
    evaluation += [_eval_row(n, "kd", 20.0 + i, seed=i % 2) for i, n in enumerate(names)]
    evaluation.append(_eval_row("b-distill-k3-a0.2-b0.1-e2-s0-stale0", "b-distill", 99.0, seed=0))

    rows = sweep_rows(points, runs, evaluation)
    assert [r["model"] for r in rows] == ["teacher", *names]
    assert [r["setting"] for r in rows[1:]] == ["lambda_mc=0.5"] * 2 + ["lambda_mc=2"] * 2
    assert [r["val_loss"] for r in rows[1:]] == [1.0, 2.0, 3.0, 4.0]
    md = format_results_markdown(rows)
    assert "stale" not in md and "99.00" not in md
    assert "| kd (lambda_mc=0.5) | 20.50 ± 0.71 (n=2) |" in md
    assert "| kd (lambda_mc=2) | **22.50 ± 0.71 (n=2)** |" in md
    assert sweep_results_dir(sweep, base) == tmp_path / "run" / "sweeps" / "t"


def test_cache_grid_gives_cache_settings_their_own_cache_of_one_teacher(tmp_path: Path) -> None:
    from pipeline.config import teacher_cache_hash, teacher_fields

    path = write_sweep(tmp_path, {"cache.logits_k": [4, 8], "distill.method": ["kd", "sft"]}, cache_grid=True)
    base, configs = plan_runs(load_sweep(path))
    assert len(configs) == 4 and len({teacher_cache_hash(c) for c in configs}) == 2
    assert all(teacher_fields(c) == teacher_fields(base) for c in configs)  # one fine-tuned teacher
    teacher_side = write_sweep(tmp_path, {"teacher.seed": [0, 1]}, cache_grid=True)
    with pytest.raises(ConfigError, match="changes the teacher cache"):
        plan_runs(load_sweep(teacher_side))


def test_sweep_seed_tables_pair_each_method_with_kd_on_the_same_seeds(tmp_path: Path) -> None:
    from pipeline.flows import write_seed_tables

    def row(method: str, seed: int, loss: float, rouge: float) -> dict:
        return {"model": f"{method}-s{seed}", "method": method, "seed": seed, "test_set": "t",
                "val_loss": loss, "rouge_l_mean": rouge, "rouge_l_std": 0.0}  # fmt: skip

    rows = [{"model": "teacher", "method": "teacher", "test_set": "t", "rouge_l_mean": 40.0}]
    rows += [row("kd", s, 1.30 + 0.01 * s, 30.0 + s) for s in range(3)]
    rows += [row("b-distill", s, 1.50 + 0.01 * s, 29.0 + s) for s in range(3)]  # +0.20 on every seed
    rows += [row("sft", s, 1.30 + d, 30.0) for s, d in enumerate((0.05, -0.05, 0.0))]  # noise around kd
    text = write_seed_tables(rows, tmp_path).read_text()
    loss_table = text.split("## Training seeds: Rouge-L")[0]
    assert "| b-distill | 1.510 ± 0.010 (n=3) | **+0.200 [+0.200, +0.200]** |" in loss_table
    sft = next(line for line in loss_table.splitlines() if line.startswith("| sft |"))
    assert "**" not in sft  # the interval includes 0: not bold
    assert "| kd | 1.310 ± 0.010 (n=3) | – |" in loss_table
    assert write_seed_tables([r for r in rows if r.get("seed") in (None, 0)], tmp_path / "x") is None


def test_an_unknown_method_in_the_grid_is_refused_before_any_work(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, {"distill.method": ["kd", "b-distil"]})  # a typo
    with pytest.raises(ConfigError, match=r"\{'distill.method': 'b-distil'\}: unknown distillation"):
        plan_runs(load_sweep(path))


def test_compare_to_names_a_grid_point_or_is_refused(tmp_path: Path) -> None:
    grid = {"distill.lambda_mc": [0.5, 1.0], "distill.method": ["kd"], "distill.train.seed": [0, 1]}
    sweep = load_sweep(write_sweep(tmp_path, grid, compare_to={"distill.lambda_mc": 1.0}))
    assert sweep.reference_setting() == "lambda_mc=1"
    assert load_sweep(write_sweep(tmp_path, grid)).reference_setting() is None
    with pytest.raises(ConfigError, match="matches no grid point"):
        load_sweep(write_sweep(tmp_path, grid, compare_to={"distill.lambda_mc": 2.0}))
    with pytest.raises(ConfigError, match="compare_to"):
        load_sweep(write_sweep(tmp_path, grid, compare_to={"distill.train.seed": 0}))


@pytest.mark.parametrize(
    "name",
    [
        "demo-sweep",
        "demo-bdistill-study",
        "demo-codecs",
        "demo-baselines",
        "demo-fig7-k",
        "demo-fig8-experts",
        "demo-fig9-beta",
        "demo-fig10-gates",
        "regime/demo-regime-rest",
        "regime/demo-regime-all",
    ],
)
def test_every_shipped_sweep_file_plans(name: str) -> None:
    """The sweep files the README runs load and plan (every method a preset, every grid point its own run)
    before any work; the baselines and codec sweeps run 3 training seeds per row."""
    from pipeline.config import teacher_cache_hash
    from pipeline.distill.stage import default_run_name

    sweep = load_sweep(CONFIGS / f"{name}.yaml")
    _, runs = plan_runs(sweep)
    assert len({default_run_name(r, teacher_cache_hash(r)) for r in runs}) == len(runs)
    if name in ("demo-codecs", "demo-baselines"):
        assert sweep.grid["distill.train.seed"] == [0, 1, 2]
