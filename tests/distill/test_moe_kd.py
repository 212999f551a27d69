"""The MoE-KD baseline end to end: its row of the baseline sweep file run through `moedistill distill` and
`moedistill evaluate` on the module's copy of the shared tiny teacher and cache (in-process training)."""

from __future__ import annotations

import json
from pathlib import Path

from support.paths import CONFIGS
from support.tiny import write_config
from transformers import AutoModelForCausalLM

from pipeline.cache.read.reader import open_cache
from pipeline.cache.stage import locate_cache
from pipeline.cli import main
from pipeline.config import Config, with_overrides
from pipeline.distill.stage import default_run_name
from pipeline.finetune.student_init import dense_student_dir, lora_moe_student_dir
from pipeline.sweep import load_sweep
from pipeline.workspace import paths_for


def test_moe_kd_row_of_the_baseline_sweep_runs_through_the_cli(
    tiny_workspace: Config, tmp_path: Path, capsys
) -> None:
    points = [
        p for p in load_sweep(CONFIGS / "demo-baselines.yaml").runs() if p["distill.method"] == "moe-kd"
    ]
    assert sorted(p["distill.train.seed"] for p in points) == [0, 1, 2]
    assert all(p["student.init"] == "lora-moe" for p in points)
    small = {
        "student_pretrain.max_steps": 2,
        "student_pretrain.batch_size": 8,
        "student_pretrain.num_workers": 0,
        "distill.train.num_workers": 0,
        "distill.train.max_steps": 2,
        "evaluate.num_seeds": 1,
        "evaluate.max_examples": 4,
    }
    config = with_overrides(tiny_workspace, {**points[0], **small})
    config_path = write_config(config, tmp_path / "moe-kd.yaml")
    assert main(["distill", "--config", config_path]) == 0
    assert "validation loss" in capsys.readouterr().out

    # The dense student pretrained, then its LoRA-MoE fine-tuned on the responses, then distilled.
    assert (
        json.loads((dense_student_dir(config) / "final" / "config.json").read_text())["model_type"] == "qwen3"
    )
    sft = lora_moe_student_dir(config) / "final"
    assert json.loads((sft / "config.json").read_text())["model_type"] == "qwen3_lora_moe"
    run_dir = paths_for(config).students / default_run_name(config, open_cache(locate_cache(config)).key)
    export = run_dir / "final"
    assert json.loads((export / "moedistill_export.json").read_text())["method"] == "moe-kd"
    assert (export / "lora_moe.py").is_file()  # the module code travels with the checkpoint
    student = AutoModelForCausalLM.from_pretrained(export)
    layers = student.model.layers
    assert all(type(layer.mlp).__name__ == "LoraMoEMLP" for layer in layers)  # lora_moe.layers: null
    assert len(layers[0].mlp.lora_experts) == config.student.build.num_experts

    # evaluated like every row of the sweep (the pipeline loads the export through the registered type)
    capsys.readouterr()
    assert main(["evaluate", "--config", config_path, "--model", f"moe-kd={export}"]) == 0
    assert "moe-kd" in capsys.readouterr().out

    # skew reverse KL alone: no SFT term, no gate metrics (the LoRA routers are not read)
    logged = [json.loads(line) for line in (run_dir / "metrics" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*logged)
    assert any(k.endswith("loss_skew_reverse_kl") for k in keys), keys
    assert not any(k.endswith("loss_sft") or "gate_entropy" in k for k in keys), keys
