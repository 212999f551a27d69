"""Answer keys: what a correct response to a generated record is, recorded by the generator itself.

A key is a sidecar of a record, never a field of it: the training/validation/test JSONL files (and so the
records' fingerprint, the teacher cache's key and every run name) stay exactly what they were. The demo
generator (pipeline.data.demo_dataset) returns each record with its key, computed from the very values it
drew, so a key is never parsed back out of text. Records of user data have no key.

Kinds (how pipeline.evaluate.correctness reads a response against `answer`):
  choice    one right option among `options` (the task's answer space); the response's answer is the last
            option it names (the generator's responses name the answer last: "A lemon is yellow.")
  number    one integer; the response's answer is the last integer in it (after the worked steps)
  sequence  an exact token sequence (a transformed list, a spelling, a word in capitals), split on commas
            and spaces, case-sensitive
  set       several valid answers (`answer`), drawn uniformly by the generator; the response's answers are
            the first `count` distinct options it names (`options`; empty: integers)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["choice", "number", "sequence", "set"]

# task family -> what it tests; every keyed task belongs to one (the per-family accuracy columns)
FAMILIES: dict[str, str] = {
    "fact": "one fact of the closed world (a colour, a sound, an opposite, a class, even/odd, a sentiment)",
    "several": "a task with several valid answers (name a warm colour, a synonym, two flying animals)",
    "arithmetic": "a number computed in one or more steps",
    "list": "a list or spelling transformed by one or more operations",
    "context": "a fact read from the context, possibly transformed",
}


@dataclass(frozen=True)
class AnswerKey:
    family: str  # a key of FAMILIES
    kind: Kind
    answer: tuple[str, ...]  # choice/number: (the answer,); sequence: the tokens; set: the valid answers
    options: tuple[str, ...] = ()  # choice/set: the answer space a response's answer is read from
    count: int = 1  # set: distinct valid answers the response must give
    task: str = ""  # the generator task that drew the record (filled in by the generator's driver)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"answer key: unknown family {self.family!r}. Fix: use one of {list(FAMILIES)}")
        if self.kind not in ("choice", "number", "sequence", "set"):
            raise ValueError(
                f"answer key: unknown kind {self.kind!r}. Fix: use choice, number, sequence or set"
            )
        if not self.answer or (self.kind == "set" and len(self.answer) < self.count):
            raise ValueError(f"answer key of {self.task or self.family!r}: too few answers {self.answer}")

    def to_dict(self) -> dict[str, object]:
        return {
            "task": self.task,
            "family": self.family,
            "kind": self.kind,
            "answer": list(self.answer),
            "options": list(self.options),
            "count": self.count,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> AnswerKey:
        return cls(
            family=str(raw["family"]),
            kind=raw["kind"],  # type: ignore[arg-type]
            answer=tuple(str(a) for a in raw["answer"]),  # type: ignore[attr-defined]
            options=tuple(str(o) for o in raw.get("options") or ()),  # type: ignore[attr-defined]
            count=int(raw.get("count") or 1),  # type: ignore[arg-type]
            task=str(raw.get("task") or ""),
        )


def choice(family: str, answer: str, options: tuple[str, ...] | list[str]) -> AnswerKey:
    return AnswerKey(family, "choice", (answer,), tuple(options))


def number(family: str, value: int) -> AnswerKey:
    return AnswerKey(family, "number", (str(value),))


def sequence(family: str, tokens: list[str] | tuple[str, ...]) -> AnswerKey:
    return AnswerKey(family, "sequence", tuple(tokens))


def several(
    valid: tuple[str, ...] | list[str], options: tuple[str, ...] | list[str] = (), count: int = 1
) -> AnswerKey:
    return AnswerKey("several", "set", tuple(valid), tuple(options), count)
