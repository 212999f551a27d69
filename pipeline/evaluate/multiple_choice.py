"""Multiple-choice accuracy (MMLU-style): each option scored by its log-likelihood given the prompt.

An item is a question, its choices and the index of the right one. Sources: a local JSONL file (one object
per line: "question", "choices" as a list or "A".."D" keys, "answer" as an index or a letter, optional
"subject"), a local CSV (MMLU's own header-less rows `question,A,B,C,D,answer` or a header naming those
columns), or a `datasets` name ("cais/mmlu:clinical_knowledge" = name:config, split "test").

Scoring: the option's tokens are appended to the prompt's (tokenised separately, so the prompt's tokens are
the same for every option) and the model's log-probabilities of the option tokens are summed. Two
predictions per item: `acc` takes the highest sum, `acc_norm` the highest mean per option token (length
normalised by tokens, not bytes as some harnesses do). The prompt lists the lettered choices and ends in
"Answer:"; each option is scored as " <choice text>". prompt_style "instruction" wraps the same question in
the training template (pipeline.data.template), for students trained on it; "response" puts the question
alone in that template (no listed choices, no "Answer:") and scores each option as the response itself, as
the students were trained to answer (the cloze form; the demo's multiple-choice set is scored this way).

The bundled demo set (DEMO_SET, `dataset: demo` in evaluate.multiple_choice) holds hand-written questions
about the demo data's closed world (pipeline.data.demo_dataset), each option phrased like a demo response.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pipeline.data
from pipeline.data.records import Record
from pipeline.data.template import format_prompt
from pipeline.data.tokenize import uses_bos
from pipeline.errors import DataError

LETTERS = "ABCDEFGHIJ"
PromptStyle = Literal["plain", "instruction", "response"]
PROMPT_STYLES: tuple[str, ...] = ("plain", "instruction", "response")
# package data (pyproject.toml): 30 questions in the demo data's style, 2-4 options each
DEMO_SET = Path(pipeline.data.__file__).parent / "demo_multiple_choice.jsonl"


@dataclass(frozen=True)
class MCItem:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    subject: str = ""


@dataclass(frozen=True)
class ItemScore:
    option_logprob_sum: tuple[float, ...]
    option_tokens: tuple[int, ...]
    answer: int

    @property
    def pred(self) -> int:
        return max(range(len(self.option_logprob_sum)), key=lambda i: self.option_logprob_sum[i])

    @property
    def pred_norm(self) -> int:
        means = [s / n for s, n in zip(self.option_logprob_sum, self.option_tokens, strict=True)]
        return max(range(len(means)), key=lambda i: means[i])


# --- loading ------------------------------------------------------------------------------------------------
def parse_answer(value: Any, num_choices: int, where: str) -> int:
    """An answer index from an int, a digit string or a letter (A = 0)."""
    text = str(value).strip()
    if (isinstance(value, int | float) and float(value).is_integer()) or text.isdigit():
        index = int(float(text))
    elif len(text) == 1 and text.upper() in LETTERS:
        index = LETTERS.index(text.upper())
    else:
        raise DataError(f"{where}: answer {value!r} is neither an index nor a letter A-{LETTERS[-1]}")
    if not 0 <= index < num_choices:
        raise DataError(f"{where}: answer {value!r} is out of range for {num_choices} choices")
    return index


def item_from_row(row: dict[str, Any], where: str, subject: str = "") -> MCItem:
    """One MMLU-style row: "choices" (list) or "A".."D" columns."""
    if "choices" in row and row["choices"] is not None:
        choices = tuple(str(c) for c in row["choices"])
    else:
        choices = tuple(str(row[k]) for k in LETTERS if row.get(k) not in (None, ""))
    if "question" not in row or len(choices) < 2 or "answer" not in row:
        raise DataError(
            f"{where}: a multiple-choice row needs 'question', 'answer' and >= 2 choices ('choices' list or "
            f"columns A, B, ...); got keys {sorted(row)}"
        )
    answer = parse_answer(row["answer"], len(choices), where)
    return MCItem(str(row["question"]), choices, answer, str(row.get("subject") or subject))


def load_mc_items(source: str, split: str = "test", limit: int | None = None) -> list[MCItem]:
    """Items from a .jsonl / .csv file or a `datasets` name (name or name:config)."""
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json", ".csv"):
        if not path.is_file():
            raise DataError(f"no multiple-choice file at {path}. Fix: check the path (.jsonl or .csv).")
        rows = _read_csv(path) if path.suffix == ".csv" else _read_jsonl(path)
        subject = path.stem
    else:
        import datasets

        name, _, config = source.partition(":")
        try:
            rows = list(datasets.load_dataset(name, config or None, split=split))
        except Exception as exc:  # datasets raises many types (missing, offline, bad config)
            raise DataError(
                f"cannot load multiple-choice dataset {source!r} split {split!r}: {exc}. Fix: check the name "
                "(name:config, e.g. cais/mmlu:clinical_knowledge), or point at a local .jsonl/.csv file."
            ) from None
        subject = config or name
    items = [item_from_row(r, f"{source} row {i}", subject) for i, r in enumerate(rows)]
    if not items:
        raise DataError(f"{source} holds no multiple-choice items")
    return items[:limit] if limit is not None else items


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not a JSON object ({exc})") from None
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as f:
        table = list(csv.reader(f))
    if table and "question" in [c.strip().lower() for c in table[0]]:
        header = [c.strip() for c in table[0]]
        return [dict(zip(header, r, strict=False)) for r in table[1:] if r]
    # MMLU's own files: question, one column per choice, answer letter; no header
    return [{"question": r[0], "choices": r[1:-1], "answer": r[-1]} for r in table if len(r) >= 4]


# --- scoring ------------------------------------------------------------------------------------------------
def render_prompt(item: MCItem, style: PromptStyle = "plain") -> str:
    if style == "response":
        return format_prompt(Record(item.question.strip(), "", "", item.subject))
    lines = [item.question.strip(), *(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))]
    body = "\n".join(lines)
    if style == "instruction":
        return format_prompt(Record(body, "", "", item.subject)) + "Answer:"
    return body + "\nAnswer:"


def option_text(choice: str, style: PromptStyle = "plain") -> str:
    """What is scored after the prompt: " <choice>" after "Answer:", the bare response in "response" style."""
    return choice if style == "response" else " " + choice


def score_item(
    model: Any, tokenizer: Any, item: MCItem, style: PromptStyle = "plain", device: str = "cpu"
) -> ItemScore:
    """Summed log-probability of each option's tokens after the prompt; all options in one forward."""
    import torch  # why: the loaders and accuracy stay importable by the torch-free evaluation driver

    # as training examples are built (pipeline.data.tokenize): bos only where the tokenizer uses one
    bos = [int(tokenizer.bos_token_id)] if uses_bos(tokenizer) else []
    prompt = bos + tokenizer(render_prompt(item, style), add_special_tokens=False)["input_ids"]
    options = [tokenizer(option_text(c, style), add_special_tokens=False)["input_ids"] for c in item.choices]
    if any(not o for o in options):
        raise DataError(f"an option of {item.question[:60]!r} tokenises to nothing")
    rows = [prompt + o for o in options]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits, dim=-1).cpu()
    sums = []
    for i, o in enumerate(options):
        start = len(prompt)  # option token j sits at start + j, predicted at position start + j - 1
        positions = torch.arange(start - 1, start - 1 + len(o))
        sums.append(float(logp[i, positions, torch.tensor(o)].sum()))
    return ItemScore(tuple(sums), tuple(len(o) for o in options), item.answer)


def accuracy(scores: Sequence[ItemScore]) -> dict[str, float]:
    """acc (highest summed log-likelihood), acc_norm (highest per-token mean) and n."""
    if not scores:
        raise DataError("no scored items: nothing to take an accuracy of")
    n = len(scores)
    return {
        "acc": sum(s.pred == s.answer for s in scores) / n,
        "acc_norm": sum(s.pred_norm == s.answer for s in scores) / n,
        "n": float(n),
    }


def evaluate_multiple_choice(
    model: Any,
    tokenizer: Any,
    tasks: dict[str, Sequence[MCItem]],
    style: PromptStyle = "plain",
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """Accuracy per task ({task name: items}), model in eval mode."""
    model.eval()
    return {
        name: accuracy([score_item(model, tokenizer, it, style, device) for it in items])
        for name, items in tasks.items()
    }
