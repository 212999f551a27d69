"""The demo's evaluation sets beyond its test split, and the test split's answer keys.

Like the paper's five test sets, the demo evaluates on more than its in-distribution test split:

* `paraphrase`: the training tasks with instructions rewritten from held-out templates that the training
  generator never emits (the same closed world and answers, new wording);
* `composition`: longer chains than any training example: arithmetic with three operations (training: at
  most two), three list operations in sequence (training: two), the legs of two kinds of animals added up,
  and a fact read from the context then capitalised and spelled backwards;
* `entities`: the context tasks about invented creatures whose names come from held-out syllables, so no
  training record mentions them: the answer must be read from the context.

Each set is drawn from its own seed (a string seed "heldout:<set>:<data.seed>", which `random` hashes with
sha512, independent of PYTHONHASHSEED) with its own random stream, so the training records and their
JSONL bytes are untouched. Every example carries its answer key (pipeline.data.answers).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import replace

from pipeline.data import answers
from pipeline.data.answers import AnswerKey
from pipeline.data.demo_dataset import (
    ANIMALS,
    LEGS,
    LIST_OPS,
    NAMES,
    PLURALS,
    TASKS,
    DemoExample,
    _article,
    _cap,
    _creature_context,
    _pick,
    _word_list,
    draw,
    generate_demo_examples,
)
from pipeline.data.records import Record
from pipeline.errors import ConfigError

HELDOUT_SETS = ("paraphrase", "composition", "entities")

# Held-out instruction templates, by task (or "task:variant" where a task has several instruction
# families), filled from the slots the training task drew. None is a training template (tests check it).
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "fruit_color": ("Tell me the color of {a} {f}.", "Describe the color of {a} {f} in one word."),
    "animal_sound": ("Which noise does {a} {x} make?", "Tell me the sound {a} {x} makes."),
    "antonym": ("Tell me a word that means the opposite of {w}.", "What word is the opposite of {w}?"),
    "plural": ("Give me the plural of the word {w}.", "How do you say more than one {w}?"),
    "animal_class": ("Which group does {a} {x} belong to: mammal, bird, fish or insect?",),
    "even_odd": ("Tell me whether {n} is even or odd.", "Is the number {n} odd or even?"),
    "word_kind": ("Which is {w}: a color, an animal or a fruit?",),
    "add_small": ("Add {a} and {b}.", "What do you get when you add {a} and {b}?"),
    "larger": ("Which is bigger: {a} or {b}?", "Tell me the larger number of {a} and {b}."),
    "warm_cool_color": ("Give me an example of a {k} color.", "Which color is {k}? Name one."),
    "synonym": ("Tell me a word that means the same as {w}.", "Name a word with the same meaning as {w}."),
    "flying_animals": ("Name two animals that fly.", "Give me two animals that are able to fly."),
    "fruit_of_color": ("Give me a fruit that can be {c}.", "Tell me one fruit whose color is {c}."),
    "animal_of_habitat": (
        "Which animal can you find in the {p}?",
        "Tell me an animal that lives in the {p}.",
    ),
    "number_between": (
        "Pick a number that is between {lo} and {hi}.",
        "Tell me a number greater than {lo} and smaller than {hi}.",
    ),
    "pet_name": ("What could I call my pet {x}?", "Give me a name for a pet {x}."),
    "review_sentiment": (
        "Is this review positive or negative?",
        "Tell me whether the review is positive or negative.",
    ),
    "arith_chain": (
        "Add {a} and {b}, then take away {c}. What do you get?",
        "Compute {a} plus {b} minus {c}.",
    ),
    "arith_mul": ("Add {a} and {b}, then multiply the sum by {c}.", "What is ({a} + {b}) times {c}?"),
    "legs_total": ("Count the legs of {n} {p} altogether.", "Altogether, how many legs do {n} {p} have?"),
    "reverse_list": (
        "Put these words in the opposite order: {w}.",
        "List these words from last to first: {w}.",
    ),
    "sort_list": ("Put these words in alphabetical order: {w}.", "Arrange these words from A to Z: {w}."),
    "two_list_ops": ("Here are some words: {w}. Step one: {d1}. Step two: {d2}.",),
    "spell:forward": ("Write out the letters of {w} one by one.",),
    "spell:backward": ("Write the letters of {w} from last to first, one by one.",),
    "spell:backward_upper": ("Write the letters of {w} from last to first, one by one, in capital letters.",),
    "creature_lookup:home": ("In which place does {n} live?",),
    "creature_lookup:food": ("What food does {n} eat?",),
    "creature_lookup:age": ("What is the age of {n}?",),
    "creature_lookup:color": ("Which color is {n}?",),
    "creature_transform:older": ("What age will {n} be {k} years from now?",),
    "creature_transform:younger": ("What age was {n} {k} years before now?",),
    "creature_transform:upper": ("Write what {n} eats in capital letters.",),
    "creature_transform:plural": ("Give the plural of the kind of animal {n} is.",),
    "creature_transform:class": ("Which group is {n} in: mammal, bird, fish or insect?",),
    "creature_transform:fly": ("Is {n} able to fly?",),
    "extract_numbers:extract": ("List every number that appears in the text.",),
    "extract_numbers:total": ("How many animals does {n} own altogether?",),
}

# Invented names from syllables the training generator never uses (its NAMES: Zo/Ka/Mi/... + rvan/dor/...).
_HELDOUT_HEADS = ("Bo", "Fe", "Gu", "Ha", "Je", "Ol", "Pe", "Su")
_HELDOUT_TAILS = ("ndri", "xel", "gorn", "vika", "tum", "lessa", "rib", "zan")
HELDOUT_NAMES = tuple(h + t for h in _HELDOUT_HEADS for t in _HELDOUT_TAILS)
_ENTITY_TASKS = ("creature_lookup", "creature_transform", "extract_numbers", "summarize")


def demo_answer_keys(records: Sequence[Record], num_demo_records: int, seed: int) -> list[AnswerKey | None]:
    """The answer keys of demo records (a split of `generate_demo_records(num_demo_records, seed)`): the
    generator is run again and each record looked up by content, so any split of it gets its keys. A record
    it did not generate (user data), or an open-ended one, gets None."""
    by_record = {e.record: e.key for e in generate_demo_examples(num_demo_records, seed)}
    return [by_record.get(r) for r in records]


def generate_heldout(name: str, num_examples: int, seed: int) -> list[DemoExample]:
    """`num_examples` examples of the held-out set `name` (one of HELDOUT_SETS); same seed, same list."""
    if name not in _GENERATORS:
        raise ConfigError(f"unknown held-out test set {name!r}. Fix: use one of {list(HELDOUT_SETS)}.")
    if num_examples < 0:
        raise ConfigError(f"held-out test set size must be >= 0, got {num_examples}.")
    rng = random.Random(f"heldout:{name}:{seed}")
    return [_GENERATORS[name](rng) for _ in range(num_examples)]


# --- paraphrase ------------------------------------------------------------------------------------------
_PARAPHRASED = tuple(
    (name, weight) for name, weight, _ in TASKS if name in {k.split(":")[0] for k in PARAPHRASES}
)


def template_id(example: DemoExample) -> str:
    """The PARAPHRASES key of an example: its task, or task:variant for a task with several instructions."""
    variant = example.slots.get("variant")
    return f"{example.task}:{variant}" if variant else example.task


def _paraphrase(rng: random.Random) -> DemoExample:
    names, weights = zip(*_PARAPHRASED, strict=True)
    example = draw(rng.choices(names, weights=weights)[0], rng)
    instruction = _pick(rng, PARAPHRASES[template_id(example)]).format(**example.slots)
    record = Record(instruction, example.record.context, example.record.response, example.record.category)
    return DemoExample(record, example.key, example.task, example.slots)


# --- composition -----------------------------------------------------------------------------------------
def _example(task: str, record: Record, key: AnswerKey, slots: dict[str, str]) -> DemoExample:
    return DemoExample(record, replace(key, task=task), task, slots)


def _arith_long(rng: random.Random) -> DemoExample:
    """Three operations where training chains at most two, with the same worked-answer format."""
    x = start = rng.randrange(1, 20)
    words, steps = [], []
    for _ in range(3):
        # results stay small non-negative integers, as in training
        op = _pick(rng, ["add", *(["subtract"] if x >= 2 else []), *(["multiply"] if x <= 30 else [])])
        n = {"add": (1, 20), "subtract": (1, x + 1), "multiply": (2, 4)}[op]
        n = rng.randrange(*n)
        y = x + n if op == "add" else x - n if op == "subtract" else x * n
        words.append({"add": f"add {n}", "subtract": f"subtract {n}", "multiply": f"multiply by {n}"}[op])
        steps.append(f"{x} {'+' if op == 'add' else '-' if op == 'subtract' else '*'} {n} = {y}")
        x = y
    q = f"Start with {start}. {_cap(words[0])}, then {words[1]}, then {words[2]}. What is the result?"
    a = f"{', '.join(steps)}. The answer is {x}."
    return _example("arith_long", Record(q, "", a, "closed_qa"), answers.number("arithmetic", x), {})


def _list_chain(rng: random.Random) -> DemoExample:
    """Three list operations in sequence where training chains two."""
    words = _word_list(rng, 4, 5)
    out: list[str] = []
    while not out:  # e.g. "keep only the first two" then removing both ends leaves nothing to check
        ops = rng.sample(LIST_OPS, 3)
        out = list(words)
        for _, fn in ops:
            out = fn(out)
    q = f"Take these words: {', '.join(words)}. First {ops[0][0]}, then {ops[1][0]}, then {ops[2][0]}."
    return _example(
        "list_chain", Record(q, "", ", ".join(out), "generation"), answers.sequence("list", out), {}
    )


def _legs_two_kinds(rng: random.Random) -> DemoExample:
    """Two legs_total lookups and their sum."""
    x, y = rng.sample([a for a, v in ANIMALS.items() if v[0] != "fish"], 2)
    n, m = rng.randrange(2, 6), rng.randrange(2, 6)
    lx, ly = LEGS[ANIMALS[x][0]], LEGS[ANIMALS[y][0]]
    px, py = PLURALS.get(x, x + "s"), PLURALS.get(y, y + "s")
    total = n * lx + m * ly
    q = f"How many legs do {n} {px} and {m} {py} have in total?"
    a = (
        f"{_cap(_article(x))} {x} has {lx} legs and {_article(y)} {y} has {ly} legs, "
        f"so {n} {px} and {m} {py} have {total} legs."
    )
    return _example("legs_two_kinds", Record(q, "", a, "closed_qa"), answers.number("arithmetic", total), {})


def _food_backwards(rng: random.Random) -> DemoExample:
    """A fact read from the context, capitalised, then spelled backwards: three steps (training: two)."""
    creature, context = _creature_context(rng, NAMES)
    letters = " ".join(reversed(str(creature["food"]).upper()))
    name = creature["name"]
    q = f"What does {name} eat? Answer in capital letters, spelled backwards one letter at a time."
    record = Record(q, context, letters, "information_extraction")
    return _example("food_backwards", record, answers.sequence("context", letters.split()), {})


_COMPOSITIONS: tuple[Callable[[random.Random], DemoExample], ...] = (
    _arith_long,
    _list_chain,
    _legs_two_kinds,
    _food_backwards,
)


def _composition(rng: random.Random) -> DemoExample:
    return _COMPOSITIONS[rng.randrange(len(_COMPOSITIONS))](rng)


# --- entities --------------------------------------------------------------------------------------------
_ENTITY_WEIGHTS = tuple(w for name, w, _ in TASKS if name in _ENTITY_TASKS)


def _entities(rng: random.Random) -> DemoExample:
    task = rng.choices([n for n, _, _ in TASKS if n in _ENTITY_TASKS], weights=_ENTITY_WEIGHTS)[0]
    return draw(task, rng, names=HELDOUT_NAMES)


_GENERATORS: dict[str, Callable[[random.Random], DemoExample]] = {
    "paraphrase": _paraphrase,
    "composition": _composition,
    "entities": _entities,
}
