"""pipeline.data.demo_eval_sets and the generator's answer keys: the training records stay byte-identical,
and the held-out sets share no instruction template, composition or entity with training."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from pipeline.data.demo_dataset import LIST_OPS, NAMES, TRAINING_LIST_CHAIN, generate_demo_examples
from pipeline.data.demo_eval_sets import (
    HELDOUT_NAMES,
    HELDOUT_SETS,
    PARAPHRASES,
    demo_answer_keys,
    generate_heldout,
    template_id,
)
from pipeline.data.records import Record, write_jsonl
from pipeline.data.split import split_records
from pipeline.errors import ConfigError

# sha256 of demo.yaml's data file (3000 records, seed 0) as written before answer keys existed: the keys are
# a sidecar, so this file, the cache key built on it and every run name stay what they were.
DEMO_JSONL_SHA256 = "1053739637dead748a332da193fe76b244b324ee254eb76eed1068d338b644ac"
N = 400


@pytest.fixture(scope="module")
def training() -> list[Record]:
    """A large sample of what the training generator emits (several seeds)."""
    return [e.record for seed in range(4) for e in generate_demo_examples(5000, seed)]


@pytest.fixture(scope="module")
def heldout() -> dict[str, list]:
    return {name: generate_heldout(name, N, seed=0) for name in HELDOUT_SETS}


def test_answer_keys_leave_the_demo_records_byte_identical(tmp_path: Path) -> None:
    examples = generate_demo_examples(3000, seed=0)
    write_jsonl([e.record for e in examples], tmp_path / "demo.jsonl")
    assert hashlib.sha256((tmp_path / "demo.jsonl").read_bytes()).hexdigest() == DEMO_JSONL_SHA256


def test_a_split_gets_its_keys_by_content() -> None:
    examples = generate_demo_examples(300, seed=3)
    test = split_records(examples, 0.1, 0.1, seed=3).test
    keys = demo_answer_keys([e.record for e in test], 300, seed=3)
    assert keys == [e.key for e in test] and any(k is not None for k in keys)
    user = Record("What color is a lemon?", "", "yellow", "")  # not a record this generator drew
    assert demo_answer_keys([user], 300, seed=3) == [None]


def test_heldout_sets_are_deterministic_sized_and_keyed(heldout: dict[str, list]) -> None:
    for name, examples in heldout.items():
        assert len(examples) == N
        assert [e.record for e in generate_heldout(name, N, seed=0)] == [e.record for e in examples]
        assert [e.record for e in generate_heldout(name, N, seed=1)] != [e.record for e in examples]
        keyed = [e for e in examples if e.key is not None]
        assert len(keyed) > 0.7 * N and all(e.key.task == e.task for e in keyed)
    with pytest.raises(ConfigError, match="Fix: use one of"):
        generate_heldout("dolly", 3, seed=0)


def _pattern(template: str) -> re.Pattern[str]:
    """A template as a regex: its slots match anything."""
    parts = re.split(r"\{[a-zA-Z0-9_]+\}", template)
    return re.compile(".+".join(re.escape(p) for p in parts) + r"\Z", re.S)


def test_paraphrases_share_no_instruction_template_with_training(
    training: list[Record], heldout: dict[str, list]
) -> None:
    instructions = {r.instruction for r in training}
    for key, templates in PARAPHRASES.items():
        for template in templates:
            pattern = _pattern(template)
            clash = next((i for i in instructions if pattern.match(i)), None)
            assert clash is None, f"held-out template {template!r} ({key}) renders training's {clash!r}"
    assert not {e.record.instruction for e in heldout["paraphrase"]} & instructions
    # every keyed training instruction family has a paraphrase, and the set draws from most of them
    keyed_ids = {template_id(e) for e in generate_demo_examples(3000, seed=0) if e.key is not None}
    assert keyed_ids <= set(PARAPHRASES)
    assert len({template_id(e) for e in heldout["paraphrase"]}) > 0.8 * len(keyed_ids)


def _arith_steps(instruction: str) -> int:
    return len(re.findall(r"\b(?:[Aa]dd|[Ss]ubtract|[Mm]ultiply)\b|[-+*] \d", instruction))


def _list_steps(instruction: str) -> int:
    return sum(instruction.count(description) for description, _ in LIST_OPS)


def test_compositions_are_longer_than_any_training_chain(
    training: list[Record], heldout: dict[str, list]
) -> None:
    train_arith = max(_arith_steps(r.instruction) for r in training)
    train_lists = max(_list_steps(r.instruction) for r in training)
    assert (train_arith, train_lists) == (2, TRAINING_LIST_CHAIN)
    tasks = {e.task for e in heldout["composition"]}
    assert tasks == {"arith_long", "list_chain", "legs_two_kinds", "food_backwards"}
    for e in heldout["composition"]:
        instruction = e.record.instruction
        if e.task == "arith_long":
            assert _arith_steps(instruction) == 3 > train_arith
        if e.task == "list_chain":
            assert _list_steps(instruction) == 3 > train_lists
    instructions = {r.instruction for r in training}
    assert not {e.record.instruction for e in heldout["composition"]} & instructions
    # the two-kind legs count and the backwards spelling of a context fact are no training instruction's shape
    for template in (
        "How many legs do {n} {p} and {m} {q} have in total?",
        "What does {n} eat? Answer in capital letters, spelled backwards one letter at a time.",
    ):
        assert not any(_pattern(template).match(i) for i in instructions)


def test_entities_are_names_no_training_record_mentions(
    training: list[Record], heldout: dict[str, list]
) -> None:
    assert not set(HELDOUT_NAMES) & set(NAMES)
    text = " ".join(f"{r.instruction} {r.context} {r.response}" for r in training)
    assert not [n for n in HELDOUT_NAMES if re.search(rf"\b{n}\b", text)]
    for e in heldout["entities"]:
        named = [n for n in HELDOUT_NAMES if n in e.record.context]
        assert named, e.record.context
        assert not any(n in e.record.context for n in NAMES)
