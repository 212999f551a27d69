"""pipeline.cache: the teacher cache built by the real Ray Data stage from a tiny real Qwen3-MoE teacher.

Expensive parts are module-scoped: a build interrupted by an injected failure and resumed by the Ray
pipeline (>= 2 concurrent write tasks), and an uninterrupted in-process build of the same key.
Values are checked against an independent in-test computation straight from the teacher checkpoint (HF
forward, router logits, per-expert loops).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support.tiny import teacher_assets, teacher_cache_spec, tiny_arch

from pipeline.cache import (
    CacheRuntime,
    CacheSpec,
    build_teacher_cache,
    bytes_per_token_by_field,
    cache_path_for,
    format_cache_list,
    format_verify_report,
    list_caches,
    open_cache,
    read_cache_dataset,
    verify_cache,
)
from pipeline.cache.build.builder import stored_runtime
from pipeline.cache.build.teacher import TeacherShardStage, input_device
from pipeline.cache.format.codecs import decode_states, encode_states
from pipeline.cache.format.shard import committed_shards
from pipeline.errors import CacheError, ConfigError
from pipeline.placement import check_no_offload, teacher_placement
from pipeline.storage import get_fs

NUM_RECORDS = 36
ROWS_PER_SHARD = 8  # -> 5 shards, the last one partial
BATCH, RESUME_BATCH = 3, 5  # micro-batch sizes of the first build and of the resume (they round differently)
E_T, WIDTH, LAYERS, K = 8, 4, (1, 3), 8
VOCAB = 384  # the teacher's vocabulary: its demo tokenizer's size


# --- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cache_assets")
    a = teacher_assets(
        root, NUM_RECORDS, records_seed=3, vocab_size=VOCAB, arch=tiny_arch(num_experts=E_T), model_seed=0
    )
    # max_length=150 drops record 30 (152 tokens): a dropped record leaves a gap in seq_ids, never a shift.
    spec = teacher_cache_spec(
        a,
        cached_layers=LAYERS,
        width=WIDTH,
        logits_k=K,
        states_dtype="bfloat16",
        max_length=150,
        teacher_responses="greedy",
        max_new_tokens=4,
    )
    return {"root": root, "records": a.records, "tok": a.tok, "model": a.model, "spec": spec}


class _Notes(logging.Handler):
    """Collects what pipeline.cache.build.builder logs at WARNING and above (caplog is function-scoped)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def built(
    ray_cluster: None, assets: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A real Ray Data build killed mid-run (the datasink's failure injection: every commit after the first 2
    fails, leaving its shard staged but uncommitted), then resumed by the Ray pipeline asking for another
    micro-batch size and rows_per_shard (the values stored by the first build win). Both runs: a teacher actor
    on a custom resource; the resume also holds write tasks until 2 run at once (each owns whole shards).
    `reference` builds the same key uninterrupted with the first values, in-process."""
    root = tmp_path_factory.mktemp("caches")
    on_ray = {
        "num_actors": 1,
        "num_cpus_per_actor": 0.5,
        "resources": {"teacher_node": 0.5},
        "progress": False,
    }
    failing = CacheRuntime(batch_size=BATCH, rows_per_shard=ROWS_PER_SHARD, fail_after_shards=2, **on_ray)
    with pytest.raises(CacheError, match=re.escape("rerun `moedistill cache --config ...` to resume")) as err:
        build_teacher_cache(assets["spec"], assets["records"], str(root), failing)
    path, *_ = cache_path_for(assets["spec"], assets["records"], str(root))
    after_failure = {
        "error": str(err.value),
        "committed": sorted(committed_shards(path)),
        "staging": sorted(p.name for p in (Path(path) / "shards").iterdir() if p.name.startswith(".tmp-")),
        "verify": verify_cache(path),
        "layout": json.loads((Path(path) / "manifest.json").read_text())["layout"],
    }
    with pytest.raises(CacheError, match="incomplete") as incomplete:
        open_cache(path)
    after_failure["open_error"] = str(incomplete.value)
    runtime = CacheRuntime(batch_size=RESUME_BATCH, rows_per_shard=999, write_barrier=2, **on_ray)
    notes = _Notes()
    logging.getLogger("pipeline.cache.build.builder").addHandler(notes)
    try:
        info = build_teacher_cache(assets["spec"], assets["records"], str(root), runtime)
    finally:
        logging.getLogger("pipeline.cache.build.builder").removeHandler(notes)
    return {
        "root": root,
        "info": info,
        "runtime": runtime,
        "after_failure": after_failure,
        "notes": notes.messages,
    }


@pytest.fixture(scope="module")
def reference(assets: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted build of the same key with the first build's micro-batch size, in-process
    (executor="local", no Ray): shards are byte-identical across executors."""
    root = tmp_path_factory.mktemp("caches_local")
    runtime = CacheRuntime(batch_size=BATCH, rows_per_shard=ROWS_PER_SHARD, executor="local", progress=False)
    return {"root": root, "info": build_teacher_cache(assets["spec"], assets["records"], str(root), runtime)}


# --- an independent reference computation ------------------------------------------------------------------
@torch.no_grad()
def _reference(
    model: Any, input_ids: list[int], response_mask: list[int], width: int
) -> dict[str, np.ndarray]:
    """Straight from the checkpoint: HF forward with router logits, each expert's FFN in a Python loop."""
    ids = torch.tensor([input_ids])
    moe_inputs: dict[int, torch.Tensor] = {}
    hooks = [
        model.model.layers[i].mlp.register_forward_pre_hook(
            lambda _m, args, i=i: moe_inputs.__setitem__(i, args[0][0].detach())
        )
        for i in LAYERS
    ]
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    for h in hooks:
        h.remove()
    pos = [p for p in range(len(input_ids) - 1) if response_mask[p + 1] == 1]
    logp = torch.log_softmax(out.logits[0, pos].double(), dim=-1)
    gates, states, gates_e, states_e = [], [], {}, {}
    for i in LAYERS:
        # [n, E_T]: the full router softmax (B=1, so router_logits rows are positions)
        probs = torch.softmax(out.router_logits[i].double(), dim=-1)[pos]
        x = moe_inputs[i][pos].double()
        ex = model.model.layers[i].mlp.experts
        inter = ex.down_proj.shape[-1]
        h = torch.stack(
            [
                ex.down_proj[j].double()
                @ (
                    ex.act_fn(ex.gate_up_proj[j, :inter].double() @ x.T)
                    * (ex.gate_up_proj[j, inter:].double() @ x.T)
                )
                for j in range(E_T)
            ]
        ).permute(2, 0, 1)  # [n, E_T, D]
        gates_e[i], states_e[i] = probs, h
        g, s = _fold(probs, h, width)
        gates.append(g)
        states.append(s)
    return {
        "logp": logp.numpy(),
        "gates": torch.stack(gates, 1).numpy(),
        "states": torch.stack(states, 1).numpy(),
        "probs": gates_e,
        "h": states_e,
    }


def _fold(probs: torch.Tensor, h: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6 by hand: group j -> floor(j * e / E_T); gate = group sum; state = gate-weighted group mean."""
    g = torch.zeros(probs.shape[0], e, dtype=probs.dtype)
    s = torch.zeros(probs.shape[0], e, h.shape[-1], dtype=h.dtype)
    for j in range(probs.shape[1]):
        g[:, (j * e) // probs.shape[1]] += probs[:, j]
    for j in range(probs.shape[1]):
        grp = (j * e) // probs.shape[1]
        s[:, grp] += (probs[:, j] / g[:, grp])[:, None] * h[:, j]
    return g, s


@torch.no_grad()
def _greedy(model: Any, prompt: list[int], n: int, eos: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos:
            break
    return ids[len(prompt) :]


# --- the build itself ---------------------------------------------------------------------------------------
def test_build_layout_and_concurrent_writes(built: dict[str, Any], assets: dict[str, Any]) -> None:
    info = built["info"]
    assert info.status == "resumed"
    # The resume wrote the shards the killed run did not commit, each by a write task that waited until 2
    # write tasks ran at once.
    n_done = len(built["after_failure"]["committed"])
    assert info.stats["shards"] == 5 - n_done and info.stats["tokens"] > 0
    assert Path(info.path).parent == built["root"] and Path(info.path).name == info.key
    m = open_cache(info.path).manifest
    assert m["complete"] and m["layout"]["num_shards"] == math.ceil(NUM_RECORDS / ROWS_PER_SHARD)
    assert [s["shard_id"] for s in m["shards"]] == list(range(m["layout"]["num_shards"]))
    assert info.num_sequences == m["totals"]["num_sequences"] == NUM_RECORDS - m["totals"]["num_dropped"]
    assert info.num_tokens == sum(s["num_tokens"] for s in m["shards"]) > 0
    # Key inputs are readable and hold no student-side or runtime parameter.
    ki = m["key_inputs"]
    assert (
        ki["cached_layers"] == list(LAYERS)
        and ki["width"] == WIDTH
        and ki["logit_sparsification"] == {"mode": "topk", "k": K}
    )
    assert not {"num_actors", "batch_size", "rows_per_shard", "num_student_experts", "alpha"} & set(ki)
    # Every shard file is listed with its checksum; no staging leftovers.
    assert all(len(f["sha256"]) == 64 for s in m["shards"] for f in s["files"].values())
    assert not [p for p in (Path(info.path) / "shards").iterdir() if p.name.startswith(".tmp-")]


def test_cached_values_match_independent_computation(built: dict[str, Any], assets: dict[str, Any]) -> None:
    cache = open_cache(built["info"].path)
    model, tok = assets["model"], assets["tok"]
    seq_ids = [0, 9, 35]  # first shard, a middle shard, the partial last shard
    fields = {"logits", "gates", "expert_states", "teacher_responses"}
    for seq_id in seq_ids:
        ex = cache.read_sequence(seq_id, fields)
        ref = _reference(model, ex["input_ids"].tolist(), ex["response_mask"].tolist(), WIDTH)
        n = ex["num_tokens"]
        assert n == int(ex["response_mask"][1:].sum()) == ref["logp"].shape[0] > 0
        # Top-k: the cached ids are a top-k set of the reference distribution, with matching log-probs.
        idx = ex["logit_indices"].astype(np.int64)
        ref_at = np.take_along_axis(ref["logp"], idx, axis=1)
        np.testing.assert_allclose(ex["logit_values"], ref_at, atol=1e-2, rtol=2e-3)
        rest = ref["logp"].copy()
        np.put_along_axis(rest, idx, -np.inf, axis=1)
        assert (ref_at.min(axis=1) >= rest.max(axis=1) - 1e-4).all()
        tail = np.log1p(-np.exp(ref_at).sum(axis=1))
        np.testing.assert_allclose(ex["logit_tail_logmass"], tail, atol=1e-3, rtol=1e-3)
        # Gates (fp16) and expert states (bf16 bits) at width W.
        assert ex["gates"].shape == (n, len(LAYERS), WIDTH)
        assert ex["expert_states"].shape == (n, len(LAYERS), WIDTH, 32)
        np.testing.assert_allclose(ex["gates"], ref["gates"], atol=1e-3)
        np.testing.assert_allclose(
            ex["expert_states"], ref["states"], rtol=1e-2, atol=2e-3 * np.abs(ref["states"]).max()
        )
        # Re-aggregation W=4 -> E_S=2 on read equals folding the full E_T=8 teacher directly to 2.
        ex2 = cache.read_sequence(
            seq_id, {"gates", "expert_states"}, num_student_experts=2, teacher_layers=[3]
        )
        g2, s2 = _fold(ref["probs"][3], ref["h"][3], 2)
        np.testing.assert_allclose(ex2["gates"][:, 0], g2.numpy(), atol=2e-3)
        np.testing.assert_allclose(
            ex2["expert_states"][:, 0], s2.numpy(), rtol=1e-2, atol=2e-3 * s2.abs().max().item()
        )
        # SeqKD: greedy teacher response from the prompt.
        prompt = ex["input_ids"][: int(np.argmax(ex["response_mask"]))].tolist()
        assert ex["teacher_response"].tolist() == _greedy(model, prompt, 4, tok.eos_token_id)


def test_dropped_records_keep_their_seq_ids(built: dict[str, Any], assets: dict[str, Any]) -> None:
    cache = open_cache(built["info"].path)
    rows = [r for s in cache.shards for r in cache.read_shard(s["shard_id"], set())]
    assert [r["seq_id"] for r in rows] == [i for i in range(NUM_RECORDS) if i != 30]
    assert cache.manifest["totals"]["num_dropped"] == 1
    assert cache.shards[3]["num_records"] == 8 and cache.shards[3]["num_rows"] == 7
    with pytest.raises(CacheError, match="sequence 30 is not in cache"):
        cache.read_sequence(30)


def test_second_run_is_a_noop(
    built: dict[str, Any], assets: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    before = (Path(built["info"].path) / "manifest.json").read_bytes()
    caplog.set_level(logging.INFO, logger="pipeline.cache.build.builder")
    info = build_teacher_cache(assets["spec"], assets["records"], str(built["root"]), built["runtime"])
    assert info.status == "exists" and info.key == built["info"].key
    assert "nothing to do" in caplog.text
    assert (Path(built["info"].path) / "manifest.json").read_bytes() == before


def test_ray_write_killed_mid_run_resumes_from_committed_shards(built: dict[str, Any]) -> None:
    """The Ray Data datasink's failure injection: the real write stage dies after 2 commits; the resume keeps
    the committed shards and writes only the others."""
    fail = built["after_failure"]
    committed = fail["committed"]
    # Exactly 2 commits get through (a write in flight when the job dies may be cancelled: then fewer), in
    # whatever order the write tasks ran; the error names the remote exception, not Ray's retry hint.
    assert 1 <= len(committed) <= 2 and set(committed) <= set(range(5)), committed
    assert f"{len(committed)} of 5 shards committed" in fail["error"], fail["error"]
    assert "RuntimeError: injected failure before committing shard" in fail["error"], fail["error"]
    assert fail["staging"]  # the killed write left only a staged copy, which the resume discarded
    assert not fail["verify"].ok and "incomplete" in fail["verify"].problems[0]
    assert "rerun `moedistill cache --config ...` to resume it" in fail["open_error"]
    m = open_cache(built["info"].path).manifest
    assert [s["shard_id"] for s in m["shards"]] == list(range(5))
    assert not [p for p in (Path(built["info"].path) / "shards").iterdir() if p.name.startswith(".tmp-")]


def test_resume_after_failure_is_byte_identical(built: dict[str, Any], reference: dict[str, Any]) -> None:
    """Killed at micro-batch BATCH, resumed asking for RESUME_BATCH (which rounds differently) and another
    rows_per_shard: the stored values win, so every checksum equals an uninterrupted BATCH build's."""
    fail = built["after_failure"]
    assert fail["layout"]["batch_size"] == BATCH and fail["layout"]["rows_per_shard"] == ROWS_PER_SHARD
    assert fail["layout"]["torch_threads"] == 1  # floor(num_cpus_per_actor=0.5), at least 1
    [note] = built["notes"]
    assert f"cache.batch_size={BATCH} (asked: {RESUME_BATCH})" in note, note
    assert f"cache.rows_per_shard={ROWS_PER_SHARD} (asked: 999)" in note, note
    assert "torch threads" not in note  # not asked to change
    assert reference["info"].status == "built" and reference["info"].key == built["info"].key
    a = json.loads((Path(built["info"].path) / "manifest.json").read_text())
    b = json.loads((Path(reference["info"].path) / "manifest.json").read_text())
    assert a["shards"] == b["shards"]  # every file's size and sha256
    assert (Path(built["info"].path) / "manifest.json").read_bytes() == (
        Path(reference["info"].path) / "manifest.json"
    ).read_bytes()
    assert verify_cache(built["info"].path).ok


# --- verify / ls / storage ----------------------------------------------------------------------------------
def test_verify_catches_corrupted_truncated_and_missing(built: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "copy"
    shutil.copytree(built["info"].path, path)
    report = verify_cache(str(path))
    assert report.ok, format_verify_report(report)
    assert report.num_shards_ok == report.num_shards == 5
    chunk = next((path / "shards/shard-00001/arrays.zarr/gates").rglob("c/*/*/*"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    index = path / "shards/shard-00002/index.parquet"
    index.write_bytes(index.read_bytes()[:-10])
    shutil.rmtree(path / "shards/shard-00003")
    report = verify_cache(str(path))
    text = format_verify_report(report)
    assert not report.ok and report.num_shards_ok == 2, text
    rel = chunk.relative_to(path / "shards/shard-00001").as_posix()
    assert any(f"shard 1: file shards/shard-00001/{rel} is corrupted" in p for p in report.problems), text
    assert any("shard 2: file shards/shard-00002/index.parquet is truncated" in p for p in report.problems), (
        text
    )
    assert any("shard 3 is missing" in p for p in report.problems), text
    assert text.startswith("FAILED")


def test_list_caches_and_bytes_per_token(built: dict[str, Any]) -> None:
    (built["root"] / "by-config").mkdir(exist_ok=True)  # other bookkeeping under the root is ignored
    [summary] = list_caches(str(built["root"]))
    assert summary.key == built["info"].key and summary.complete
    assert (summary.num_tokens, summary.num_bytes) == (built["info"].num_tokens, built["info"].num_bytes)
    text = format_cache_list([summary])
    assert summary.key in text and "complete" in text and "layers=[1, 3]" in text
    bpt = bytes_per_token_by_field(built["info"].path)
    arrays = ("logit_indices", "logit_values", "logit_tail_logmass", "gates", "expert_states")
    assert all(bpt[a] > 0 for a in arrays)
    assert bpt["expert_states"] == max(bpt[a] for a in arrays)
    assert bpt["total"] == pytest.approx(sum(v for k, v in bpt.items() if k not in ("total", "logits")))


# --- readers ------------------------------------------------------------------------------------------------
def test_ray_dataset_reader_projection_and_reaggregation(built: dict[str, Any]) -> None:
    path = built["info"].path
    ds = read_cache_dataset(path, {"logits", "gates"}, num_student_experts=2, teacher_layers=[3, 1])
    assert "expert_states" not in ds.schema().names and "teacher_response" not in ds.schema().names
    rows = {int(r["seq_id"]): r for r in ds.iter_rows()}
    cache = open_cache(path)
    assert len(rows) == cache.num_sequences
    ref = cache.read_sequence(9, {"logits", "gates"}, num_student_experts=2, teacher_layers=[3, 1])
    assert rows[9]["gates"].shape == (ref["num_tokens"], 2, 2)
    np.testing.assert_array_equal(rows[9]["gates"], ref["gates"])
    np.testing.assert_array_equal(rows[9]["logit_indices"], ref["logit_indices"])
    np.testing.assert_array_equal(rows[9]["input_ids"], ref["input_ids"])


def test_reader_never_touches_unrequested_arrays(built: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "no_states"
    shutil.copytree(built["info"].path, path)
    for states in path.glob("shards/*/arrays.zarr/expert_states"):
        shutil.rmtree(states)
    cache = open_cache(str(path))
    ex = cache.read_sequence(9, {"logits", "gates"}, num_student_experts=4)
    assert ex["gates"].shape[1:] == (2, 4) and "expert_states" not in ex
    with pytest.raises(Exception, match="expert_states"):
        cache.read_sequence(9, {"expert_states"})


# --- errors -------------------------------------------------------------------------------------------------
def test_student_mismatches_give_clear_errors(built: dict[str, Any]) -> None:
    cache = open_cache(built["info"].path)
    with pytest.raises(CacheError, match="cannot be re-aggregated to 3 student experts"):
        cache.check_student(num_student_experts=3)
    with pytest.raises(CacheError, match=r"rebuild the cache with cache.width in \[3, 6\]"):
        cache.check_student(num_student_experts=3)
    # More student experts than the teacher has: no cache width could serve it, and the fix says so.
    with pytest.raises(CacheError, match=r"use one of \[1, 2, 4\] student experts \(at most the teacher's 8"):
        cache.check_student(num_student_experts=16)
    with pytest.raises(CacheError, match=r"need teacher layers \[0, 2\].*cached: \[1, 3\]"):
        cache.check_student(teacher_layers_needed=[0, 1, 2, 3])
    with pytest.raises(CacheError, match=r"vocabulary has 500 entries.*384"):
        cache.check_student(vocab_size=500)
    with pytest.raises(CacheError, match="hidden size 48"):
        cache.check_student(hidden_size=48, allow_projection=False)
    cache.check_student(vocab_size=384, teacher_layers_needed=[3], num_student_experts=2, hidden_size=48)
    with pytest.raises(CacheError, match="cannot be re-aggregated"):
        read_cache_dataset(built["info"].path, {"gates"}, num_student_experts=3)


def test_unknown_schema_version_and_missing_cache(built: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "future"
    shutil.copytree(built["info"].path, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="schema version 99 is unknown"):
        open_cache(str(path))
    report = verify_cache(str(path))
    assert not report.ok and "schema version 99" in report.problems[0]
    with pytest.raises(CacheError, match="no teacher cache at"):
        open_cache(str(tmp_path / "nothing"))


# --- no Ray -------------------------------------------------------------------------------------------------
def test_key_covers_teacher_side_inputs_only(assets: dict[str, Any], tmp_path: Path) -> None:
    spec, records = assets["spec"], assets["records"]
    key = cache_path_for(spec, records, "/r")[1]
    assert cache_path_for(spec, records, "/elsewhere")[1] == key  # the root is not content
    changed = [
        CacheSpec(**{**spec.__dict__, "cached_layers": (3,)}),
        CacheSpec(**{**spec.__dict__, "width": 2}),
        CacheSpec(**{**spec.__dict__, "logits_k": 4}),
        CacheSpec(**{**spec.__dict__, "states_dtype": "float16"}),
        CacheSpec(**{**spec.__dict__, "max_length": 200}),
        CacheSpec(**{**spec.__dict__, "prompt_template": "other"}),
    ]
    keys = {cache_path_for(s, records, "/r")[1] for s in changed}
    assert len(keys) == len(changed) and key not in keys
    assert cache_path_for(spec, records[:-1], "/r")[1] != key
    # Retraining the teacher changes its weights digest.
    teacher2 = tmp_path / "teacher2"
    shutil.copytree(spec.teacher_path, teacher2)
    assets["model"].lm_head.weight.data[0, 0] += 1.0
    try:
        assets["model"].save_pretrained(teacher2)
    finally:
        assets["model"].lm_head.weight.data[0, 0] -= 1.0
    assert (
        cache_path_for(CacheSpec(**{**spec.__dict__, "teacher_path": str(teacher2)}), records, "/r")[1] != key
    )


def test_spec_validation_errors(assets: dict[str, Any]) -> None:
    spec = assets["spec"]
    with pytest.raises(ConfigError, match="logits_mode"):
        CacheSpec(**{**spec.__dict__, "logits_mode": "dense"})
    with pytest.raises(ConfigError, match="out of range"):
        cache_path_for(CacheSpec(**{**spec.__dict__, "cached_layers": (1, 7)}), assets["records"], "/r")
    with pytest.raises(ConfigError, match="width=16"):
        cache_path_for(CacheSpec(**{**spec.__dict__, "width": 16}), assets["records"], "/r")
    with pytest.raises(ConfigError, match="rows_per_shard"):
        CacheRuntime(rows_per_shard=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_state_encoding_roundtrip(dtype: str) -> None:
    x = torch.randn(5, 2, 4, 8) * 3
    enc = encode_states(x, dtype)
    assert enc.dtype == (np.uint16 if dtype == "bfloat16" else np.float16)
    np.testing.assert_array_equal(
        decode_states(enc, dtype).numpy(), x.to(getattr(torch, dtype)).float().numpy()
    )


def test_object_store_commit_markers_resume_and_sampled_logits(
    assets: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """An fsspec URL (memory://, an object store without rename): shards commit by a marker written last.
    Also: importance-sampled logits, no expert states, W = E_T (no aggregation at cache time), and a local
    resume asking for another micro-batch and thread count (the stored values are used, with a note)."""
    spec = CacheSpec(
        **{
            **assets["spec"].__dict__,
            "cached_layers": (3,),
            "width": None,
            "logits_mode": "sampled",
            "store_expert_states": False,
            "teacher_responses": "none",
        }
    )
    records = assets["records"][:12]
    root = f"memory://moedistill-test-{uuid.uuid4().hex}"
    runtime = CacheRuntime(batch_size=4, rows_per_shard=4, executor="local", progress=False)
    with pytest.raises(CacheError, match="1 of 3 shards committed"):
        build_teacher_cache(spec, records, root, dataclasses.replace(runtime, fail_after_shards=1))
    path = cache_path_for(spec, records, root)[0]
    fs, base = get_fs(path)
    assert sorted(committed_shards(path)) == [0]
    # The failed shard's files were uploaded, but without its marker nobody sees them.
    assert fs.exists(f"{base}/shards/shard-00001/index.parquet")
    assert not fs.exists(f"{base}/shards/shard-00001/_SHARD.json")
    caplog.set_level(logging.WARNING, logger="pipeline.cache.build.builder")
    resume = dataclasses.replace(runtime, batch_size=2, torch_threads=2)
    info = build_teacher_cache(spec, records, root, resume)
    assert info.status == "resumed" and verify_cache(info.path).ok
    note = "cache.batch_size=4 (asked: 2), torch threads (num_cpus_per_actor)=1 (asked: 2)"
    assert note in caplog.text, caplog.text
    layout = open_cache(info.path).manifest["layout"]
    assert (layout["batch_size"], layout["torch_threads"], layout["rows_per_shard"]) == (4, 1, 4)
    assert [s.key for s in list_caches(root)] == [info.key]
    cache = open_cache(info.path)
    ex = cache.read_sequence(5, {"logits", "gates"}, num_student_experts=4)
    assert ex["gates"].shape[1:] == (1, 4)
    np.testing.assert_allclose(ex["gates"].sum(axis=-1), 1.0, atol=2e-3)
    with pytest.raises(CacheError, match="built without them"):
        cache.check_student(fields={"expert_states"})
    # Importance-sampled entries: no tail, weights count/k summing to 1 per position.
    assert np.isneginf(ex["logit_tail_logmass"]).all()
    np.testing.assert_allclose(np.exp(ex["logit_values"]).sum(axis=1), 1.0, atol=1e-3)


def test_stored_runtime_reads_older_manifests(caplog: pytest.LogCaptureFixture) -> None:
    """A manifest written before batch_size / torch_threads were recorded: only rows_per_shard is forced."""
    caplog.set_level(logging.WARNING, logger="pipeline.cache.build.builder")
    asked = CacheRuntime(batch_size=5, rows_per_shard=999, num_cpus_per_actor=2)
    got = stored_runtime({"rows_per_shard": 8, "num_shards": 5}, asked, "k")
    assert (got.rows_per_shard, got.batch_size, got.threads) == (8, 5, 2)
    assert "cache.rows_per_shard=8 (asked: 999)" in caplog.text and "batch_size" not in caplog.text
    caplog.clear()
    same = stored_runtime({"rows_per_shard": 8, "batch_size": 5, "torch_threads": 2}, got, "k")
    assert (same.rows_per_shard, same.batch_size, same.threads) == (8, 5, 2)
    assert not caplog.text  # nothing overridden: no note


# --- multi-GPU placement (pure: no GPU needed) --------------------------------------------------------------
GB = 10**9


@pytest.mark.parametrize(
    ("num_gpus", "gpu_memory", "kind", "kwargs"),
    [
        (0, [], "cpu", {}),
        (0, [80 * GB], "cpu", {}),  # a GPU in sight is not used unless asked for
        (0.5, [80 * GB], "cuda", {}),  # a shared GPU
        (1, [80 * GB, 80 * GB], "cuda", {}),
        # One teacher over 2 GPUs: accelerate places the layers within 80% of each GPU, no CPU/disk budget.
        (
            2,
            [80 * GB, 40 * GB, 80 * GB],
            "device_map",
            {"device_map": "auto", "max_memory": {0: 64 * GB, 1: 32 * GB}},
        ),
    ],
)
def test_teacher_placement(num_gpus: float, gpu_memory: list[int], kind: str, kwargs: dict[str, Any]) -> None:
    placement = teacher_placement(num_gpus, gpu_memory)
    assert placement.kind == kind and placement.from_pretrained_kwargs() == kwargs


def test_teacher_placement_errors_and_offload_check() -> None:
    with pytest.raises(CacheError, match=r"sees no CUDA device\. Fix: run on a GPU node"):
        teacher_placement(1, [])
    with pytest.raises(CacheError, match=r"=4 but this process sees only 2 CUDA device\(s\)\. Fix:"):
        teacher_placement(4, [80 * GB, 80 * GB])
    with pytest.raises(ConfigError, match=r"split over whole GPUs\. Fix: use a whole number \(2\)"):
        teacher_placement(1.5, [80 * GB, 80 * GB])
    with pytest.raises(ConfigError, match=r"num_gpus_per_actor=1.5 must be <= 1 .* or a whole number.*Fix:"):
        CacheRuntime(num_gpus_per_actor=1.5)
    check_no_offload({"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}, 2)
    with pytest.raises(CacheError, match=r"does not fit in 2 GPUs.*2 module\(s\).*Fix: raise cache.num_gpus"):
        check_no_offload({"model.embed_tokens": 0, "model.layers.1": "cpu", "lm_head": "disk"}, 2)


def test_cpu_teacher_stage_placement(assets: dict[str, Any]) -> None:
    stage = TeacherShardStage(assets["spec"], WIDTH, micro_batch=3, num_gpus=0.0)
    assert stage.placement.kind == "cpu" and input_device(stage.adapter.model) == torch.device("cpu")


# --- `moedistill cache verify` ------------------------------------------------------------------------------
def test_cli_verify_exit_codes(built: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    path = tmp_path / "copy"
    shutil.copytree(built["info"].path, path)
    assert main(["cache", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: teacher cache {path}") and "shards ok 5/5" in out, out
    chunk = next((path / "shards/shard-00004/arrays.zarr/logit_values").rglob("c/*/*"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "verify", str(path)])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    rel = chunk.relative_to(path / "shards/shard-00004").as_posix()
    assert out.startswith("FAILED") and "shards ok 4/5" in out, out
    assert f"- shard 4: file shards/shard-00004/{rel} is corrupted: sha256 " in out, out
    assert "Fix: delete that shard directory and rerun `moedistill cache --config ...`" in out, out
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "verify", str(tmp_path / "nothing")])
    assert exit_.value.code == 1
    assert f"no manifest.json at {tmp_path / 'nothing'}: not a teacher cache" in capsys.readouterr().out
    assert main(["cache", "verify"]) == 2
    assert "needs a cache directory (ROOT/<key>). Fix:" in capsys.readouterr().err


# --- error messages -----------------------------------------------------------------------------------------
# Messages handed on unchanged from an exception that already carries its own "Fix: ...".
_PASS_THROUGH = {"str(e)", 'f"shard {sid}: {e}"'}


def _raised_messages() -> list[tuple[str, str, bool]]:
    """(where, message source, names a fix) for every exception raised (and every verify problem reported)
    with a literal message in pipeline/cache/**/*.py."""
    import pipeline.cache

    found = []
    paths = sorted(Path(pipeline.cache.__file__).parent.rglob("*.py"))
    sources = {path: path.read_text() for path in paths}
    trees = {path: ast.parse(src) for path, src in sources.items()}
    # Module-level string constants (_REBUILD, _RESUME_HINT, FIDELITY_FIX) that messages interpolate, from
    # any module of the package (one may import another's).
    consts = {
        t.id: node.value.value
        for tree in trees.values()
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for t in node.targets
        if isinstance(t, ast.Name) and isinstance(node.value.value, str)
    }
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                call = node.exc
                if getattr(call.func, "id", None) == "AttributeError":  # module __getattr__ protocol
                    continue
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "fail":
                call = node  # VerifyReport.fail: one problem line of `moedistill cache verify`
            else:
                continue
            if not call.args or not isinstance(call.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
                continue
            msg = ast.get_source_segment(sources[path], call.args[0]) or ""
            if msg in _PASS_THROUGH:
                continue
            names = {n.id for n in ast.walk(call.args[0]) if isinstance(n, ast.Name)}
            fix = "Fix:" in msg or any("Fix:" in consts.get(n, "") for n in names)
            found.append((f"{path.name}:{node.lineno}", msg, fix))
    return found


def test_every_cache_error_says_how_to_fix_it() -> None:
    messages = _raised_messages()
    assert len(messages) > 40  # the scan sees the raises
    assert not [(where, msg) for where, msg, fix in messages if not fix]


def test_config_errors_name_the_fix(assets: dict[str, Any], tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from pipeline.cache.build.builder import teacher_dims

    spec, records = assets["spec"], assets["records"]
    with pytest.raises(
        ConfigError, match=r"cached_layers \[7\] are out of range.*Fix: list layers in 0\.\.3"
    ):
        cache_path_for(CacheSpec(**{**spec.__dict__, "cached_layers": (1, 7)}), records, "/r")
    with pytest.raises(
        ConfigError, match=r"width=16 is not between 1 and .* 8 experts\. Fix: set cache\.width"
    ):
        cache_path_for(CacheSpec(**{**spec.__dict__, "width": 16}), records, "/r")
    with pytest.raises(
        ConfigError, match=r"logits_k=1000 exceeds .* \(384 entries\)\. Fix: .*logits_k <= 384"
    ):
        cache_path_for(CacheSpec(**{**spec.__dict__, "logits_k": 1000}), records, "/r")
    LlamaConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=16, num_attention_heads=2
    ).save_pretrained(tmp_path / "dense")
    with pytest.raises(
        ConfigError, match=r"is a 'llama' model; .*qwen3_moe.*\. Fix: point teacher_path at an MoE"
    ):
        teacher_dims(str(tmp_path / "dense"))
    with pytest.raises(ConfigError, match=r"batch_size=0 must be >= 1; rows_per_shard=0 must be >= 1\. Fix:"):
        CacheRuntime(rows_per_shard=0, batch_size=0)
    with pytest.raises(ConfigError, match=r"logits_mode='dense' must be 'topk' or 'sampled'\. Fix:"):
        CacheSpec(**{**spec.__dict__, "logits_mode": "dense"})
