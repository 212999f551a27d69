"""Bad input found early with a clear error (issue 14, case 9): per-line non-UTF-8 records, a demo tokenizer
trained for another vocabulary size, a storage projection that writes nothing under a cluster path, and hub
ids on an offline machine (an error in seconds, or the local Hugging Face cache without retries)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from support.paths import REPO

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.records import load_records
from pipeline.data.stage import prepare_data
from pipeline.errors import DataError, ModelError
from pipeline.models.dims import model_dims, read_dims

TINY = REPO / "tests" / "configs" / "tiny.yaml"
GOOD = {"instruction": "Say hi", "context": "", "response": "hi", "category": "open_qa"}


def test_one_non_utf8_byte_costs_one_record_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps(GOOD).encode(),
        b'{"instruction": "caf\xe9", "response": "x"}',
        json.dumps(GOOD).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    records, stats = load_records(path, strict=False)
    assert len(records) == 2 and stats.num_skipped == 1 and stats.skipped_reasons == {"not_utf8": 1}
    with pytest.raises(DataError, match=rf"{path.name}:2: malformed record: not_utf8"):
        load_records(path, strict=True)


def test_a_demo_tokenizer_of_another_vocabulary_size_is_refused(tmp_path: Path) -> None:
    config = load_config(TINY, {"output_dir": str(tmp_path / "run")})
    prepare_data(config)  # trains the demo tokenizer for tokenizer.vocab_size=384
    assert prepare_data(config).tokenizer_path  # the same size again: reused
    other = load_config(TINY, {"output_dir": str(tmp_path / "run"), "tokenizer.vocab_size": 512})
    with pytest.raises(
        DataError, match=r"trained for tokenizer.vocab_size=384, this config asks for 512.*Fix"
    ):
        prepare_data(other)


def test_a_storage_projection_writes_nothing_under_the_presets_cluster_paths(tmp_path: Path) -> None:
    preset = REPO / "jobs" / "configs" / "qwen3-4b-moe-to-0.6b-moe.yaml"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["report", "storage", "--config", str(preset), "--tokens", "1e9"]) == 0
    finally:
        os.chdir(cwd)
    out = tmp_path / "reports" / "storage-projection" / "qwen3-4b-moe-to-0.6b-moe"
    assert (out / "storage-projection.md").is_file() and (out / "storage-projection.png").is_file()
    assert not Path(load_config(preset).output_dir).exists()  # /mnt/shared/runs/... was never created


# --- hub ids on an offline machine: a clear error in seconds, not minutes of retries ----------
NO_HUB = "http://127.0.0.1:1"  # nothing listens on port 1: the hub probe is refused at once


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A hub endpoint that does not answer and an empty local Hugging Face cache (returned)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", NO_HUB)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def test_an_uncached_hub_teacher_fails_in_seconds_before_ray(
    offline_hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sets = ["teacher.build=null", "teacher.path=Qwen/Qwen3-4B", f"output_dir={tmp_path / 'run'}"]
    sets.append(f"cache.root={tmp_path / 'caches'}")
    argv = ["cache", "--config", str(TINY), *(a for s in sets for a in ("--set", s))]
    started = time.perf_counter()
    assert main(argv) == 2
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert "teacher.path 'Qwen/Qwen3-4B' is not a local directory" in err, err
    assert f"the hub ({NO_HUB}) does not answer" in err and "hf download Qwen/Qwen3-4B" in err, err
    assert "set HF_HUB_OFFLINE=1" in err and "Retrying" not in err, err
    assert elapsed < 10, elapsed
    assert not (tmp_path / "caches").exists()  # nothing ran


def test_a_cached_hub_id_loads_from_the_cache_and_hf_hub_offline_names_the_cache(
    offline_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    snapshot = offline_hub / "models--acme--tiny-dense" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (offline_hub / "models--acme--tiny-dense" / "refs").mkdir()
    (offline_hub / "models--acme--tiny-dense" / "refs" / "main").write_text("0" * 40)
    dense = {"model_type": "qwen3", "num_hidden_layers": 2, "hidden_size": 32, "vocab_size": 128}
    (snapshot / "config.json").write_text(json.dumps(dense))
    student = load_config(TINY, {"student.build": None, "student.upcycle_from": "acme/tiny-dense"}).student
    dims = model_dims(student)
    assert (dims.model_type, dims.num_layers, dims.num_experts) == ("qwen3", 2, student.num_experts)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"student 'acme/other' .*HF_HUB_OFFLINE is set and it is not in"):
        read_dims("acme/other", role="student")
