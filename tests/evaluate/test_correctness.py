"""pipeline.evaluate.correctness: hand-made responses against answer keys, the per-set columns and the answer
spread of several-answer tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from support.paths import TINY

from pipeline.config import load_config
from pipeline.data import answers
from pipeline.data.demo_dataset import COLORS, FRUITS, generate_demo_examples
from pipeline.data.demo_eval_sets import HELDOUT_SETS, generate_heldout
from pipeline.errors import ConfigError, DataError
from pipeline.evaluate.correctness import correctness_columns, read_answer, score_response
from pipeline.evaluate.results import build_table, format_results_markdown, task_column
from pipeline.evaluate.test_sets import read_examples_jsonl

LEMON = answers.choice("fact", "yellow", COLORS)
ARITH = answers.number("arithmetic", 5)
WORDS = answers.sequence("list", ["owl", "cat"])
WARM = answers.several(("red", "orange", "yellow", "pink"), COLORS)
FLYERS = answers.several(("bat", "owl", "duck", "eagle"), ("bat", "owl", "duck", "eagle", "shark"), count=2)
BETWEEN = answers.several([str(n) for n in range(11, 20)])  # no options: integers


@pytest.mark.parametrize(
    ("key", "response", "correct"),
    [
        (LEMON, "A lemon is yellow.", True),
        (LEMON, "yellow", True),
        (LEMON, "YELLOW!", True),  # options are read case-insensitively
        (LEMON, "A lemon is red.", False),
        (LEMON, "Yellow, no: red.", False),  # the last option named is the answer
        (LEMON, "A lemon is sour.", False),  # names no colour
        (LEMON, "", False),
        (ARITH, "3 + 4 = 7, 7 - 2 = 5. The answer is 5.", True),
        (ARITH, "3 + 4 = 7, 7 - 2 = 6. The answer is 6.", False),
        (ARITH, "five", False),
        (WORDS, "owl, cat", True),
        (WORDS, "owl, cat.", True),
        (WORDS, "cat, owl", False),
        (WORDS, "OWL, CAT", False),  # a sequence is exact: case is part of the transformation
        (WORDS, "owl, cat, dog", False),
        (answers.sequence("list", list("lemon")), "l e m o n", True),
        (WARM, "Red is a warm color.", True),
        (WARM, "One warm color is pink.", True),
        (WARM, "Blue.", False),
        (FLYERS, "Two animals that can fly are the owl and the bat.", True),
        (FLYERS, "owl and owl", False),  # two distinct answers are asked for
        (FLYERS, "owl and shark", False),
        (BETWEEN, "12 is between 10 and 20.", True),  # the first integer is the answer
        (BETWEEN, "25", False),
        (BETWEEN, "", False),
    ],
)
def test_hand_made_responses(key: answers.AnswerKey, response: str, correct: bool) -> None:
    assert score_response(response, key).correct is correct


def test_every_generated_reference_is_correct_under_its_own_key() -> None:
    """The generator's own responses (training records and every held-out set) pass their keys: a key that
    disagreed with its record would score a perfect model as wrong."""
    examples = generate_demo_examples(3000, seed=0)
    examples += [e for name in HELDOUT_SETS for e in generate_heldout(name, 300, seed=0)]
    keyed = [e for e in examples if e.key is not None]
    assert len(keyed) > 0.8 * len(examples)
    assert {e.key.family for e in keyed} == set(answers.FAMILIES)
    wrong = [
        (e.task, e.record.response) for e in keyed if not score_response(e.record.response, e.key).correct
    ]
    assert wrong == []
    # open-ended writing has no key: Rouge-L alone scores it
    assert {e.task for e in examples if e.key is None} == {
        "animal_sentence",
        "adjective_sentence",
        "poem",
        "summarize",
    }


def test_accuracy_columns_per_seed_and_family() -> None:
    seed0 = [score_response("yellow", LEMON), score_response("The answer is 5.", ARITH)]
    seed1 = [score_response("red", LEMON), score_response("The answer is 5.", ARITH)]
    columns = correctness_columns({0: seed0, 1: seed1})
    assert columns["task_accuracy"] == pytest.approx(75.0)  # 100 and 50
    assert columns["task_accuracy_std"] == pytest.approx(50 / math.sqrt(2))
    assert columns["task_accuracy.fact"] == pytest.approx(50.0)
    assert columns["task_accuracy.arithmetic"] == pytest.approx(100.0)
    assert "task_accuracy.list" not in columns and "answer_coverage" not in columns
    assert correctness_columns({}) == {} and correctness_columns({0: []}) == {}  # no keys: absent, not 0


def test_answer_spread_of_a_collapsed_and_of_a_spread_model() -> None:
    asks = 8
    collapsed = {0: [score_response("Red.", WARM) for _ in range(asks)]}
    columns = correctness_columns(collapsed)
    assert columns["task_accuracy"] == 100.0  # every answer is valid ...
    assert columns["answer_coverage"] == pytest.approx(25.0)  # ... but one of four is ever given
    assert columns["answer_kl"] == pytest.approx(math.log(4))
    spread = {0: [score_response(c, WARM) for c in ("red", "orange", "yellow", "pink") * 2]}
    columns = correctness_columns(spread)
    assert columns["answer_coverage"] == 100.0 and columns["answer_kl"] == pytest.approx(0.0)
    # the generator's own values at 8 asks: reproducible, and between the two models
    assert correctness_columns(spread) == columns
    assert 25.0 < columns["answer_coverage_generator"] <= 100.0
    assert 0.0 < columns["answer_kl_generator"] < math.log(4)
    # half red, a quarter each orange and yellow: KL = 0.5 ln 2 to the uniform over four
    mixed = {0: [score_response(c, WARM) for c in ("red", "red", "orange", "yellow", "blue")]}
    columns = correctness_columns(mixed)
    assert columns["answer_kl"] == pytest.approx(0.5 * math.log(2))
    assert columns["answer_coverage"] == pytest.approx(75.0) and columns["task_accuracy"] == 80.0


def test_questions_are_pooled_per_key() -> None:
    """Two questions (warm, cool) are two spreads: a model answering each with one colour covers a quarter of
    each valid set, not two eighths of one."""
    cool = answers.several(("blue", "green", "purple", "gray"), COLORS)
    scored = [score_response("red", WARM)] * 3 + [score_response("blue", cool)] * 3
    assert correctness_columns({0: scored})["answer_coverage"] == pytest.approx(25.0)
    assert read_answer("An apple can be red.", answers.several(("apple",), tuple(FRUITS))) == ("apple",)


def test_results_table_groups_rouge_and_task_accuracy_per_test_set() -> None:
    """A keyed test set is a column group (Rouge-L, task acc.); a set without keys keeps Rouge-L alone."""
    base = {"num_seeds": 2, "rouge_l_std": 1.0}
    rows = [
        {**base, "model": "teacher", "test_set": "demo-test", "rouge_l_mean": 30.0, "task_accuracy": 60.0,
         "task_accuracy_std": 2.0},
        {**base, "model": "teacher", "test_set": "user", "rouge_l_mean": 20.0},
        {**base, "model": "kd", "test_set": "demo-test", "rouge_l_mean": 25.0, "task_accuracy": 40.0,
         "task_accuracy_std": 1.0},
        {**base, "model": "kd", "test_set": "user", "rouge_l_mean": 15.0},
    ]  # fmt: skip
    table = build_table(rows)
    assert table.test_sets == ["demo-test", task_column("demo-test"), "user", "Avg."]
    assert table.cells["kd", task_column("demo-test")].mean == 40.0
    assert table.cells["kd", "Avg."].mean == 20.0  # the mean of Rouge-L only
    md = format_results_markdown(rows)
    assert "| Model | demo-test | demo-test (task acc.) | user | Avg. |" in md
    assert "| kd | 25.00 ± 1.00 | 40.00 ± 1.00 | 15.00 ± 1.00 | 20.00 |" in md


def test_a_jsonl_test_set_may_carry_answer_keys(tmp_path: Path) -> None:
    rows = [
        {"instruction": "What color is a lemon?", "response": "yellow", "answer_key": LEMON.to_dict()},
        {"instruction": "Say hi.", "response": "hi"},  # no key: Rouge-L only
    ]
    path = tmp_path / "keyed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [e.answer for e in read_examples_jsonl(path)] == [LEMON, None]
    path.write_text(
        json.dumps({**rows[0], "answer_key": {"family": "fact", "kind": "vibes", "answer": ["x"]}})
    )
    with pytest.raises(DataError, match=r"keyed\.jsonl:1: malformed answer_key .*Fix"):
        read_examples_jsonl(path)


def test_demo_test_sets_and_their_size_setting(tmp_path: Path) -> None:
    from pipeline.data.stage import prepare_data
    from pipeline.evaluate.test_sets import load_test_sets

    def config(heldout: int):
        overrides = {
            "output_dir": str(tmp_path),
            "evaluate.max_examples": 5,
            "evaluate.heldout_examples": heldout,
        }
        return load_config(TINY, overrides)

    prepared = prepare_data(config(3))
    sets = load_test_sets(config(3), prepared)
    assert [(s.name, len(s.examples)) for s in sets] == [
        ("demo-test", 5), ("paraphrase", 3), ("composition", 3), ("entities", 3)
    ]  # fmt: skip
    assert any(e.answer is not None for e in sets[0].examples)  # the test split's keys, found by content
    assert all(e.answer is not None for e in sets[2].examples)
    assert [s.name for s in load_test_sets(config(0), prepared)] == ["demo-test"]
    assert [len(s.examples) for s in load_test_sets(config(100), prepared)] == [5] * 4  # max_examples caps
    with pytest.raises(ConfigError, match=r"heldout_examples=-1 must be >= 0\. Fix"):
        load_test_sets(config(-1), prepared)
