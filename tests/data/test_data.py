"""pipeline.data: loading, template, tokenisation masks, splits, collation, demo dataset and tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from support.paths import REPO
from support.tiny import demo_tokenizer
from transformers import AutoTokenizer

from pipeline.data.collate import distill_positions, pad_batch
from pipeline.data.demo_dataset import generate_demo_records
from pipeline.data.demo_tokenizer import record_texts, train_demo_tokenizer
from pipeline.data.records import Record, load_records, records_fingerprint, write_jsonl
from pipeline.data.template import format_prompt
from pipeline.data.tokenize import split_records, tokenize_prompt, tokenize_record, tokenize_records
from pipeline.errors import ConfigError, DataError

GOOD = {"instruction": "Name a warm color.", "context": "", "response": "red", "category": "brainstorming"}


def _stdout_under_hash_seeds(code: str, seeds: tuple[str, ...]) -> set[str]:
    """The distinct outputs of `python -c code` in fresh interpreters, one per PYTHONHASHSEED."""
    return {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in seeds
    }


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def demo_records() -> list[Record]:
    return generate_demo_records(600, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory, demo_records: list[Record]):
    out = tmp_path_factory.mktemp("tok")
    demo_tokenizer(demo_records, out, vocab_size=1024)
    return AutoTokenizer.from_pretrained(str(out))  # what every other stage will do


# --- loading -----------------------------------------------------------------------------------------------
def _mixed_file(tmp_path: Path) -> Path:
    return _write_lines(
        tmp_path / "dolly.jsonl",
        [
            json.dumps(GOOD),
            json.dumps({"instruction": "Say hi.", "response": "hi"}),  # context/category optional
            "{not json",  # line 3
            json.dumps({"instruction": "", "response": "x"}),  # line 4: empty instruction
            json.dumps({"instruction": "q"}),  # line 5: missing response
            json.dumps({"instruction": "q", "response": 3}),  # line 6: non-string
            "",  # blank line: not a record, not counted
            json.dumps(["a list"]),  # line 8: not an object
            json.dumps({**GOOD, "response": "orange"}),
        ],
    )


def test_load_jsonl_lenient_skips_and_counts(tmp_path: Path) -> None:
    records, stats = load_records(str(_mixed_file(tmp_path)))
    assert records == [
        Record("Name a warm color.", "", "red", "brainstorming"),
        Record("Say hi.", "", "hi", ""),
        Record("Name a warm color.", "", "orange", "brainstorming"),
    ]
    assert (stats.num_loaded, stats.num_skipped) == (3, 5)
    assert stats.skipped_reasons == {
        "empty_instruction": 1,
        "invalid_json": 1,
        "missing_response": 1,
        "non_string_field": 1,
        "not_an_object": 1,
    }


def test_load_jsonl_strict_names_file_and_line(tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
    with pytest.raises(DataError, match=r"dolly\.jsonl:3: .*invalid_json.*Fix"):
        load_records(path, strict=True)
    # first malformed line after removing line 3 is the empty instruction, still reported at its own line
    lines = path.read_text().splitlines()
    lines[2] = json.dumps(GOOD)
    _write_lines(path, lines)
    with pytest.raises(DataError, match=r"dolly\.jsonl:4: .*empty_instruction"):
        load_records(path, strict=True)


def test_load_missing_file_and_nothing_valid(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "nope.parquet"))
    with pytest.raises(DataError, match="no valid records"):
        load_records(_write_lines(tmp_path / "bad.jsonl", ["{", "[]"]))


def test_load_json_array_and_write_roundtrip(tmp_path: Path) -> None:
    records = [Record("a {context} b", "ctx", "résumé", "open_qa"), Record("i", "", "r", "")]
    (tmp_path / "arr.json").write_text(json.dumps([r.to_dict() for r in records]))
    assert load_records(tmp_path / "arr.json")[0] == records
    write_jsonl(records, tmp_path / "sub" / "out.jsonl")
    loaded, stats = load_records(tmp_path / "sub" / "out.jsonl", strict=True)
    assert loaded == records and stats.num_skipped == 0
    assert records_fingerprint(loaded) == records_fingerprint(records)
    assert records_fingerprint(loaded[::-1]) != records_fingerprint(records)


def test_load_via_datasets(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    path = _write_lines(
        tmp_path / "data" / "d.jsonl",
        [json.dumps(GOOD), json.dumps({"instruction": "Say hi.", "response": "hi"}), json.dumps(GOOD)],
    )
    cache = str(tmp_path / "hf_cache")
    expected = [Record(**GOOD), Record("Say hi.", "", "hi", ""), Record(**GOOD)]
    # builder name + data_files, forwarded to datasets.load_dataset
    records, stats = load_records("json", data_files=str(path), cache_dir=cache)
    assert records == expected and stats.num_loaded == 3
    # a local directory (datasets picks the json builder itself)
    records, _ = load_records(str(tmp_path / "data"), cache_dir=cache)
    assert records == expected
    # a parquet file goes to the parquet builder
    import datasets

    datasets.Dataset.from_list([r.to_dict() for r in expected]).to_parquet(str(tmp_path / "d.parquet"))
    records, _ = load_records(str(tmp_path / "d.parquet"), cache_dir=cache)
    assert records == expected


def test_load_via_datasets_errors(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "x.jsonl", [json.dumps({"question": "q", "answer": "a"})])
    with pytest.raises(DataError, match=r"no column\(s\) \['instruction', 'response'\].*rename"):
        load_records("json", data_files=str(path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="split"):
        load_records("json", data_files=str(path), split="nope", cache_dir=str(tmp_path / "c"))


# --- template ----------------------------------------------------------------------------------------------
def test_template_with_and_without_context() -> None:
    with_ctx = format_prompt(Record("Summarize {x}.", "Some text.", "r", "summarization"))
    assert with_ctx.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_ctx.endswith("### Instruction:\nSummarize {x}.\n\n### Input:\nSome text.\n\n### Response:\n")
    no_ctx = format_prompt(Record("Name a color.", "  ", "red", "brainstorming"))
    assert "### Input:" not in no_ctx and "paired with an input" not in no_ctx
    assert no_ctx.endswith("### Instruction:\nName a color.\n\n### Response:\n")


# --- tokenisation ------------------------------------------------------------------------------------------
def test_tokenize_mask_is_exact(tokenizer, demo_records: list[Record]) -> None:
    for record in demo_records[:50]:
        ex = tokenize_record(tokenizer, record, max_length=256)
        assert ex is not None
        ids, mask = ex["input_ids"], ex["response_mask"]
        assert (
            len(ids) == len(mask) and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        )
        first = mask.index(1)
        assert set(mask[:first]) == {0} and set(mask[first:]) == {1}  # one contiguous response span
        response_ids = [t for t, m in zip(ids, mask) if m]
        assert tokenizer.decode(response_ids) == record.response + tokenizer.eos_token
        assert tokenizer.decode(ids[:first], skip_special_tokens=True) == format_prompt(record)
        assert ids[:first] == tokenize_prompt(tokenizer, record)  # the generation prompt is the exact prefix


def test_tokenize_records_filters_too_long_and_keeps_seq_ids(tokenizer) -> None:
    short = Record("Name a color.", "", "red", "brainstorming")
    long = Record("Name a color.", "", " ".join(["red"] * 300), "brainstorming")
    prompt_len = len(tokenize_prompt(tokenizer, short))
    assert tokenize_record(tokenizer, long, max_length=128) is None
    examples, stats = tokenize_records(tokenizer, [short, long, short], max_length=128)
    assert (stats.num_kept, stats.num_too_long) == (2, 1)
    assert [e["seq_id"] for e in examples] == [0, 2]
    # the boundary: exactly max_length fits, one less does not (nothing is truncated)
    exact = len(examples[0]["input_ids"])
    assert exact == prompt_len + len(tokenizer("red", add_special_tokens=False)["input_ids"]) + 1
    assert tokenize_record(tokenizer, short, max_length=exact) == tokenize_record(tokenizer, short, 512)
    assert tokenize_record(tokenizer, short, max_length=exact - 1) is None
    # batched and single tokenisation agree
    assert {k: v for k, v in examples[1].items() if k != "seq_id"} == tokenize_record(tokenizer, short, 128)


def test_tokenizer_without_bos(tokenizer) -> None:
    # Qwen-style tokenizers add no bos: sequences then start with the prompt's first token
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.backend_tokenizer.post_processor = None
    ex = tokenize_record(tokenizer, Record("Say hi.", "", "hi", ""), max_length=128)
    assert ex is not None and ex["input_ids"][0] != tokenizer.bos_token_id


def test_split_deterministic_and_disjoint(demo_records: list[Record]) -> None:
    items = list(range(1000))
    a = split_records(items, 0.1, 0.05, seed=3)
    assert split_records(items, 0.1, 0.05, seed=3) == a
    assert (len(a.train), len(a.validation), len(a.test)) == (850, 100, 50)
    assert sorted(a.train + a.validation + a.test) == items
    assert a.train == sorted(a.train)  # order within a split is preserved
    assert split_records(items, 0.1, 0.05, seed=4) != a
    # independent of the Python hash seed (run in fresh interpreters)
    code = (
        "from pipeline.data.tokenize import split_records; from pipeline.data.demo_dataset import "
        "generate_demo_records as g; r = g(200, 1); s = split_records(r, 0.1, 0.1, 5); "
        "print([r.index(x) for x in s.test])"
    )
    assert len(_stdout_under_hash_seeds(code, ("1", "2"))) == 1
    with pytest.raises(ConfigError):
        split_records(items, 0.6, 0.5, seed=0)


# --- collation ---------------------------------------------------------------------------------------------
def test_pad_batch_labels_and_padding() -> None:
    examples = [
        {"seq_id": 7, "input_ids": [1, 5, 6, 9, 2], "response_mask": [0, 0, 0, 1, 1]},
        {"seq_id": 9, "input_ids": np.array([1, 8, 2]), "response_mask": np.array([0, 1, 1], dtype=np.int8)},
    ]
    batch = pad_batch(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 9, 2], [1, 8, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 9, 2], [-100, 8, 2, -100, -100]]
    assert batch["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]]
    assert batch["seq_id"].tolist() == [7, 9]
    assert all(t.dtype == torch.long for t in batch.values())
    # a columnar batch of numpy object arrays (what Ray Data hands a collate_fn) gives the same tensors
    columnar = {
        k: np.array([np.asarray(e[k]) for e in examples], dtype=object)
        for k in ("input_ids", "response_mask")
    }
    columnar["seq_id"] = np.array([7, 9])
    for k, v in pad_batch(columnar, pad_id=0).items():
        assert torch.equal(v, batch[k]), k
    # equal-length rows arrive from Ray Data as one 2-D array per column
    dense = pad_batch({"input_ids": np.array([[1, 8, 2], [1, 9, 2]]), "response_mask": np.ones((2, 3))}, 0)
    assert dense["labels"].tolist() == [[1, 8, 2], [1, 9, 2]] and "seq_id" not in dense
    with pytest.raises(DataError, match="response_mask"):
        pad_batch([{"input_ids": [1, 2], "response_mask": [0]}], pad_id=0)


def test_distill_positions_shift() -> None:
    mask = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]])
    pos = distill_positions(mask)
    assert pos.dtype == torch.bool
    assert pos.tolist() == [[False, False, True, True, False], [True, True, False, False, False]]
    # one distillation position per response token
    assert int(pos.sum()) == int(mask.sum())


def test_distill_positions_match_labels(tokenizer, demo_records: list[Record]) -> None:
    examples, _ = tokenize_records(tokenizer, demo_records[:8], max_length=128)
    batch = pad_batch(examples, pad_id=tokenizer.pad_token_id)
    pos = distill_positions(batch["response_mask"])
    # the token predicted at each distillation position is exactly the shifted label
    assert torch.equal(batch["input_ids"][:, 1:][pos[:, :-1]], batch["labels"][:, 1:][pos[:, :-1]])
    assert torch.equal(batch["labels"][:, 1:] != -100, pos[:, :-1])


# --- demo dataset and tokenizer ----------------------------------------------------------------------------
def test_demo_dataset_deterministic_and_varied(demo_records: list[Record]) -> None:
    assert generate_demo_records(600, seed=0) == demo_records
    assert generate_demo_records(600, seed=1) != demo_records
    assert generate_demo_records(0, seed=0) == []
    assert len({r.category for r in demo_records}) >= 6
    assert all(r.instruction.strip() and r.response.strip() for r in demo_records)
    assert sum(bool(r.context) for r in demo_records) > 0.1 * len(demo_records)
    # tasks with several valid answers: the same prompt appears with different responses
    by_prompt: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
    for r in generate_demo_records(3000, seed=0):
        by_prompt[(r.instruction, r.context)].add(r.response)
    multi = [p for p, responses in by_prompt.items() if len(responses) >= 3]
    assert len(multi) >= 10
    assert len(by_prompt[("Name a warm color.", "")]) >= 4
    # a small closed vocabulary
    words = {
        w.strip(".,?:!")
        for r in demo_records
        for t in (r.instruction, r.context, r.response)
        for w in t.split()
    }
    assert len(words) < 1000


def test_demo_dataset_independent_of_hash_seed() -> None:
    code = (
        "from pipeline.data.demo_dataset import generate_demo_records as g; "
        "from pipeline.data.records import records_fingerprint as f; print(f(g(500, 3)))"
    )
    assert len(_stdout_under_hash_seeds(code, ("0", "123"))) == 1


def test_demo_tokenizer_roundtrip_and_lengths(tmp_path: Path, tokenizer, demo_records: list[Record]) -> None:
    special = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    assert special == [0, 1, 2, 3]
    assert len(tokenizer) == 1024
    text = format_prompt(demo_records[0]) + demo_records[0].response
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"] == [tokenizer.bos_token_id, *ids]
    # deterministic: same texts, same tokenizer.json
    again = train_demo_tokenizer(record_texts(demo_records), tmp_path / "again", vocab_size=1024)
    first = Path(tokenizer.name_or_path) / "tokenizer.json"
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == first.read_bytes()
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    # nearly everything fits max_length 128, responses are short
    examples, stats = tokenize_records(tokenizer, demo_records, max_length=128)
    assert stats.num_too_long <= 0.01 * len(demo_records)
    response_lengths = [sum(e["response_mask"]) for e in examples]
    assert sum(n < 20 for n in response_lengths) >= 0.9 * len(examples)
    with pytest.raises(ConfigError):
        train_demo_tokenizer(["abc"], tmp_path / "tiny", vocab_size=100)
