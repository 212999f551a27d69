"""Reports: storage accounting against the bytes on disk of a real (small) cache store, config-only
projection, gate heat maps from a metrics.jsonl, and the results table schema. No Ray needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from support.paths import REPO

from pipeline.cli import main
from pipeline.config import config_from_dict, load_config
from pipeline.errors import ConfigError, DataError
from pipeline.evaluate.results import (
    RESULT_COLUMNS,
    collect_results,
    format_results_markdown,
    read_results_csv,
    write_results_csv,
    write_results_table,
)
from pipeline.models.dims import normalize_model_name
from pipeline.reports.gates import format_gate_table, load_gate_metrics, write_gate_report
from pipeline.reports.storage import GIB, format_storage_report, write_storage_report
from pipeline.reports.storage_measure import measure_store
from pipeline.reports.storage_projection import project_from_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEACHER = {"model_type": "qwen3_moe", "num_layers": 4, "num_experts": 8, "hidden_size": 16, "vocab_size": 300}


# --- storage ------------------------------------------------------------------------------------------------
def _make_store(root: Path) -> str:
    """A complete store written by the cache's own shard writer and manifest code, from synthetic arrays."""
    from pipeline.cache.format.manifest import finalize_manifest, new_manifest, write_manifest
    from pipeline.cache.format.shard import ShardData, ShardMeta, commit_shard

    k, layers, width = 8, (1, 3), 4
    meta = ShardMeta(
        layers, width, TEACHER["hidden_size"], TEACHER["vocab_size"], "topk", k, "float16", True, False
    )
    inputs = {
        "schema_version": 1,
        "teacher_weights_digest": "a" * 64,
        "tokenizer_digest": "b" * 64,
        "dataset_fingerprint": "c" * 64,
        "prompt_template_digest": "d" * 64,
        "max_length": 32,
        "cached_layers": list(layers),
        "width": width,
        "logit_sparsification": {"mode": "topk", "k": k},
        "dtypes": {
            "compute": "float32",
            "logit_values": "float16",
            "logit_indices": "int32",
            "logit_tail_logmass": "float32",
            "gates": "float16",
            "expert_states": "float16",
        },
        "stored_fields": {"expert_states": True, "teacher_responses": {"mode": "none"}},
    }
    key = "0123456789abcdef0123"
    url = str(root / key)
    manifest = new_manifest(
        key, inputs, {"teacher_path": "fake/teacher"}, TEACHER, rows_per_shard=3, num_records=5
    )
    write_manifest(url, manifest)
    rng = np.random.default_rng(0)
    for shard_id, seq_ids in enumerate([[0, 1, 2], [3, 4]]):
        ids, masks, counts = [], [], []
        for _ in seq_ids:
            length, resp = int(rng.integers(12, 24)), int(rng.integers(3, 8))
            ids.append(rng.integers(4, 300, length).tolist())
            masks.append([0] * (length - resp) + [1] * resp)
            counts.append(resp)  # distillation positions: p with mask[p + 1] == 1
        n = sum(counts)
        arrays = {
            "logit_indices": rng.integers(0, 300, (n, k)).astype(np.int32),
            "logit_values": rng.normal(size=(n, k)).astype(np.float16),
            "logit_tail_logmass": rng.normal(size=n).astype(np.float32),
            "gates": rng.dirichlet(np.ones(width), (n, len(layers))).astype(np.float16),
            "expert_states": rng.normal(size=(n, len(layers), width, 16)).astype(np.float16),
        }
        commit_shard(ShardData(shard_id, len(seq_ids), seq_ids, ids, masks, counts, arrays), meta, url)
    finalize_manifest(url, manifest)
    return url


def _disk_bytes(url: str) -> dict[str, int]:
    """Independent tally of the store directory with os.walk: field -> bytes."""
    out = {"total": 0, "logits": 0, "gates": 0, "expert_states": 0, "index": 0, "metadata": 0, "other": 0}
    fields = {"logit_indices": "logits", "logit_values": "logits", "logit_tail_logmass": "logits"}
    for dirpath, _, files in os.walk(url):
        for name in files:
            path = os.path.join(dirpath, name)
            size = os.path.getsize(path)
            rel = os.path.relpath(path, url).split(os.sep)
            out["total"] += size
            if ".tmp-" in path:
                out["other"] += size
            elif name in ("manifest.json", "_SHARD.json", "zarr.json"):
                out["metadata"] += size
            elif name == "index.parquet":
                out["index"] += size
            else:
                out[fields.get(rel[3], rel[3])] += size
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _make_store(tmp_path_factory.mktemp("caches"))


def test_storage_report_equals_bytes_on_disk(store: str, tmp_path: Path) -> None:
    from pipeline.cache.read.listing import bytes_per_token_by_field

    junk = Path(store) / "shards" / ".tmp-shard-00007-dead" / "partial.bin"  # a killed write's leftover
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"x" * 1234)
    try:
        report = measure_store(store, projected_tokens=2e9, usd_per_gb_month=0.02)
        disk = _disk_bytes(store)
    finally:
        junk.unlink()
        junk.parent.rmdir()
    tokens = report.num_tokens
    assert tokens == json.loads(Path(store, "manifest.json").read_text())["totals"]["num_tokens"]
    assert report.total_disk_bytes == disk["total"]
    assert sum(f.disk_bytes for f in report.fields) == disk["total"]
    for name in ("logits", "gates", "expert_states", "index", "metadata", "other"):
        f = report.field_bytes(name)
        assert f.disk_bytes == disk[name], name
        assert f.disk_per_token * tokens == pytest.approx(disk[name])
    # The cache's own manifest-based accounting agrees for the data files.
    theirs = bytes_per_token_by_field(store)
    for name in ("logits", "gates", "expert_states", "index"):
        assert report.field_bytes(name).disk_per_token == pytest.approx(theirs[name])
    # Logical sizes and the dense fp32 baseline from the dimensions: k=8, P=2, W=4, D=16, V=300, L_T=4, E_T=8.
    assert report.field_bytes("logits").logical_per_token == 8 * (4 + 2) + 4
    assert report.field_bytes("gates").logical_per_token == 2 * 4 * 2
    assert report.field_bytes("expert_states").logical_per_token == 2 * 4 * 16 * 2
    assert report.field_bytes("logits").dense_fp32_per_token == 300 * 4
    assert report.field_bytes("gates").dense_fp32_per_token == 4 * 8 * 4
    assert report.field_bytes("expert_states").dense_fp32_per_token == 4 * 8 * 16 * 4
    # Projection and cost.
    assert report.projected_bytes(report.disk_per_token) == pytest.approx(disk["total"] / tokens * 2e9)
    assert report.monthly_usd(report.disk_per_token) == pytest.approx(
        disk["total"] / tokens * 2e9 / GIB * 0.02
    )
    text = format_storage_report(report)
    assert f"{disk['total']} bytes on disk" in text and "| expert_states | 256.0 |" in text
    assert any("not part of the cache layout" in n for n in report.notes)
    md, png = write_storage_report(report, tmp_path)
    assert md.read_text() == text and png.read_bytes()[:8] == PNG_MAGIC


def test_storage_cli_on_a_store(store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "storage", store, "--tokens", "1e6", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Projected for 1,000,000 distillation tokens" in out
    assert (tmp_path / "storage.md").is_file() and (tmp_path / "storage.png").is_file()
    assert main(["report", "storage", str(tmp_path)]) == 2  # not a cache: a clear error, no traceback
    assert "no manifest.json" in capsys.readouterr().err


def _hub_config(**teacher) -> dict:
    return {
        "name": "qwen3-4b-moe-to-0.6b-moe",
        "data": {"source": "databricks/databricks-dolly-15k", "max_length": 512},
        "tokenizer": {"path": "Qwen/Qwen3-4B"},
        "teacher": teacher or {"upcycle_from": "Qwen/Qwen3-4B", "num_experts": 4, "top_k": 2},
        "student": {"upcycle_from": "Qwen/Qwen3-0.6B", "num_experts": 4, "top_k": 2},
        "cache": {"layers": "paired", "logits_k": 64, "states_dtype": "bfloat16"},
    }


def test_projection_from_a_config_alone() -> None:
    report = project_from_config(config_from_dict(_hub_config()), projected_tokens=1e9)
    d = report.dims
    assert (d["hidden_size"], d["num_layers"], d["vocab_size"], d["num_experts"]) == (2560, 36, 151936, 4)
    assert d["cached_layers"] == 28 and d["width"] == 4  # every Qwen3-0.6B layer is paired with a teacher one
    states = report.field_bytes("expert_states")
    assert states.logical_per_token == 28 * 4 * 2560 * 2 == 573_440  # ~573 KB/token (docs/cache-format.md)
    assert states.dense_fp32_per_token == 36 * 4 * 2560 * 4
    assert report.field_bytes("gates").logical_per_token == 28 * 4 * 2
    assert report.field_bytes("logits").logical_per_token == 64 * 6 + 4
    assert report.field_bytes("logits").dense_fp32_per_token == 151936 * 4
    assert report.disk_per_token == report.logical_per_token  # nothing measured: uncompressed sizes
    assert report.projected_bytes(report.disk_per_token) == pytest.approx(report.disk_per_token * 1e9)

    assert normalize_model_name("meta-llama/Meta-Llama-3.1-8B-Instruct") == "llama-3.1-8b"
    llama = project_from_config(
        config_from_dict(
            {
                **_hub_config(upcycle_from="meta-llama/Llama-3.1-8B", num_experts=4),
                "student": {"upcycle_from": "meta-llama/Llama-3.2-1B", "num_experts": 4},
            }
        )
    )
    assert llama.dims["cached_layers"] == 16 and llama.field_bytes("expert_states").logical_per_token == (
        16 * 4 * 4096 * 2
    )
    with pytest.raises(ConfigError, match=r"unknown teacher 'acme/mystery-7b'.*local path"):
        project_from_config(config_from_dict(_hub_config(upcycle_from="acme/mystery-7b")))


def test_projection_from_local_teacher_config_and_demo(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen3_moe",
                "hidden_size": 64,
                "num_hidden_layers": 4,
                "vocab_size": 500,
                "num_experts": 8,
            }
        )
    )
    raw = _hub_config(path=str(tmp_path))
    raw["student"] = {"build": {"num_layers": 2, "num_experts": 2}}
    report = project_from_config(config_from_dict(raw))
    assert report.dims["num_experts"] == 8 and report.dims["cached_layers"] == 2
    assert report.field_bytes("expert_states").logical_per_token == 2 * 8 * 64 * 2

    demo = project_from_config(load_config(REPO / "jobs/configs/demo.yaml"))
    assert (
        demo.dims["vocab_size"] == 1024
        and demo.field_bytes("expert_states").logical_per_token == 2 * 4 * 256 * 2
    )


def test_projection_of_the_paper_presets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    preset = REPO / "jobs/configs/qwen3-4b-moe-to-0.6b-moe.yaml"
    if preset.is_file():  # parsed without path validation: the hub ids are never resolved here
        report = project_from_config(
            config_from_dict(yaml.safe_load(preset.read_text())), projected_tokens=1e9
        )
        assert report.dims["cached_layers"] == 28
        assert report.field_bytes("expert_states").logical_per_token == 28 * 4 * (48 + 2)  # fp8, rank 48
    args = ["report", "storage", "--config", str(REPO / "jobs/configs/demo.yaml"), "--tokens", "5e8"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert "projection" in capsys.readouterr().out
    assert (tmp_path / "storage-projection.png").read_bytes()[:8] == PNG_MAGIC


# --- gates --------------------------------------------------------------------------------------------------
def _write_metrics(run_dir: Path, skew: float) -> Path:
    path = run_dir / "metrics" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    rows = [{"step": 5, "loss": 3.0}]  # a row without router statistics is ignored
    for step in (10, 20, 30):
        row: dict = {"step": step, "loss": 2.0}
        for pair in range(3):
            shares = np.full(4, (1 - skew * step / 30) / 4)
            shares[pair] += skew * step / 30
            row.update({f"load/pair{pair}/e{e}": float(v) for e, v in enumerate(shares)})
            row[f"gate_entropy/pair{pair}"] = 1.0 + 0.1 * pair + step / 100
        rows.append(row)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_gate_heat_map_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "students" / "kd-k3-a0.2-b0.1-e4-s0"
    metrics = _write_metrics(run, skew=0.4)
    g = load_gate_metrics(metrics, "kd", last_n=2)  # steps 20 and 30
    assert g.steps == [20, 30] and g.load.shape == (3, 4)
    # Layer 1, expert 1 holds the skew: mean over steps 20/30 of (1 - 0.4 s/30)/4 + 0.4 s/30.
    expected = np.mean([(1 - 0.4 * s / 30) / 4 + 0.4 * s / 30 for s in (20, 30)])
    assert g.load[1, 1] == pytest.approx(expected)
    assert g.load[1, 0] == pytest.approx(np.mean([(1 - 0.4 * s / 30) / 4 for s in (20, 30)]))
    assert g.entropy[2] == pytest.approx(1.2 + 0.25)
    table = format_gate_table(g)
    assert f"| 1 | {g.load[1, 0]:.3f} | {expected:.3f} |" in table and "uniform share = 0.250" in table
    assert g.balance[0] < 1.0

    # A final entry wins over averaging.
    with open(metrics, "a") as fh:
        row = {f"load/pair{p}/e{e}": 0.25 for p in range(3) for e in range(4)}
        fh.write(json.dumps({"step": 31, "final": True, **row}) + "\n")
    final = load_gate_metrics(metrics)
    assert final.steps == [31] and np.allclose(final.load, 0.25) and np.allclose(final.balance, 1.0)

    # CLI on a directory of runs: one panel per run, written beside them; a logits-only run (moe-kd's
    # LoRA-MoE student logs no router statistics) is left out.
    _write_metrics(tmp_path / "students" / "b-distill-k3-a0.2-b0.1-e4-s0", skew=0.05)
    logits_only = tmp_path / "students" / "moe-kd-k3-a0.2-b0.1-e4-s0" / "metrics"
    logits_only.mkdir(parents=True)
    (logits_only / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss_skew_reverse_kl": 1.0}) + "\n")
    assert main(["report", "gates", str(tmp_path / "students")]) == 0
    out = capsys.readouterr().out
    assert "b-distill-k3-a0.2-b0.1-e4-s0: mean router probability" in out and "kd-k3" in out
    assert "moe-kd" not in out
    png = tmp_path / "students" / "gates.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and (tmp_path / "students" / "gates.md").is_file()
    loads, _, single = write_gate_report(run)
    assert single == run / "gates.png" and len(loads) == 1
    with pytest.raises(DataError, match=r"no metrics\.jsonl"):
        write_gate_report(tmp_path / "nowhere")


# --- results ------------------------------------------------------------------------------------------------
def _rows() -> list[dict]:
    rows = [
        {
            "model": "teacher",
            "method": "teacher",
            "test_set": "Dolly",
            "rouge_l_mean": 30.0,
            "rouge_l_std": 0.5,
        },
        {
            "model": "teacher",
            "method": "teacher",
            "test_set": "S-NI",
            "rouge_l_mean": 20.0,
            "rouge_l_std": 0.25,
        },
    ]
    for seed, (dolly, sni) in enumerate([(25.0, 15.0), (27.0, 17.0)]):
        for ts, score in (("Dolly", dolly), ("S-NI", sni)):
            rows.append(
                {"model": f"b-distill-k3-s{seed}", "method": "b-distill", "setting": "K=3", "k": 3,
                 "alpha": 0.2, "beta": 0.1, "student_experts": 4, "seed": seed, "test_set": ts,
                 "num_seeds": 3, "rouge_l_mean": score, "rouge_l_std": 1.0}
            )  # fmt: skip
    rows += [
        {
            "model": "kd-s0",
            "method": "kd",
            "seed": 0,
            "test_set": "Dolly",
            "rouge_l_mean": 24.0,
            "rouge_l_std": 0.3,
        },
        {
            "model": "kd-s0",
            "method": "kd",
            "seed": 0,
            "test_set": "S-NI",
            "rouge_l_mean": 18.5,
            "rouge_l_std": 0.2,
        },
    ]
    return rows


def test_results_markdown_csv_and_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md = format_results_markdown(_rows())
    lines = md.splitlines()
    assert lines[0] == "| Model | Dolly | S-NI | Avg. |"
    assert lines[2] == "| teacher | 30.00 ± 0.50 | 20.00 ± 0.25 | 25.00 |"
    # Two training seeds of one method+setting: mean ± std across runs; best non-teacher mean in bold.
    assert lines[3] == "| b-distill (K=3) | **26.00 ± 1.41 (n=2)** | 16.00 ± 1.41 (n=2) | 21.00 |"
    assert lines[4] == "| kd | 24.00 ± 0.30 | **18.50 ± 0.20** | **21.25** |"

    path = write_results_csv(_rows(), tmp_path / "sweep" / "run-a" / "results.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert tuple(header) == RESULT_COLUMNS
    back = read_results_csv(path)
    assert back[2]["k"] == 3 and back[2]["alpha"] == 0.2 and back[0]["k"] is None
    write_results_csv(_rows()[:2], tmp_path / "sweep" / "run-b" / "results.csv")
    assert len(collect_results(tmp_path / "sweep")) == len(_rows()) + 2  # a sweep dir: every run's CSV
    md_path, png_path = write_results_table(_rows(), tmp_path / "out")
    assert md_path.read_text() == md and png_path.read_bytes()[:8] == PNG_MAGIC

    assert main(["report", "results", str(path)]) == 0
    assert "b-distill (K=3)" in capsys.readouterr().out
    assert (path.parent / "results.png").is_file()
    with pytest.raises(DataError, match="missing required column"):
        format_results_markdown([{"model": "x", "test_set": "Dolly"}])


def test_results_labels_fall_back_to_model_names() -> None:
    rows = [
        {"model": "run-a", "method": "kd", "test_set": "Dolly", "rouge_l_mean": 10.0},
        {"model": "run-b", "method": "kd", "test_set": "Dolly", "rouge_l_mean": 12.0},
    ]  # same method, no setting, no seed: "kd" would merge two different models
    md = format_results_markdown(rows)
    assert "| run-a | 10.00 ± 0.00 |" in md and "| run-b | **12.00 ± 0.00** |" in md


def test_report_results_on_a_sweep_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    sweep = tmp_path / "my-sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "lam",
                "base": str(REPO / "tests/configs/tiny.yaml"),
                "set": {"output_dir": str(tmp_path / "run")},
                "grid": {"distill.lambda_mc": [0.5, 2.0]},
            }
        )
    )
    assert main(["report", "results", str(sweep)]) == 2  # not run yet: says how to produce it
    err = capsys.readouterr().err
    assert f"moedistill ablate --config {sweep}" in err and "sweeps/lam/results.csv" in err
    out_dir = tmp_path / "run" / "sweeps" / "lam"
    write_results_csv(_rows(), out_dir / "results.csv")
    assert main(["report", "results", str(sweep)]) == 0
    assert "b-distill (K=3)" in capsys.readouterr().out
    assert (out_dir / "results.md").is_file() and (out_dir / "results.png").read_bytes()[:8] == PNG_MAGIC


def test_demo_results_and_summary_hold_only_its_models(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pipeline.flows import _final_summary, write_demo_results

    config = load_config(REPO / "tests/configs/tiny.yaml", {"output_dir": str(tmp_path / "run")})
    names = [f"{m}-k3-a0.2-b0.1-e2-s0-0a1b2c" for m in ("sft", "kd", "b-distill-no-erd")]
    students = {n: SimpleNamespace(run_name=n, val_loss=2.0 + i) for i, n in enumerate(names)}
    rows = [{"model": "teacher", "method": "teacher", "test_set": "tiny-test", "rouge_l_mean": 30.0,
             "rouge_l_std": 1.0, "num_seeds": 2, "num_examples": 12}]  # fmt: skip
    for i, name in enumerate([*names, "b-distill-k3-a0.2-b0.1-e2-s0-stale1"]):  # the last: an earlier run
        rows.append({**rows[0], "model": name, "method": name.split("-k")[0], "rouge_l_mean": 10.0 + i})

    results = write_demo_results(config, rows, students.values())
    reports = tmp_path / "run" / "reports"
    assert [r["model"] for r in results.rows] == ["teacher", *names]
    assert results.png_path == reports / "results.png" and results.png_path.read_bytes()[:8] == PNG_MAGIC
    assert "stale" not in (reports / "results.md").read_text() + (reports / "results.csv").read_text()

    gates = reports / "gates" / names[0] / "gates.png"
    summary = {"stages": {"evaluate": 3.0}, "students": students, "results": results, "reports": [gates]}
    text = _final_summary(summary, total=60.0)
    assert "stale" not in text
    assert f"plots: {reports / 'results.png'}, {gates}" in text
    table = [line for line in text.splitlines() if line.startswith(("model ", "teacher", *names))]
    assert len(table) == 5
    assert len({line.index(" ± ") for line in table[1:]}) == 1  # one column layout for every name
    assert table[-1].startswith(names[-1] + " ") and "    4.000" in table[-1]


def test_cost_quality_table_and_plot_from_measured_caches(store: str, tmp_path: Path) -> None:
    """Two real stores (the second one bigger on disk), two methods x two seeds each: measured bytes per
    token beside mean ± std of the students' losses; a point is Pareto unless a cheaper cache gave the same
    method a lower or equal mean loss."""
    import shutil

    from pipeline.reports.cost_quality import cost_quality_rows, write_cost_quality

    big = str(tmp_path / "big")
    shutil.copytree(store, big)
    (Path(big) / "padding.bin").write_bytes(b"\0" * 100_000)
    small_bytes, big_bytes = measure_store(store).disk_per_token, measure_store(big).disk_per_token
    assert big_bytes > small_bytes
    rows, cache_of_run = [], {}
    losses = {("kd", "small"): [1.30, 1.32], ("kd", "big"): [1.20, 1.24],
              ("sft", "small"): [1.40, 1.40], ("sft", "big"): [1.45, 1.47]}  # fmt: skip
    for (method, setting), values in losses.items():
        for seed, loss in enumerate(values):
            run = f"{method}-{setting}-s{seed}"
            cache_of_run[run] = store if setting == "small" else big
            for ts, rouge in (("a", 10.0 + seed), ("b", 20.0 + seed)):
                rows.append({"model": run, "method": method, "setting": setting, "seed": seed,
                             "test_set": ts, "val_loss": loss, "rouge_l_mean": rouge})  # fmt: skip
    rows.append({"model": "teacher", "method": "teacher", "test_set": "a", "rouge_l_mean": 50.0})
    mc = {"model": "kd-big-s0", "method": "kd", "setting": "big", "seed": 0, "test_set": "mc"}
    rows.append({**mc, "val_loss": 1.20, "accuracy": 60.0})  # a multiple-choice row: no Rouge-L
    table = {(r.method, r.setting): r for r in cost_quality_rows(rows, cache_of_run)}
    assert table["kd", "small"].cache_bytes_per_token == pytest.approx(small_bytes)
    assert table["kd", "big"].cache_bytes_per_token == pytest.approx(big_bytes)
    assert table["kd", "small"].states_bytes_per_token == pytest.approx(
        measure_store(store).field_bytes("expert_states").disk_per_token
    )
    assert table["kd", "big"].val_loss == [1.20, 1.24] and table["kd", "big"].rouge_l == [15.0, 16.0]
    assert table["kd", "small"].pareto and table["kd", "big"].pareto  # the bigger cache buys a lower loss
    assert table["sft", "small"].pareto and not table["sft", "big"].pareto  # it costs more and loses
    md, png = write_cost_quality(rows, cache_of_run, tmp_path / "out", "t")
    assert "| kd | big |" in md.read_text() and png.stat().st_size > 0
    assert write_cost_quality(rows, {r: store for r in cache_of_run}, tmp_path / "one", "t") is None


def _tiny_models(tmp_path: Path):
    """The tiny config's teacher and a student whose final norm is zeroed (every logit 0: uniform q)."""
    import torch

    from pipeline.data.stage import load_tokenizer, prepare_data
    from pipeline.models.stage import materialize_model

    config = load_config(REPO / "tests/configs/tiny.yaml", {"output_dir": str(tmp_path / "run")})
    tokenizer = load_tokenizer(prepare_data(config).tokenizer_path)
    teacher = materialize_model(config.teacher, tokenizer).eval()
    uniform = materialize_model(config.student, tokenizer).eval()
    with torch.no_grad():
        uniform.model.norm.weight.zero_()
    return config, tokenizer, teacher, uniform


def test_sample_divergence_by_hand(tmp_path: Path) -> None:
    import math

    import torch

    from pipeline.data.collate import pad_batch
    from pipeline.data.stage import prepare_data
    from pipeline.data.tokenize import tokenize_prompt, tokenize_records
    from pipeline.models.generate import generate_token_ids, validation_loss
    from pipeline.reports.sample_divergence import measure_model

    config, tok, teacher, uniform = _tiny_models(tmp_path)
    records = prepare_data(config).splits.validation[:6]
    refs, _ = tokenize_records(tok, records, config.data.max_length)
    prompts = [tokenize_prompt(tok, records[ex["seq_id"]]) for ex in refs]
    kw = {"pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id, "max_new_tokens": 8}
    itself = measure_model(teacher, teacher, refs, prompts, **kw)
    assert itself.sample_rkl == pytest.approx(0.0, abs=1e-6)
    assert itself.sample_fkl == pytest.approx(0.0, abs=1e-6)
    assert itself.ref_ce == pytest.approx(validation_loss(teacher, refs, tok.pad_token_id), rel=1e-5)
    got = measure_model(uniform, teacher, refs, prompts, **kw)
    log_v = math.log(len(tok))
    for value in (got.ref_ce, got.ref_entropy, got.sample_entropy):
        assert value == pytest.approx(log_v, rel=1e-5)
    # KL(u || p) = sum_v (1/V)(-log V - log p_v), at every position predicting a sampled token
    samples = generate_token_ids(uniform, prompts, greedy=False, seed=0, **kw)
    kl, n = 0.0, 0
    for p, r in zip(prompts, samples, strict=True):
        example = {"input_ids": [*p, *r], "response_mask": [0] * len(p) + [1] * len(r)}
        batch = pad_batch([example], tok.pad_token_id)
        with torch.no_grad():
            log_p = teacher(input_ids=batch["input_ids"]).logits[0, len(p) - 1 : -1].log_softmax(-1)
        kl += float((-log_v - log_p).mean(-1).sum())
        n += len(r)
    assert got.sample_rkl == pytest.approx(kl / n, rel=1e-4)
    assert got.sample_len == pytest.approx(n / len(prompts))


def test_sample_divergence_report_on_a_sweep_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import csv

    import yaml

    _, _, teacher, uniform = _tiny_models(tmp_path)
    teacher.save_pretrained(tmp_path / "teacher")
    uniform.save_pretrained(tmp_path / "uniform")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "sd", "base": str(REPO / "tests/configs/tiny.yaml"),
                                     "set": {"output_dir": str(tmp_path / "run")},
                                     "grid": {"distill.method": ["kd"]}}))  # fmt: skip
    assert main(["report", "sample-divergence", str(sweep)]) == 2  # no results yet: names the fix
    assert "moedistill ablate --config" in capsys.readouterr().err
    out_dir = tmp_path / "run" / "sweeps" / "sd"
    rows = [
        {
            "model": "teacher",
            "method": "teacher",
            "test_set": "t",
            "rouge_l_mean": 1.0,
            "checkpoint": str(tmp_path / "teacher"),
        }
    ]
    rows += [{"model": f"kd-s{s}", "method": "kd", "seed": s, "test_set": "t", "rouge_l_mean": 1.0,
              "checkpoint": str(tmp_path / ("uniform" if s else "teacher"))} for s in (0, 1)]  # fmt: skip
    write_results_csv(rows, out_dir / "results.csv")
    assert main(["report", "sample-divergence", str(sweep), "--limit", "4"]) == 0
    with open(out_dir / "sample_divergence.csv") as fh:
        got = {r["model"]: r for r in csv.DictReader(fh)}
    assert set(got) == {"teacher", "kd-s0", "kd-s1"}
    assert float(got["teacher"]["sample_rkl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(got["kd-s1"]["sample_rkl"]) > 1e-3  # the untrained teacher is itself nearly uniform
    assert "sample KL(q||p)" in (out_dir / "sample_divergence.md").read_text()
    assert (out_dir / "sample_divergence.png").read_bytes()[:8] == PNG_MAGIC
