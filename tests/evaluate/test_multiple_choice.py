"""pipeline.evaluate.multiple_choice on a tiny hand-made set: loaders, option scoring, accuracy, the bundled
demo set and the response prompt style."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support.tiny import demo_tokenizer, tiny_arch, tiny_moe

from pipeline.data.demo_dataset import generate_demo_records
from pipeline.data.records import Record
from pipeline.data.template import format_prompt
from pipeline.data.tokenize import uses_bos
from pipeline.errors import DataError
from pipeline.evaluate.multiple_choice import (
    DEMO_SET,
    MCItem,
    accuracy,
    evaluate_multiple_choice,
    load_mc_items,
    option_text,
    render_prompt,
    score_item,
)

ITEMS = [
    MCItem("Which organ pumps blood?", ("the heart", "a kidney", "lungs"), 0, "medicine"),
    MCItem("What is 2 + 2?", ("four", "five", "twenty two", "3"), 2, "math"),
    MCItem("A contract needs", ("an offer and an acceptance", "a stamp"), 1, "law"),
    MCItem("Pick the colour", ("red", "blue"), 0, "misc"),
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("mc")
    records = generate_demo_records(16, seed=0)
    items = [it.question + " " + " ".join(it.choices) for it in ITEMS]
    tok = demo_tokenizer(records, root / "tok", vocab_size=320, extra_texts=items)
    arch = tiny_arch(
        num_layers=2,
        num_experts=4,
        max_position_embeddings=256,
        initializer_range=0.5,  # peaked, well-separated option scores
    )
    model = tiny_moe(arch, seed=3, tokenizer=tok)
    return {"model": model.eval(), "tok": tok}


@torch.no_grad()
def _direct(model: Any, tok: Any, item: MCItem) -> list[float]:
    """Each option on its own (no padding, no batching): sum of log p(option token | everything before)."""
    bos = [tok.bos_token_id] if uses_bos(tok) else []
    prompt = bos + tok(render_prompt(item), add_special_tokens=False)["input_ids"]
    out = []
    for choice in item.choices:
        option = tok(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + option])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        out.append(sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(option)))
    return out


def test_option_scores_equal_direct_log_likelihoods(lm: dict[str, Any]) -> None:
    for item in ITEMS:
        score = score_item(lm["model"], lm["tok"], item)
        assert score.option_logprob_sum == pytest.approx(_direct(lm["model"], lm["tok"], item), abs=1e-4)
        assert all(n >= 1 for n in score.option_tokens)


def test_accuracy_sum_and_length_normalised(lm: dict[str, Any]) -> None:
    model, tok = lm["model"], lm["tok"]
    direct = [_direct(model, tok, it) for it in ITEMS]
    picks = [max(range(len(d)), key=d.__getitem__) for d in direct]
    # answer key: right on the first two items, wrong on the last two -> acc = 0.5 by construction
    keyed = [
        MCItem(it.question, it.choices, picks[i] if i < 2 else (picks[i] + 1) % len(it.choices), it.subject)
        for i, it in enumerate(ITEMS)
    ]
    result = evaluate_multiple_choice(model, tok, {"hand": keyed})["hand"]
    assert result["acc"] == 0.5 and result["n"] == 4
    # acc_norm: the highest mean log-prob per option token
    lengths = [[len(tok(" " + c, add_special_tokens=False)["input_ids"]) for c in it.choices] for it in ITEMS]
    norm_picks = [
        max(range(len(d)), key=lambda j, d=d, n=n: d[j] / n[j]) for d, n in zip(direct, lengths, strict=True)
    ]
    expected_norm = sum(p == it.answer for p, it in zip(norm_picks, keyed, strict=True)) / 4
    assert result["acc_norm"] == expected_norm
    with pytest.raises(DataError, match="no scored items"):
        accuracy([])


def test_loaders_jsonl_csv_and_answer_forms(tmp_path: Path) -> None:
    jsonl = tmp_path / "clinical_knowledge.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps(r)
            for r in (
                {"question": "Q1", "choices": ["a", "b", "c", "d"], "answer": 2},
                {"question": "Q2", "A": "x", "B": "y", "C": "z", "answer": "B"},
            )
        )
    )
    items = load_mc_items(str(jsonl))
    assert [(it.choices, it.answer, it.subject) for it in items] == [
        (("a", "b", "c", "d"), 2, "clinical_knowledge"),
        (("x", "y", "z"), 1, "clinical_knowledge"),
    ]
    mmlu_csv = tmp_path / "law.csv"  # MMLU's own header-less layout
    mmlu_csv.write_text('"What, exactly?",w,x,y,z,D\nQ2,one,two,three,four,a\n')
    assert [(it.question, it.answer) for it in load_mc_items(str(mmlu_csv))] == [
        ("What, exactly?", 3),
        ("Q2", 0),
    ]
    headed = tmp_path / "headed.csv"
    headed.write_text("question,A,B,answer\nQ,yes,no,1\n")
    assert load_mc_items(str(headed))[0].choices == ("yes", "no")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q", "choices": ["a", "b"], "answer": "E"}))
    with pytest.raises(DataError, match="out of range"):
        load_mc_items(str(bad))
    with pytest.raises(DataError, match="no multiple-choice file"):
        load_mc_items(str(tmp_path / "missing.jsonl"))


def test_response_style_and_the_bundled_demo_set(lm: dict[str, Any]) -> None:
    """ "response": the question alone in the training template, each option scored as the bare response."""
    items = load_mc_items(str(DEMO_SET))
    assert len(items) == 30 and all(2 <= len(it.choices) <= 4 for it in items)
    assert sum(1 / len(it.choices) for it in items) / len(items) == pytest.approx(0.3083, abs=1e-4)  # chance
    item = items[0]
    assert render_prompt(item, "response") == format_prompt(Record(item.question, "", "", ""))
    assert option_text("A cherry is red.", "response") == "A cherry is red."
    assert option_text("red") == " red"
    score = score_item(lm["model"], lm["tok"], item, "response")
    bos = [lm["tok"].bos_token_id] if uses_bos(lm["tok"]) else []
    prompt = bos + lm["tok"](render_prompt(item, "response"), add_special_tokens=False)["input_ids"]
    option = lm["tok"](item.choices[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ids = torch.tensor([prompt + option])
        logp = torch.log_softmax(lm["model"](input_ids=ids).logits[0].double(), dim=-1)
    direct = sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(option))
    assert score.option_logprob_sum[1] == pytest.approx(direct, abs=1e-4)
