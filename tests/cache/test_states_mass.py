"""Mass-truncated expert states (`cache.states_mass`, pipeline/models/truncation.py): the selection rule, the
batched routed-expert kernel against the all-expert one for every expert layout, m = 1 bit for bit the exact
states, error falling with m, and a built cache: its key, its per-shard kept mass against a recount, the
storage and fidelity reports."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from support.families import family_model
from support.tiny import teacher_assets, teacher_cache_spec, tiny_arch

from pipeline.cache import CacheRuntime, build_teacher_cache
from pipeline.cache.build.teacher import (
    KEPT_MASS,
    TeacherOutputSpec,
    TeacherShardStage,
    input_device,
    teacher_targets,
    tokenize_shard,
)
from pipeline.cache.format.key import cache_key, key_inputs
from pipeline.cache.format.manifest import read_manifest
from pipeline.cache.format.spec import CacheSpec
from pipeline.config import load_config, teacher_cache_fields, with_overrides
from pipeline.data.collate import distill_positions, pad_batch
from pipeline.errors import ConfigError
from pipeline.models.adapter import MoEAdapter
from pipeline.models.alignment import aggregate_expert_states
from pipeline.models.truncation import mass_selection, truncated_states
from pipeline.reports.fidelity import pair_fidelity

MASSES = (0.5, 0.8, 0.9, 0.99, 1.0)


def test_selection_keeps_the_fewest_largest_experts_reaching_m_of_each_group() -> None:
    # 6 experts onto 4 groups: pi = [0, 0, 1, 2, 2, 3] (unequal groups)
    p = torch.tensor([[0.05, 0.15, 0.2, 0.3, 0.1, 0.2]])
    assert mass_selection(p, 4, 1.0).tolist() == [[True] * 6]
    # group 0: 0.15 alone is 75% of 0.2 -> at m = 0.7 only expert 1; at 0.8 both
    assert mass_selection(p, 4, 0.7).tolist() == [[False, True, True, True, False, True]]
    assert mass_selection(p, 4, 0.8).tolist() == [[True, True, True, True, True, True]]
    # a zero-mass expert is never computed, even at m = 1
    assert mass_selection(torch.tensor([[0.0, 1.0]]), 1, 1.0).tolist() == [[False, True]]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "llama4_text", "jetmoe", "deepseek_v3"])
def test_routed_outputs_equal_the_all_expert_outputs_of_their_pairs(model_type: str) -> None:
    """The batched kernel (padded per-expert bmm) computes each family's expert math for the chosen pairs."""
    adapter = MoEAdapter(family_model(model_type, layers=2, experts=8))
    view = adapter.block_view(0)
    x = torch.randn(10, view.hidden_size, generator=torch.Generator().manual_seed(0))
    logits = view.router_logits(x)
    with torch.no_grad():
        full = view.expert_outputs(x, logits)
        keep = torch.rand(10, 8, generator=torch.Generator().manual_seed(1)) < 0.4
        tokens, experts = keep.nonzero(as_tuple=True)
        routed = view.routed_outputs(x, tokens, experts, logits)
    torch.testing.assert_close(routed, full[tokens, experts], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def sharp() -> dict[str, Any]:
    """A 32-expert Qwen3-MoE with its routers scaled x4 (peaked, like a trained router), one batch."""
    model = family_model("qwen3_moe", layers=2, experts=32, top_k=4, hidden=32)
    adapter = MoEAdapter(model)
    with torch.no_grad():
        for i in range(adapter.num_layers):
            adapter.block_view(i).router_weight.mul_(4.0)
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": torch.ones_like(ids)}
    return {"adapter": adapter, "batch": batch}


def _out(mass: float) -> TeacherOutputSpec:
    return TeacherOutputSpec((0, 1), 4, "topk", 4, "float16", True, "none", 1, states_mass=mass)


def test_mass_one_is_the_exact_states_bit_for_bit(sharp: dict[str, Any]) -> None:
    adapter, batch = sharp["adapter"], sharp["batch"]
    got = teacher_targets(adapter, batch, _out(1.0))
    assert KEPT_MASS not in got  # the exact path: no truncation ran
    with torch.no_grad():
        fwd = adapter.forward_with_experts(
            batch["input_ids"], batch["attention_mask"], (0, 1), distill_positions(batch["response_mask"])
        )
    want = torch.stack(
        [aggregate_expert_states(fwd.router_probs[i], fwd.expert_outputs[i].float(), 4) for i in (0, 1)], 1
    )
    assert torch.equal(got["expert_states"], want)
    # the truncated kernel at m = 1 computes every expert that adds to its group's fp32 mass: the same states
    fwd = adapter.forward_with_experts(
        batch["input_ids"], batch["attention_mask"], (0,), distill_positions(batch["response_mask"]),
        compute_experts=False,
    )  # fmt: skip
    with torch.no_grad():
        h, kept, _ = truncated_states(
            adapter.block_view(0), fwd.expert_inputs[0], fwd.router_logits[0], fwd.router_probs[0], 4, 1.0
        )
    torch.testing.assert_close(h, want[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kept, torch.ones_like(kept))


def test_error_falls_monotonically_with_m(sharp: dict[str, Any]) -> None:
    adapter, batch = sharp["adapter"], sharp["batch"]
    exact = teacher_targets(adapter, batch, _out(1.0))
    rows = []
    for mass in MASSES:
        t = teacher_targets(adapter, batch, _out(mass))
        f = [
            pair_fidelity(exact["gates"][:, p], exact["expert_states"][:, p], t["expert_states"][:, p],
                          torch.ones(len(t["gates"]), dtype=torch.bool), seed=p)
            for p in (0, 1)
        ]  # fmt: skip
        kept = t.get(KEPT_MASS, torch.ones(1))
        rows.append((mass, float(kept.mean()), max(x["mc_rel"] for x in f), min(x["grad_cos"] for x in f)))
        assert float(kept.min()) >= mass - 1e-6  # every group keeps at least m of its mass
    errors, cosines = [r[2] for r in rows], [r[3] for r in rows]
    assert errors == sorted(errors, reverse=True) and errors[-1] == 0.0, rows
    assert cosines == sorted(cosines) and cosines[-1] == pytest.approx(1.0), rows
    assert errors[0] > 10 * errors[-2] + 1e-9, rows  # m = 0.5 is visibly worse than m = 0.99


# --- a built cache ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("mass")
    # 20 records: more than the 16 sequences `report states-fidelity` compares by default
    a = teacher_assets(root, 20, records_seed=3, vocab_size=384, arch=tiny_arch(num_experts=16), model_seed=0)
    spec = teacher_cache_spec(
        a, cached_layers=(1, 3), width=4, logits_k=8, states_dtype="float16", max_length=150
    )
    runtime = CacheRuntime(batch_size=4, rows_per_shard=5, executor="local", progress=False)
    truncated = dataclasses.replace(spec, states_mass=0.9)
    path = build_teacher_cache(truncated, a.records, str(root / "caches"), runtime).path
    return {"assets": a, "spec": spec, "truncated": truncated, "path": path, "runtime": runtime}


def test_the_key_changes_with_m_and_an_exact_cache_keeps_its_key(built: dict[str, Any]) -> None:
    records = built["assets"].records
    exact = key_inputs(built["spec"], records, 4)
    assert "states_mass" not in exact
    assert key_inputs(dataclasses.replace(built["spec"], states_mass=1.0), records, 4) == exact
    specs = [dataclasses.replace(built["spec"], states_mass=m) for m in MASSES]
    keys = {cache_key(key_inputs(spec, records, 4)) for spec in specs}
    assert len(keys) == len(MASSES)
    assert read_manifest(built["path"])["key_inputs"]["states_mass"] == 0.9


def test_kept_mass_recorded_per_shard_matches_a_recount(built: dict[str, Any]) -> None:
    manifest = read_manifest(built["path"])
    a, spec, runtime = built["assets"], built["truncated"], built["runtime"]
    stage = TeacherShardStage(spec, 4, runtime.batch_size, 0.0)
    rows_per_shard = manifest["layout"]["rows_per_shard"]
    total_sum, total_rows = 0.0, 0
    for commit in manifest["shards"]:
        first = commit["shard_id"] * rows_per_shard
        examples = tokenize_shard(a.tok, a.records[first : first + rows_per_shard], first, spec.max_length)
        kept = []
        for ex in examples:  # one sequence per forward: the kept mass of a row does not depend on batching
            batch = {k: v.to(input_device(stage.adapter.model)) for k, v in pad_batch([ex], 0).items()}
            kept.append(teacher_targets(stage.adapter, batch, stage.out)[KEPT_MASS].double())
        recount = torch.cat(kept)
        record = commit["states_mass"]
        assert record["target"] == 0.9 and record["rows"] == recount.numel() == commit["num_tokens"] * 2
        assert record["kept_sum"] == pytest.approx(float(recount.sum()), rel=1e-6)
        assert record["kept_min"] == pytest.approx(float(recount.min()), rel=1e-6)
        assert 0.9 <= record["kept_min"] <= record["kept_mean"] < 1.0
        total_sum, total_rows = total_sum + float(recount.sum()), total_rows + recount.numel()
    totals = manifest["totals"]["states_mass"]
    assert totals["rows"] == total_rows and totals["kept_mean"] == pytest.approx(total_sum / total_rows)


def test_reports_name_the_truncation_and_its_error(built: dict[str, Any]) -> None:
    from pipeline.reports.fidelity import states_fidelity
    from pipeline.reports.storage import format_storage_report
    from pipeline.reports.storage_measure import measure_store

    text = format_storage_report(measure_store(built["path"]))
    assert "top 0.9 of group mass" in text and "router mass kept" in text
    report = states_fidelity(built["path"], num_sequences=4)  # no stored sample: the exact teacher reruns
    assert report.source == "teacher" and "top 0.9 of group mass" in report.states
    assert all(0 < p["mc_rel"] < 0.5 and 0.5 < p["grad_cos"] < 1.0 for p in report.pairs)


def test_states_fidelity_cli_compares_16_sequences_by_default(
    built: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main

    out = tmp_path / "fidelity"
    assert main(["report", "states-fidelity", built["path"], "--out", str(out)]) == 0  # no --sequences
    printed = capsys.readouterr().out
    assert "16 sequences (" in printed and "top 0.9 of group mass" in printed
    assert "16 sequences (" in (out / "states-fidelity.md").read_text()


def test_config_hash_is_unchanged_at_one_and_m_is_validated() -> None:
    from support.paths import CONFIGS

    config = load_config(CONFIGS / "demo.yaml")
    assert "states_mass" not in teacher_cache_fields(config)["cache"]
    assert teacher_cache_fields(with_overrides(config, {"cache.states_mass": 0.99}))["cache"]["states_mass"]
    with pytest.raises(ConfigError, match=r"states_mass=1.5 must be in \(0, 1\].*Fix: correct"):
        CacheSpec("t", "tok", (0,), None, "topk", 4, "float16", 8, "chat", states_mass=1.5)


def test_the_storage_projection_names_m_and_keeps_the_bytes() -> None:
    from support.paths import CONFIGS

    from pipeline.reports.storage_projection import project_from_config

    preset = CONFIGS / "qwen3-4b-moe-to-0.6b-moe.yaml"
    exact = project_from_config(load_config(preset))
    truncated = project_from_config(load_config(preset, {"cache.states_mass": 0.99}))
    assert truncated.dims["states"] == exact.dims["states"] + ", top 0.99 of group mass"
    assert truncated.logical_per_token == exact.logical_per_token  # m changes values, never sizes
