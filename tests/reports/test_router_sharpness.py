"""Router sharpness (`moedistill report router-sharpness`, pipeline/reports/router_sharpness.py): the
statistics on router distributions with known answers, the real-shape benchmark's mapping of a measured
fraction onto another expert count, and the report end to end on a tiny config (a saved "fine-tuned"
teacher beside the config's seeded build). No Ray."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support.paths import REPO
from support.tiny import save_teacher, tiny_config, write_config

from pipeline.cli import main
from pipeline.data.collate import distill_positions
from pipeline.models.adapter import MoEAdapter
from pipeline.models.build import TinyMoEConfig, build_tiny_moe
from pipeline.reports.router_sharpness import (
    experts_for_mass,
    format_sharpness,
    router_sharpness,
    sharpness_stats,
)
from pipeline.workspace import paths_for


def test_experts_for_mass_counts_the_last_expert_by_the_share_needed() -> None:
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    # row 0: 0.5 + 0.3 = 0.8, then 0.1 of the next 0.2 -> 2.5 experts; row 1: 0.9 / 0.25 = 3.6
    torch.testing.assert_close(experts_for_mass(p, 0.9), torch.tensor([2.5, 3.6]))
    torch.testing.assert_close(experts_for_mass(p, 1.0), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(experts_for_mass(p, 0.4), torch.tensor([0.8, 1.6]))
    # unnormalised scores: the share is of the row's own total
    torch.testing.assert_close(experts_for_mass(2 * p, 0.9), torch.tensor([2.5, 3.6]))


def test_stats_of_a_known_router() -> None:
    # 8 experts, width 2 (groups {0..3}, {4..7}); each token: 0.6 on one expert of group 0, 0.1 on three
    # others of group 0, 0.1 on one of group 1, the rest 0
    p = torch.zeros(3, 8)
    p[:, 0], p[:, 1:4], p[:, 4] = 0.6, 0.1, 0.1
    s = sharpness_stats(p, top_k=2, width=2, masses=(0.9, 0.99))
    assert s["top2"] == pytest.approx(0.7)
    assert "top8" not in s  # only k < E: all experts' mass is 1
    assert s["frac@0.9"] == pytest.approx(4.0 / 8)  # 0.6 + 0.1 + 0.1 + 0.1 of the next 0.1
    assert s["frac@0.99"] == pytest.approx(4.9 / 8)
    # group 0 (0.9): 0.6, 0.1, 0.1 reach 0.8 < 0.81, the 4th is needed; group 1: its one expert
    assert s["group@0.9"] == pytest.approx((4 + 1) / 2)
    entropy = -(0.6 * math.log(0.6) + 4 * 0.1 * math.log(0.1))
    assert s["entropy_ratio"] == pytest.approx(entropy / math.log(8), rel=1e-6)
    flat = sharpness_stats(torch.full((2, 16), 1 / 16), top_k=2, width=4)
    assert flat["top2"] == pytest.approx(2 / 16) and flat["top8"] == pytest.approx(0.5)
    assert flat["frac@0.9"] == pytest.approx(0.9) and flat["group@0.9"] == pytest.approx(4.0)
    assert flat["entropy_ratio"] == pytest.approx(1.0)


def test_bench_mapping_reaches_the_measured_fraction_at_another_expert_count() -> None:
    """--match-experts M:F scales a random router until a token's M of the mass takes F of its experts; the
    equivalent top-k mass it prints is what --sharpness would take."""
    sys.path.insert(0, str(REPO / "jobs" / "benchmarks"))
    from real_shapes import experts_fraction, router_target, sharpen_routers, topk_mass

    arch = TinyMoEConfig(hidden_size=32, num_layers=2, num_experts=64, top_k=8, moe_intermediate_size=8,
                         num_heads=2, num_kv_heads=1, head_dim=16)  # fmt: skip
    adapter = MoEAdapter(build_tiny_moe(arch, 96, 0, 1, 2, seed=0))
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": torch.ones_like(ids)}
    args = SimpleNamespace(match_experts="0.9:0.25", sharpness=0.9)
    stat, target, _ = router_target(args, adapter.top_k)
    assert target == -0.25
    scales = sharpen_routers(adapter, batch, target, stat)
    assert all(s > 1 for s in scales)  # a random router is flatter than a quarter of its experts
    with torch.no_grad():
        mask = distill_positions(batch["response_mask"])  # the tokens sharpen_routers measured
        fwd = adapter.forward_with_experts(ids, None, [0, 1], mask, compute_experts=False)
    for logits in fwd.router_logits.values():
        assert experts_fraction(logits, 0.9, 1.0) == pytest.approx(0.25, abs=1e-3)
        assert 0.3 < topk_mass(logits, 8, 1.0) < 0.95
    stat, target, text = router_target(SimpleNamespace(match_experts=None, sharpness=0.8), 8)
    assert target == 0.8 and "top-8" in text


def test_report_before_and_after_fine_tuning(tmp_path: Path) -> None:
    """The config's seeded build (the fine-tune's start) against its export; the CLI writes the table."""
    config = tiny_config(tmp_path, {"cache.width": 2})
    save_teacher(config, paths_for(config).teacher_final, seed=5)  # stands in for the fine-tuned teacher
    report = router_sharpness(config, num_sequences=6)
    assert list(report.models) == ["before fine-tuning", "fine-tuned"]
    assert (report.num_experts, report.top_k, report.width) == (4, 2, 2)
    assert 3 <= report.num_sequences <= 6  # records over max_length are dropped, as in the cache
    assert report.cached_layers == [1]  # a 1-layer student pairs with the teacher's last layer
    before, after = report.models["before fine-tuning"], report.models["fine-tuned"]
    assert len(before) == len(after) == 2 and before != after  # two different routers
    for layer in before + after:
        assert 2 / 4 < layer["top2"] < 1 and 0 < layer["frac@0.9"] <= 0.9 and 1 <= layer["group@0.99"] <= 2
    text = format_sharpness(report)
    assert "| fine-tuned | 1* |" in text and "--match-experts 0.9:" in text
    cfg = write_config(config, tmp_path / "c.yaml")
    out = tmp_path / "out"
    args = ["report", "router-sharpness", "--config", cfg, "--sequences", "4", "--out", str(out)]
    assert main(args) == 0
    assert "| before fine-tuning | 0 |" in (out / "router-sharpness.md").read_text()
    assert main(["report", "router-sharpness"]) == 2  # no config: a one-line error


def test_bench_times_a_configs_trained_teacher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench_cache.py --config: the timing rounds and the m sweep on the config's teacher, its cached layers
    and width (the same code as --shape: real_shapes.cache_stage_trials, mass_sweep)."""
    sys.path.insert(0, str(REPO / "jobs" / "benchmarks"))
    from real_shapes import run_trained

    config = tiny_config(tmp_path, {"cache.width": 2})
    save_teacher(config, paths_for(config).teacher_final, seed=5)
    args = SimpleNamespace(seqs=4, trials=1, masses=[1.0, 0.5], sweep=[0.5, 1.0])
    run_trained(write_config(config, tmp_path / "c.yaml"), args)
    text = capsys.readouterr().out
    assert "cached layers [1] at width 2" in text and "cache stage, m = 0.5" in text
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["0.5"], ["1"])]
    assert [r[0] for r in rows] == ["0.5", "1"]
    assert float(rows[0][1]) < float(rows[1][1]) <= 4  # fewer experts at m = 0.5 than at 1, of 4
    assert float(rows[1][3]) == 0 and float(rows[1][4]) == pytest.approx(1.0)  # m = 1: exact states
