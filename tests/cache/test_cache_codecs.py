"""Schema-2 teacher caches (expert-state codecs) built from a tiny real Qwen3-MoE teacher by the in-process
executor: key and schema version, round trip against the teacher's exact fp32 states, re-aggregation and the
subspace read, token subsampling across a kill/resume, verify refusing a missing or corrupt basis, and the
held-out fidelity sample (stored fp32, checked, the same figures as a teacher rerun)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support.tiny import teacher_assets, teacher_cache_spec, tiny_arch

from pipeline.cache import (
    CacheRuntime,
    build_teacher_cache,
    open_cache,
    read_cache_dataset,
    verify_cache,
)
from pipeline.cache.build.teacher import TeacherShardStage, input_device, teacher_targets, tokenize_shard
from pipeline.cache.format.codecs import keep_rows
from pipeline.cache.format.key import key_inputs
from pipeline.data.collate import pad_batch
from pipeline.data.demo_dataset import generate_demo_records
from pipeline.errors import CacheError
from pipeline.models.alignment import aggregate_expert_states, aggregate_gates

NUM_RECORDS, ROWS_PER_SHARD, E_T, WIDTH, LAYERS, D = 20, 8, 8, 4, (1, 3), 32
HELDOUT_RECORDS, FIDELITY_TOKENS = 6, 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("codec_assets")
    arch = tiny_arch(hidden_size=D, num_experts=E_T)
    a = teacher_assets(root, NUM_RECORDS, records_seed=3, vocab_size=384, arch=arch, model_seed=0)
    spec = teacher_cache_spec(
        a,
        cached_layers=LAYERS,
        width=WIDTH,
        logits_k=8,
        states_dtype="float16",
        max_length=150,
        states_basis_tokens=300,
        states_fidelity_tokens=FIDELITY_TOKENS,
    )
    heldout = generate_demo_records(HELDOUT_RECORDS, seed=4)  # the validation split's stand-in
    return {"root": root, "records": a.records, "heldout": heldout, "tok": a.tok, "spec": spec}


@pytest.fixture(scope="module")
def exact(assets: dict[str, Any]) -> dict[int, dict[str, torch.Tensor]]:
    """fp32 W-width gates and states per seq_id, straight from the teacher (one sequence per forward)."""
    stage = TeacherShardStage(assets["spec"], WIDTH, 1, 0.0)
    examples = tokenize_shard(assets["tok"], assets["records"], 0, assets["spec"].max_length)
    out = {}
    for ex in examples:
        batch = {k: v.to(input_device(stage.adapter.model)) for k, v in pad_batch([ex], stage.pad_id).items()}
        t = teacher_targets(stage.adapter, batch, stage.out)
        out[int(ex["seq_id"])] = {"gates": t["gates"], "expert_states": t["expert_states"]}
    return out


def _runtime(**kw: Any) -> CacheRuntime:
    return CacheRuntime(batch_size=4, rows_per_shard=ROWS_PER_SHARD, executor="local", progress=False, **kw)


def _build(assets: dict[str, Any], root: Path, **codec: Any) -> str:
    spec = dataclasses.replace(assets["spec"], **codec)
    return build_teacher_cache(spec, assets["records"], str(root), _runtime(), heldout=assets["heldout"]).path


@pytest.fixture(scope="module")
def caches(assets: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("codec_caches")
    return {
        "fp8": _build(assets, root, states_codec="fp8"),
        "int8-r8-half": _build(assets, root, states_codec="int8", states_rank=8, states_token_fraction=0.5),
        "bf16-full-rank": _build(assets, root, states_codec="bfloat16", states_rank=D),
        "fp8-r6": _build(assets, root, states_codec="fp8", states_rank=6),
    }


def test_plain_codecs_keep_schema_1_and_its_key(assets: dict[str, Any]) -> None:
    spec, records = assets["spec"], assets["records"]
    plain = key_inputs(spec, records, WIDTH)
    assert plain["schema_version"] == 1 and "states_codec" not in plain
    assert key_inputs(dataclasses.replace(spec, states_codec="float16"), records, WIDTH) == plain
    bf16 = key_inputs(dataclasses.replace(spec, states_codec="bfloat16"), records, WIDTH)
    assert bf16 == key_inputs(dataclasses.replace(spec, states_dtype="bfloat16"), records, WIDTH)
    fp8 = key_inputs(dataclasses.replace(spec, states_codec="fp8"), records, WIDTH)
    assert fp8["schema_version"] == 2 and fp8["dtypes"]["expert_states"] == "fp8"
    assert fp8["states_codec"] == {
        "codec": "fp8",
        "rank": None,
        "basis_tokens": None,
        "token_fraction": 1.0,
        "seed": 0,
    }
    ranked = key_inputs(dataclasses.replace(spec, states_codec="fp8", states_rank=6), records, WIDTH)
    assert ranked["states_codec"]["rank"] == 6 and ranked != fp8
    # The fidelity sample (held-out records) is content of a lossy cache only: a plain cache keeps its key.
    assert key_inputs(spec, records, WIDTH, assets["heldout"]) == plain
    held = key_inputs(dataclasses.replace(spec, states_codec="fp8"), records, WIDTH, assets["heldout"])
    assert held["states_fidelity"]["tokens"] == FIDELITY_TOKENS
    assert {k: v for k, v in held.items() if k != "states_fidelity"} == fp8


def test_codec_caches_verify_and_declare_schema_2(caches: dict[str, str]) -> None:
    for name, path in caches.items():
        report = verify_cache(path)
        assert report.ok, (name, report.problems)
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        assert manifest["schema_version"] == 2
        assert ("state_basis" in manifest) == (name != "fp8")
        sample = manifest["states_fidelity"]  # the held-out sample: exact fp32 states of FIDELITY_TOKENS
        exact = np.load(Path(path) / "fidelity" / "exact_states.npy")
        assert exact.dtype == np.float32 and exact.shape == (FIDELITY_TOKENS, len(LAYERS), WIDTH, D)
        assert sample["num_tokens"] == FIDELITY_TOKENS and "fidelity/exact_states.npy" in sample["files"]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum().clamp_min(1e-30))


@pytest.mark.parametrize(("name", "limit"), [("fp8", 2e-3), ("bf16-full-rank", 1e-4), ("fp8-r6", 0.5)])
def test_reads_reconstruct_the_teacher_states(
    caches: dict[str, str], exact: dict[int, dict[str, torch.Tensor]], name: str, limit: float
) -> None:
    cache = open_cache(caches[name])
    errs = []
    for shard in cache.shards:
        for ex in cache.read_shard(shard["shard_id"], {"expert_states"}):
            errs.append(_rel_err(torch.from_numpy(ex["expert_states"]), exact[ex["seq_id"]]["expert_states"]))
    assert max(errs) < limit
    if name == "fp8-r6":  # rank 6 of 32 loses real directions, but far less than the states' energy
        assert min(errs) > 1e-4


@pytest.mark.parametrize("name", ["fp8", "int8-r8-half", "bf16-full-rank"])
def test_reaggregation_commutes_with_every_codec(caches: dict[str, str], name: str) -> None:
    cache = open_cache(caches[name])
    for ex_w, ex_2 in zip(
        cache.read_shard(0, {"gates", "expert_states"}),
        cache.read_shard(0, {"gates", "expert_states"}, num_student_experts=2),
        strict=True,
    ):
        folded = aggregate_expert_states(
            torch.from_numpy(ex_w["gates"]), torch.from_numpy(ex_w["expert_states"]), 2
        )
        mask = ex_w.get("expert_state_mask", np.ones(ex_w["num_tokens"], bool))
        np.testing.assert_allclose(ex_2["expert_states"][mask], folded.numpy()[mask], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ex_2["gates"], aggregate_gates(torch.from_numpy(ex_w["gates"]), 2).numpy())


def test_subspace_read_expands_to_the_full_read(caches: dict[str, str]) -> None:
    cache = open_cache(caches["int8-r8-half"])
    gb = cache.group_basis(2)
    assert gb.v.shape == (len(LAYERS), 2, D, min(D, 2 * (8 + 1)))
    full = cache.read_shard(1, {"expert_states"}, num_student_experts=2)
    sub = cache.read_shard(1, {"expert_states"}, num_student_experts=2, states_space="subspace")
    for f, s in zip(full, sub, strict=True):
        assert "expert_states" not in s and s["expert_state_coeffs"].shape[-1] == gb.dim
        expanded = torch.einsum("npeq,pedq->nped", torch.from_numpy(s["expert_state_coeffs"]), gb.v)
        mask = f["expert_state_mask"]
        np.testing.assert_allclose(expanded.numpy()[mask], f["expert_states"][mask], rtol=1e-4, atol=1e-5)
    with pytest.raises(CacheError, match="low-rank cache"):
        open_cache(caches["fp8"]).read_shard(0, {"expert_states"}, states_space="subspace")


def test_token_subsampling_stores_the_hashed_rows(caches: dict[str, str]) -> None:
    cache = open_cache(caches["int8-r8-half"])
    kept = total = 0
    for shard in cache.shards:
        examples = cache.read_shard(shard["shard_id"], {"expert_states"})
        for ex in examples:
            want = keep_rows([ex["seq_id"]], [ex["num_tokens"]], 0, 0.5)
            np.testing.assert_array_equal(ex["expert_state_mask"], want)
            assert not ex["expert_states"][~want].any()
            kept, total = kept + int(want.sum()), total + ex["num_tokens"]
    assert 0.4 < kept / total < 0.6


def test_kill_and_resume_gives_the_same_bytes_and_reuses_the_basis(
    assets: dict[str, Any], caches: dict[str, str], tmp_path: Path
) -> None:
    spec = dataclasses.replace(assets["spec"], states_codec="int8", states_rank=8, states_token_fraction=0.5)
    with pytest.raises(CacheError, match="resume"):
        build_teacher_cache(
            spec, assets["records"], str(tmp_path), _runtime(fail_after_shards=1), heldout=assets["heldout"]
        )
    path = Path(tmp_path) / Path(caches["int8-r8-half"]).name
    before = [(path / f).stat().st_mtime_ns for f in ("state_basis/u.npy", "fidelity/exact_states.npy")]
    build_teacher_cache(spec, assets["records"], str(tmp_path), _runtime(), heldout=assets["heldout"])
    after = [(path / f).stat().st_mtime_ns for f in ("state_basis/u.npy", "fidelity/exact_states.npy")]
    assert after == before  # basis and fidelity sample reused, not recomputed
    resumed = json.loads((path / "manifest.json").read_text())
    reference = json.loads((Path(caches["int8-r8-half"]) / "manifest.json").read_text())
    assert resumed["shards"] == reference["shards"] and resumed["state_basis"] == reference["state_basis"]
    assert resumed["states_fidelity"] == reference["states_fidelity"]


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_verify_and_readers_refuse_a_damaged_basis(
    caches: dict[str, str], tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "cache"
    shutil.copytree(caches["fp8-r6"], path)
    u = path / "state_basis" / "u.npy"
    if damage == "missing":
        u.unlink()
    else:
        data = bytearray(u.read_bytes())
        data[-1] ^= 0xFF
        u.write_bytes(bytes(data))
    report = verify_cache(str(path))
    assert not report.ok
    assert any(
        "state_basis/u.npy" in p and ("missing" if damage == "missing" else "corrupt") in p
        for p in report.problems
    )
    with pytest.raises(CacheError, match=r"state_basis/u\.npy"):
        open_cache(str(path)).read_shard(0, {"expert_states"})


def test_schema_1_caches_still_read(assets: dict[str, Any], tmp_path: Path) -> None:
    path = _build(assets, tmp_path)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and "states_codec" not in manifest["key_inputs"]
    assert verify_cache(path).ok
    ex = open_cache(path).read_shard(0, {"expert_states"}, num_student_experts=2)[0]
    assert ex["expert_states"].shape == (ex["num_tokens"], len(LAYERS), 2, D)


def test_storage_report_knows_the_codecs(caches: dict[str, str]) -> None:
    from pipeline.reports.storage import format_storage_report
    from pipeline.reports.storage_measure import measure_store

    report = measure_store(caches["int8-r8-half"])
    states = report.field_bytes("expert_states")
    # int8 rank 8: 2 pairs x 4 slots x (8 B + a 2 B scale), plus a 4 B row index, on half of the tokens.
    assert states.logical_per_token == pytest.approx(0.5 * (len(LAYERS) * WIDTH * (8 + 2) + 4))
    assert "other" not in [f.name for f in report.fields]  # every file (basis, fidelity sample) has its field
    assert report.field_bytes("fidelity").disk_bytes > FIDELITY_TOKENS * len(LAYERS) * WIDTH * D * 4
    text = format_storage_report(report)
    assert "int8 rank 8, 50% of tokens" in text and "state basis" in text
    assert "## Expert-state fidelity" in text and "held-out validation sequences" in text


def test_ray_build_fits_the_same_basis_and_writes_the_same_shards(
    ray_cluster: None, assets: dict[str, Any], caches: dict[str, str], tmp_path: Path
) -> None:
    spec = dataclasses.replace(assets["spec"], states_codec="int8", states_rank=8, states_token_fraction=0.5)
    runtime = CacheRuntime(
        batch_size=4, rows_per_shard=ROWS_PER_SHARD, num_cpus_per_actor=0.5, torch_threads=1, progress=False
    )
    local = json.loads((Path(caches["int8-r8-half"]) / "manifest.json").read_text())
    assert local["layout"]["torch_threads"] == 1  # both builds round alike
    heldout = assets["heldout"]
    path = build_teacher_cache(spec, assets["records"], str(tmp_path), runtime, heldout=heldout).path
    on_ray = json.loads((Path(path) / "manifest.json").read_text())
    assert on_ray["state_basis"] == local["state_basis"] and on_ray["shards"] == local["shards"]
    assert on_ray["states_fidelity"] == local["states_fidelity"]  # the sample's task rounds alike
    with pytest.raises(CacheError, match="with_state_mask=True"):  # a loss that ignores the mask is refused
        read_cache_dataset(path, {"gates", "expert_states"}, num_student_experts=2)
    row = read_cache_dataset(path, {"expert_states"}, num_student_experts=2, with_state_mask=True).take(1)[0]
    assert row["expert_state_mask"].shape == (row["num_tokens"],)
    assert row["expert_states"].shape == (row["num_tokens"], len(LAYERS), 2, D)


def test_qwen_preset_projection_meets_the_storage_targets() -> None:
    from pipeline.config import load_config
    from pipeline.reports.storage_projection import project_from_config

    preset = "jobs/configs/qwen3-4b-moe-to-0.6b-moe.yaml"
    plain = project_from_config(load_config(preset, {"cache.states_codec": None, "cache.states_rank": None}))
    assert plain.field_bytes("expert_states").logical_per_token == 28 * 4 * 2560 * 2  # bf16, 28 pairs, W=4
    report = project_from_config(load_config(preset))  # the preset's own codec: fp8, rank 48
    states = report.field_bytes("expert_states").logical_per_token
    assert states == 28 * 4 * (48 + 2)  # r fp8 coefficients + a float16 scale per (pair, slot)
    assert states <= 5700 and report.logical_per_token <= 6500
    assert report.dims["states"] == "fp8 rank 48" and any("state basis" in n for n in report.notes)


def test_states_fidelity_report_ranks_the_codecs(caches: dict[str, str], tmp_path: Path) -> None:
    from pipeline.reports.fidelity import format_fidelity, states_fidelity, write_fidelity

    fp8 = states_fidelity(caches["fp8"])  # the stored held-out sample: no teacher run
    low = states_fidelity(caches["fp8-r6"])
    assert [p["layer"] for p in fp8.pairs] == list(LAYERS) and fp8.source == "stored"
    assert fp8.num_tokens == FIDELITY_TOKENS
    for p in fp8.pairs:  # fp8 with per-row scales: ~7e-4 relative squared error, MC loss barely moves
        assert p["recon"] < 2e-3 and p["mc_rel"] < 0.01 and p["grad_cos"] > 0.99
    assert all(lo["recon"] > 10 * hi["recon"] for lo, hi in zip(low.pairs, fp8.pairs, strict=True))
    exact = states_fidelity(caches["bf16-full-rank"])
    assert all(p["grad_cos"] > 0.9999 for p in exact.pairs)
    rerun = states_fidelity(caches["fp8"], num_sequences=4, source="teacher")  # cached training sequences
    assert rerun.num_sequences == 4 and all(p["recon"] < 2e-3 for p in rerun.pairs)
    text = format_fidelity(low)
    assert "fp8 rank 6" in text and write_fidelity(low, tmp_path).read_text().startswith("# Expert-state")


def test_stored_fidelity_figures_match_a_teacher_rerun_on_its_tokens(caches: dict[str, str]) -> None:
    from pipeline.reports.fidelity import states_fidelity

    path = caches["int8-r8-half"]  # int8, low rank and token subsampling: every decoding step
    stored = states_fidelity(path, source="stored")
    rerun = states_fidelity(path, source="teacher-on-sample")  # same tokens, exact states recomputed
    assert stored.num_tokens == rerun.num_tokens == FIDELITY_TOKENS
    for s, r in zip(stored.pairs, rerun.pairs, strict=True):
        assert s["layer"] == r["layer"]
        assert s["recon"] == pytest.approx(r["recon"], rel=1e-3)
        assert s["mc_rel"] == pytest.approx(r["mc_rel"], rel=1e-2, abs=1e-5)
        assert s["grad_cos"] == pytest.approx(r["grad_cos"], abs=1e-5)


def test_verify_and_the_report_refuse_a_corrupt_fidelity_sample(
    caches: dict[str, str], tmp_path: Path
) -> None:
    from pipeline.reports.fidelity import states_fidelity

    path = tmp_path / "cache"
    shutil.copytree(caches["fp8"], path)
    exact = path / "fidelity" / "exact_states.npy"
    data = bytearray(exact.read_bytes())
    data[-1] ^= 0xFF
    exact.write_bytes(bytes(data))
    report = verify_cache(str(path))
    assert not report.ok and report.damaged == []  # no shard depends on the sample
    assert any("fidelity/exact_states.npy" in p and "corrupt" in p and "repair" in p for p in report.problems)
    with pytest.raises(CacheError, match=r"fidelity/exact_states\.npy"):
        states_fidelity(str(path))
    assert open_cache(str(path)).read_shard(0, {"expert_states"})  # training reads never open it


def test_subsampled_rows_hold_the_full_caches_states_of_the_same_tokens(
    assets: dict[str, Any], tmp_path: Path
) -> None:
    """Issue 21's suspicion: kept state rows paired with the wrong tokens. A fraction-0.5 cache's states at
    its kept rows equal the full cache's states at the same rows, sequence by sequence (fp16, full rank)."""
    full = open_cache(_build(assets, tmp_path / "full"))
    half = open_cache(_build(assets, tmp_path / "half", states_token_fraction=0.5))
    for shard in half.shards:
        got = {ex["seq_id"]: ex for ex in half.read_shard(shard["shard_id"], {"expert_states", "gates"})}
        want = {ex["seq_id"]: ex for ex in full.read_shard(shard["shard_id"], {"expert_states", "gates"})}
        assert got.keys() == want.keys()
        for seq_id, ex in got.items():
            mask = ex["expert_state_mask"]
            np.testing.assert_array_equal(ex["gates"], want[seq_id]["gates"])
            np.testing.assert_array_equal(ex["expert_states"][mask], want[seq_id]["expert_states"][mask])
