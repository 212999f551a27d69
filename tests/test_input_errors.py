"""Bad input found early with a clear error (issue 14, case 9): per-line non-UTF-8 records, a demo tokenizer
trained for another vocabulary size, and a storage projection that writes nothing under a cluster path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.records import load_records
from pipeline.data.stage import prepare_data
from pipeline.errors import DataError

REPO = Path(__file__).resolve().parents[1]
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
