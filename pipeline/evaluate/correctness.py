"""Correctness of sampled responses against answer keys (pipeline.data.answers), beside Rouge-L.

Rouge-L against one sampled reference scores a task with several valid answers by luck; an answer key says
what is right. Reading a response (`read_answer`) follows the key's kind:
  choice    the last option of the key's answer space the response names (case-insensitive)
  number    the last integer in the response
  sequence  the response's tokens, split on commas and whitespace, final . ! ? dropped (case-sensitive)
  set       the first `count` distinct options it names (integers when the key has no options)
A response is correct when that reading is the answer (choice, number, sequence) or `count` distinct valid
answers (set). An empty response, or one naming no option, is wrong.

Over a test set (`correctness_columns`): task_accuracy per sampling seed (mean ± std over seeds, like
Rouge-L), accuracy per task family (all seeds pooled), and for several-answer tasks the spread of the
model's valid answers, pooled per question (one answer key, every example and seed asking it):
  answer_coverage  distinct valid answers given / valid answers, mean over questions
  answer_kl        KL(model || generator) in nats of the model's distribution over its valid answers to the
                   generator's (uniform over the valid set), mean over questions with a valid answer
Both depend on how many answers were drawn, so each comes with the generator's own value at the same
counts (`*_generator`: the generator asked as often as the model was, for the KL as often as the model
answered validly; a fixed-seed simulation, so reproducible). A model matching the generator's spread
scores about its `*_generator` values; a collapsed one (always "red") has low coverage and high KL.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.data.answers import FAMILIES, AnswerKey

_WORDS = re.compile(r"[A-Za-z]+|\d+")
_INTEGERS = re.compile(r"\d+")
_TOKENS = re.compile(r"[^\s,]+")
_SIMULATIONS = 256  # draws of the generator per question for the *_generator columns
_SIMULATION_SEED = 0


@dataclass(frozen=True)
class Scored:
    key: AnswerKey
    answer: tuple[str, ...]  # what the response answered, as read_answer reads it
    correct: bool


def read_answer(response: str, key: AnswerKey) -> tuple[str, ...]:
    """The answer(s) `response` gives, read as the key's kind says (empty: none found)."""
    if key.kind == "sequence":
        tokens = (t.rstrip(".!?") for t in _TOKENS.findall(response))
        return tuple(t for t in tokens if t)
    if key.kind == "number" or (key.kind == "set" and not key.options):
        found = [str(int(n)) for n in _INTEGERS.findall(response)]
    else:
        options = {o.casefold(): o for o in key.options}
        found = [options[w.casefold()] for w in _WORDS.findall(response) if w.casefold() in options]
    if key.kind == "set":
        return tuple(dict.fromkeys(found))[: key.count]
    return (found[-1],) if found else ()


def score_response(response: str, key: AnswerKey) -> Scored:
    answer = read_answer(response, key)
    if key.kind == "set":
        correct = len(answer) == key.count and set(answer) <= set(key.answer)
    else:
        correct = answer == key.answer
    return Scored(key, answer, correct)


def correctness_columns(per_seed: Mapping[int, Sequence[Scored]]) -> dict[str, float]:
    """Results-row columns (percent; KL in nats) of one test set's scored responses by sampling seed; {}
    when nothing was scored (no answer keys: the columns stay absent, never 0)."""
    seeds = [s for s in per_seed if per_seed[s]]
    if not seeds:
        return {}
    means = [100.0 * statistics.fmean(x.correct for x in per_seed[s]) for s in seeds]
    columns = {
        "task_accuracy": statistics.fmean(means),
        "task_accuracy_std": statistics.stdev(means) if len(means) > 1 else 0.0,
    }
    pooled = [x for s in seeds for x in per_seed[s]]
    for family in FAMILIES:
        scored = [x.correct for x in pooled if x.key.family == family]
        if scored:
            columns[f"task_accuracy.{family}"] = 100.0 * statistics.fmean(scored)
    return columns | answer_spread(pooled)


def answer_spread(scored: Sequence[Scored]) -> dict[str, float]:
    """answer_coverage(_generator) in percent and answer_kl(_generator) in nats over the several-answer
    questions of `scored` (module docstring); {} when there are none."""
    questions: dict[AnswerKey, list[Scored]] = {}
    for x in scored:
        if x.key.kind == "set":
            questions.setdefault(x.key, []).append(x)
    if not questions:
        return {}
    rng = random.Random(_SIMULATION_SEED)
    coverage, coverage_gen, kl, kl_gen = [], [], [], []
    for key, responses in questions.items():
        given = [a for x in responses if x.correct for a in x.answer]
        coverage.append(len(set(given)) / len(key.answer))
        # the generator answers every ask; for the KL, as many asks as the model answered validly
        simulated = [_sample(rng, key, len(responses)) for _ in range(_SIMULATIONS)]
        coverage_gen.append(statistics.fmean(len(set(s)) / len(key.answer) for s in simulated))
        if given:
            kl.append(_kl_to_uniform(given, len(key.answer)))
            valid_asks = sum(x.correct for x in responses)
            simulated = [_sample(rng, key, valid_asks) for _ in range(_SIMULATIONS)]
            kl_gen.append(statistics.fmean(_kl_to_uniform(s, len(key.answer)) for s in simulated))
    out = {
        "answer_coverage": 100.0 * statistics.fmean(coverage),
        "answer_coverage_generator": 100.0 * statistics.fmean(coverage_gen),
    }
    if kl:
        out |= {"answer_kl": statistics.fmean(kl), "answer_kl_generator": statistics.fmean(kl_gen)}
    return out


def _sample(rng: random.Random, key: AnswerKey, asks: int) -> list[str]:
    """The generator's answers to `asks` asks of `key`'s question: `count` distinct valid ones each."""
    return [a for _ in range(asks) for a in rng.sample(key.answer, key.count)]


def _kl_to_uniform(answers: Sequence[str], num_valid: int) -> float:
    """KL(q || uniform over num_valid) of the empirical distribution q of `answers` (all valid)."""
    counts = Counter(answers)
    total = sum(counts.values())
    return sum(c / total * math.log(c / total * num_valid) for c in counts.values())
