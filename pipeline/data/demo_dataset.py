"""A generated, license-clean instruction dataset for the CPU demo and the tests.

Every record comes from a small closed world (a few hundred words: colours, animals, fruits, adjectives,
numbers, invented names), so a byte-level BPE of ~1k tokens covers it and a ~4M-parameter teacher learns it
in minutes. Three kinds of tasks, so that distillation has something to transfer:

* simple templated facts (what colour is a lemon, plural of mouse, is 7 even or odd);
* tasks with several valid answers, the response drawn at random from the valid set and from paraphrased
  answer templates (name a warm colour, a synonym of big, a sentence about an owl): the teacher's output
  distribution then carries information a single label does not;
* compositional tasks (multi-step arithmetic with a worked answer, reverse/sort a word list, two list or
  spelling operations in sequence, look up a fact about an invented creature in the context and transform
  it), which a tiny student trained alone does not saturate.

Categories are Dolly's names plus "generation" (list and string transformations). Determinism: one
`random.Random(seed)` drives everything and only tuples/lists are iterated (never sets, whose order
depends on PYTHONHASHSEED).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pipeline.data import answers
from pipeline.data.answers import AnswerKey
from pipeline.data.records import Record
from pipeline.errors import ConfigError

# --- the closed world --------------------------------------------------------------------------------------
WARM_COLORS = ("red", "orange", "yellow", "pink")
COOL_COLORS = ("blue", "green", "purple", "gray")
COLORS = WARM_COLORS + COOL_COLORS + ("white", "black", "brown")

# animal -> (class, can fly, sound, habitats, actions)
ANIMALS: dict[str, tuple[str, bool, str, tuple[str, ...], tuple[str, ...]]] = {
    "dog": ("mammal", False, "woof", ("village", "farm"), ("runs", "barks", "sleeps", "plays")),
    "cat": ("mammal", False, "meow", ("village", "farm"), ("sleeps", "jumps", "plays", "hides")),
    "horse": ("mammal", False, "neigh", ("farm", "field"), ("runs", "eats", "jumps")),
    "cow": ("mammal", False, "moo", ("farm", "field"), ("eats", "sleeps", "walks")),
    "rabbit": ("mammal", False, "squeak", ("field", "forest"), ("jumps", "hides", "eats")),
    "bear": ("mammal", False, "growl", ("forest", "mountain"), ("sleeps", "walks", "eats")),
    "mouse": ("mammal", False, "squeak", ("village", "field"), ("runs", "hides", "eats")),
    "bat": ("mammal", True, "squeak", ("cave", "forest"), ("flies", "sleeps", "hides")),
    "owl": ("bird", True, "hoot", ("forest", "mountain"), ("flies", "sleeps", "watches")),
    "duck": ("bird", True, "quack", ("lake", "river"), ("swims", "flies", "walks")),
    "eagle": ("bird", True, "screech", ("mountain", "forest"), ("flies", "watches", "hunts")),
    "crow": ("bird", True, "caw", ("village", "field"), ("flies", "walks", "watches")),
    "parrot": ("bird", True, "squawk", ("forest", "island"), ("flies", "talks", "sings")),
    "penguin": ("bird", False, "honk", ("island", "lake"), ("swims", "walks", "slides")),
    "salmon": ("fish", False, "nothing", ("river", "lake"), ("swims", "jumps")),
    "shark": ("fish", False, "nothing", ("sea", "island"), ("swims", "hunts")),
    "trout": ("fish", False, "nothing", ("river", "lake"), ("swims", "hides")),
    "bee": ("insect", True, "buzz", ("field", "forest"), ("flies", "works", "dances")),
    "ant": ("insect", False, "nothing", ("field", "forest"), ("walks", "works", "digs")),
    "moth": ("insect", True, "nothing", ("forest", "village"), ("flies", "rests", "hides")),
}
LEGS = {"mammal": 4, "bird": 2, "fish": 0, "insect": 6}
HABITATS = ("village", "farm", "field", "forest", "mountain", "cave", "lake", "river", "island", "sea")

# fruit -> colours it can have
FRUITS: dict[str, tuple[str, ...]] = {
    "banana": ("yellow",),
    "lemon": ("yellow",),
    "cherry": ("red",),
    "strawberry": ("red",),
    "apple": ("red", "green", "yellow"),
    "grape": ("purple", "green"),
    "plum": ("purple",),
    "lime": ("green",),
    "pear": ("green", "yellow"),
    "orange": ("orange",),
    "peach": ("orange", "pink"),
    "blueberry": ("blue",),
    "kiwi": ("brown",),
    "coconut": ("brown",),
}
ANTONYMS = {
    "big": "small",
    "hot": "cold",
    "fast": "slow",
    "happy": "sad",
    "old": "new",
    "tall": "short",
    "light": "dark",
    "early": "late",
    "full": "empty",
    "wet": "dry",
    "hard": "soft",
    "loud": "quiet",
    "rich": "poor",
    "strong": "weak",
    "clean": "dirty",
    "open": "closed",
}
SYNONYMS = {
    "big": ("large", "huge", "giant"),
    "small": ("little", "tiny", "petite"),
    "happy": ("glad", "joyful", "cheerful"),
    "sad": ("unhappy", "gloomy", "blue"),
    "fast": ("quick", "rapid", "swift"),
    "cold": ("chilly", "cool", "icy"),
    "smart": ("clever", "bright", "wise"),
    "angry": ("mad", "upset", "cross"),
    "pretty": ("lovely", "beautiful", "cute"),
    "quiet": ("silent", "calm", "still"),
}
PLURALS = {
    "cat": "cats",
    "box": "boxes",
    "child": "children",
    "mouse": "mice",
    "foot": "feet",
    "tooth": "teeth",
    "man": "men",
    "city": "cities",
    "leaf": "leaves",
    "knife": "knives",
    "sheep": "sheep",
    "fish": "fish",
    "bus": "buses",
    "baby": "babies",
    "wolf": "wolves",
    "goose": "geese",
    "berry": "berries",
    "dog": "dogs",
}
FOODS = ("seeds", "fish", "berries", "grass", "honey", "nuts", "leaves", "bread", "apples", "bugs")
PET_NAMES = ("Max", "Bella", "Milo", "Luna", "Rex", "Coco", "Daisy", "Pip")
DISHES = ("soup", "bread", "cake", "pizza", "salad", "tea")
GOOD_WORDS = ("tasty", "fresh", "warm", "great", "lovely")
BAD_WORDS = ("cold", "bland", "stale", "awful", "salty")
GOOD_STAFF = ("friendly", "kind", "quick", "helpful")
BAD_STAFF = ("rude", "slow", "careless", "grumpy")
_NAME_HEADS = ("Zo", "Ka", "Mi", "Ta", "Lu", "Ve", "Ro", "Ni")
_NAME_TAILS = ("rvan", "lmira", "dor", "sha", "mek", "tilo", "pax", "quin")
NAMES = tuple(h + t for h in _NAME_HEADS for t in _NAME_TAILS)
LIST_WORDS = tuple(sorted({*ANIMALS, *FRUITS, *COLORS}))  # sorted: set order must never leak into output
SPELL_WORDS = tuple(w for w in LIST_WORDS if 3 <= len(w) <= 5)

SOUNDS = tuple(dict.fromkeys(v[2] for v in ANIMALS.values() if v[2] != "nothing"))
CLASSES = ("mammal", "bird", "fish", "insect")
ANTONYM_WORDS = tuple(dict.fromkeys([*ANTONYMS, *ANTONYMS.values()]))
SYNONYM_WORDS = tuple(s for syns in SYNONYMS.values() for s in syns)

# What a task draws: the record, its answer key (None: open-ended writing, scored by Rouge-L alone) and the
# values its instruction was written from (held-out paraphrases rewrite the instruction from them).
Drawn = tuple[Record, AnswerKey | None, dict[str, str]]
_Task = Callable[..., Drawn]


@dataclass(frozen=True)
class DemoExample:
    """A generated record with its sidecar answer key (pipeline.data.answers): never written to the JSONL."""

    record: Record
    key: AnswerKey | None
    task: str
    slots: dict[str, str]  # the instruction's values; "variant": which of a task's instruction families


def _rec(instruction: str, response: str, category: str, context: str = "") -> Record:
    return Record(instruction=instruction, context=context, response=response, category=category)


def _pick(rng: random.Random, items: tuple[str, ...] | list[str]) -> str:
    return items[rng.randrange(len(items))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _article(word: str) -> str:
    if word[:1].isdigit():  # "an 8 year old", "an 11 year old", "a 12 year old"
        return "an" if word.startswith("8") or word in ("11", "18") else "a"
    return "an" if word[:1] in "aeiou" else "a"


# --- (a) simple templated tasks ----------------------------------------------------------------------------
def _fruit_color(rng: random.Random) -> Drawn:
    fruit = _pick(rng, [f for f, c in FRUITS.items() if len(c) == 1])
    q = _pick(rng, ("What color is {a} {f}?", "Which color does {a} {f} have?")).format(
        a=_article(fruit), f=fruit
    )
    return (
        _rec(q, f"{_cap(_article(fruit))} {fruit} is {FRUITS[fruit][0]}.", "open_qa"),
        answers.choice("fact", FRUITS[fruit][0], COLORS),
        {"a": _article(fruit), "f": fruit},
    )


def _animal_sound(rng: random.Random) -> Drawn:
    animal = _pick(rng, [a for a, v in ANIMALS.items() if v[2] != "nothing"])
    q = _pick(rng, ("What sound does {a} {x} make?", "What does {a} {x} say?"))
    return (
        _rec(
            q.format(a=_article(animal), x=animal),
            f"{_cap(_article(animal))} {animal} says {ANIMALS[animal][2]}.",
            "open_qa",
        ),
        answers.choice("fact", ANIMALS[animal][2], SOUNDS),
        {"a": _article(animal), "x": animal},
    )


def _antonym(rng: random.Random) -> Drawn:
    word = _pick(rng, list(ANTONYMS))
    q = _pick(rng, ("What is the opposite of {w}?", "Give the opposite of the word {w}."))
    return (
        _rec(q.format(w=word), f"The opposite of {word} is {ANTONYMS[word]}.", "open_qa"),
        answers.choice("fact", ANTONYMS[word], ANTONYM_WORDS),
        {"w": word},
    )


def _plural(rng: random.Random) -> Drawn:
    word = _pick(rng, list(PLURALS))
    q = _pick(rng, ("What is the plural of {w}?", "Write the plural form of {w}."))
    return (
        _rec(q.format(w=word), PLURALS[word], "open_qa"),
        answers.sequence("fact", [PLURALS[word]]),
        {"w": word},
    )


def _animal_class(rng: random.Random) -> Drawn:
    animal = _pick(rng, list(ANIMALS))
    q = f"Is {_article(animal)} {animal} a mammal, a bird, a fish or an insect?"
    return (
        _rec(
            q,
            f"{_cap(_article(animal))} {animal} is {_article(ANIMALS[animal][0])} {ANIMALS[animal][0]}.",
            "classification",
        ),
        answers.choice("fact", ANIMALS[animal][0], CLASSES),
        {"a": _article(animal), "x": animal},
    )


def _even_odd(rng: random.Random) -> Drawn:
    n = rng.randrange(0, 100)
    q = _pick(rng, ("Is {n} even or odd?", "Classify the number {n} as even or odd."))
    parity = "even" if n % 2 == 0 else "odd"
    return (
        _rec(q.format(n=n), parity, "classification"),
        answers.choice("fact", parity, ("even", "odd")),
        {"n": str(n)},
    )


def _word_kind(rng: random.Random) -> Drawn:
    kind = _pick(rng, ("color", "animal", "fruit"))
    pool = {"color": COLORS, "animal": tuple(ANIMALS), "fruit": tuple(FRUITS)}[kind]
    word = _pick(rng, [w for w in pool if w != "orange"])  # "orange" is both a colour and a fruit
    return (
        _rec(
            f"Is {word} a color, an animal or a fruit?",
            f"{_cap(word)} is {_article(kind)} {kind}.",
            "classification",
        ),
        answers.choice("fact", kind, ("color", "animal", "fruit")),
        {"w": word},
    )


def _add_small(rng: random.Random) -> Drawn:
    a, b = rng.randrange(0, 20), rng.randrange(0, 20)
    return (
        _rec(f"What is {a} + {b}?", str(a + b), "closed_qa"),
        answers.number("arithmetic", a + b),
        {"a": str(a), "b": str(b)},
    )


def _larger(rng: random.Random) -> Drawn:
    a, b = rng.sample(range(100), 2)
    return (
        _rec(f"Which number is larger, {a} or {b}?", str(max(a, b)), "closed_qa"),
        answers.number("arithmetic", max(a, b)),
        {"a": str(a), "b": str(b)},
    )


# --- (b) tasks with several valid answers ------------------------------------------------------------------
def _warm_cool_color(rng: random.Random) -> Drawn:
    kind = _pick(rng, ("warm", "cool"))
    valid = WARM_COLORS if kind == "warm" else COOL_COLORS
    color = _pick(rng, valid)
    q = _pick(rng, ("Name a {k} color.", "Tell me one {k} color."))
    a = _pick(rng, ("{c}", "{C}.", "{C} is a {k} color.", "One {k} color is {c}."))
    return (
        _rec(q.format(k=kind), a.format(c=color, C=_cap(color), k=kind), "brainstorming"),
        answers.several(valid, COLORS),
        {"k": kind},
    )


def _synonym(rng: random.Random) -> Drawn:
    word = _pick(rng, list(SYNONYMS))
    syn = _pick(rng, SYNONYMS[word])
    q = _pick(rng, ("Give a synonym of {w}.", "What is another word for {w}?"))
    a = _pick(rng, ("{s}", "{S}.", "Another word for {w} is {s}."))
    return (
        _rec(q.format(w=word), a.format(s=syn, S=_cap(syn), w=word), "brainstorming"),
        answers.several(SYNONYMS[word], SYNONYM_WORDS),
        {"w": word},
    )


def _flying_animals(rng: random.Random) -> Drawn:
    flyers = [a for a, v in ANIMALS.items() if v[1]]
    x, y = rng.sample(flyers, 2)
    a = _pick(rng, ("{x} and {y}", "{X} and {y}.", "Two animals that can fly are the {x} and the {y}."))
    return (
        _rec("List two animals that can fly.", a.format(x=x, y=y, X=_cap(x)), "brainstorming"),
        answers.several(flyers, tuple(ANIMALS), count=2),
        {},
    )


def _fruit_of_color(rng: random.Random) -> Drawn:
    color = _pick(rng, ("red", "yellow", "green", "purple", "orange"))
    valid = [f for f, cs in FRUITS.items() if color in cs]
    fruit = _pick(rng, valid)
    q = _pick(rng, ("Name a fruit that is {c}.", "Which fruit can be {c}?"))
    a = _pick(rng, ("{f}", "{F}.", "{A} {f} can be {c}."))
    return (
        _rec(
            q.format(c=color),
            a.format(f=fruit, F=_cap(fruit), A=_cap(_article(fruit)), c=color),
            "brainstorming",
        ),
        answers.several(valid, tuple(FRUITS)),
        {"c": color},
    )


def _animal_of_habitat(rng: random.Random) -> Drawn:
    place = _pick(rng, ("forest", "farm", "field", "river", "lake", "mountain", "village"))
    valid = [a for a, v in ANIMALS.items() if place in v[3]]
    animal = _pick(rng, valid)
    a = _pick(rng, ("{x}", "{A} {x}.", "{A} {x} lives in the {p}."))
    return (
        _rec(
            f"Name an animal that lives in the {place}.",
            a.format(x=animal, A=_cap(_article(animal)), p=place),
            "brainstorming",
        ),
        answers.several(valid, tuple(ANIMALS)),
        {"p": place},
    )


def _number_between(rng: random.Random) -> Drawn:
    lo = rng.randrange(0, 40)
    hi = lo + rng.randrange(3, 12)
    n = rng.randrange(lo + 1, hi)
    return (
        _rec(
            f"Give a number between {lo} and {hi}.",
            _pick(rng, ("{n}", "{n} is between {lo} and {hi}.")).format(n=n, lo=lo, hi=hi),
            "brainstorming",
        ),
        answers.several([str(v) for v in range(lo + 1, hi)]),  # no options: the response's first integer
        {"lo": str(lo), "hi": str(hi)},
    )


def _pet_name(rng: random.Random) -> Drawn:
    animal = _pick(rng, ("dog", "cat", "rabbit", "horse", "parrot", "mouse"))
    name = _pick(rng, PET_NAMES)
    a = _pick(rng, ("{n}", "How about {n}?", "You could call it {n}."))
    return (
        _rec(f"Suggest a name for a pet {animal}.", a.format(n=name), "brainstorming"),
        answers.several(PET_NAMES, PET_NAMES),
        {"x": animal},
    )


def _animal_sentence(rng: random.Random) -> Drawn:
    animal, color = _pick(rng, list(ANIMALS)), _pick(rng, COLORS)
    _, _, _, places, actions = ANIMALS[animal]
    verb, place = _pick(rng, actions), _pick(rng, places)
    a = _pick(rng, ("The {x} {v} in the {p}.", "{A} {c} {x} {v} near the {p}.", "Every day the {x} {v}."))
    q = _pick(rng, ("Write a short sentence about {a} {x}.", "Write one sentence about {a} {x}."))
    return (
        _rec(
            q.format(a=_article(animal), x=animal),
            a.format(x=animal, v=verb, p=place, A=_cap(_article(color)), c=color),
            "creative_writing",
        ),
        None,
        {"a": _article(animal), "x": animal},
    )


def _adjective_sentence(rng: random.Random) -> Drawn:
    adj = _pick(
        rng, ("big", "small", "old", "new", "dark", "clean", "dirty", "wet", "dry", "hot", "cold", "quiet")
    )
    noun = _pick(rng, ("house", "room", "box", "road", "garden", "kitchen"))
    a = _pick(rng, ("The {n} is very {j}.", "This {n} looks {j}.", "My {n} was {j} today."))
    q = f"Write a short sentence that uses the word {adj}."
    return _rec(q, a.format(n=noun, j=adj), "creative_writing"), None, {"j": adj}


def _poem(rng: random.Random) -> Drawn:
    color, animal = _pick(rng, COLORS), _pick(rng, list(ANIMALS))
    place = _pick(rng, ANIMALS[animal][3])
    a = _pick(
        rng,
        (
            "The {c} {x} {v},\nin the {p} all day.",
            "A {c} {x} in the {p},\nhappy and free.",
            "Oh {c} {x},\nyou {s} in the {p}.",
        ),
    )
    verb = _pick(rng, ANIMALS[animal][4])
    stem = verb[:-3] + "y" if verb.endswith("ies") else verb[:-2] if verb.endswith("ches") else verb[:-1]
    return (
        _rec(
            f"Write a two line poem about {_article(color)} {color} {animal}.",
            a.format(c=color, x=animal, v=verb, p=place, s=stem),
            "creative_writing",
        ),
        None,
        {"a": _article(color), "c": color, "x": animal},
    )


def _review_sentiment(rng: random.Random) -> Drawn:
    positive = rng.random() < 0.5
    dish = _pick(rng, DISHES)
    food_word = _pick(rng, GOOD_WORDS if positive else BAD_WORDS)
    staff_word = _pick(rng, GOOD_STAFF if positive else BAD_STAFF)
    review = _pick(rng, ("The {d} was {f} and the staff was {s}.", "Our {d} was {f}. The staff was {s}."))
    label = "positive" if positive else "negative"
    a = _pick(rng, ("{l}", "The review is {l}."))
    return (
        _rec(
            "Classify the sentiment of this review as positive or negative.",
            a.format(l=label),
            "classification",
            context=review.format(d=dish, f=food_word, s=staff_word),
        ),
        answers.choice("fact", label, ("positive", "negative")),
        {},
    )


# --- (c) compositional tasks -------------------------------------------------------------------------------
def _arith_chain(rng: random.Random) -> Drawn:
    a, b = rng.randrange(1, 20), rng.randrange(1, 20)
    c = rng.randrange(1, a + b + 1)
    x, r = a + b, a + b - c
    q = _pick(
        rng, ("Start with {a}. Add {b}, then subtract {c}. What is the result?", "What is {a} + {b} - {c}?")
    )
    return (
        _rec(q.format(a=a, b=b, c=c), f"{a} + {b} = {x}, {x} - {c} = {r}. The answer is {r}.", "closed_qa"),
        answers.number("arithmetic", r),
        {"a": str(a), "b": str(b), "c": str(c)},
    )


def _arith_mul(rng: random.Random) -> Drawn:
    a, b, c = rng.randrange(1, 10), rng.randrange(1, 10), rng.randrange(2, 6)
    x, r = a + b, (a + b) * c
    return (
        _rec(
            f"Compute ({a} + {b}) * {c}.",
            f"{a} + {b} = {x}, {x} * {c} = {r}. The answer is {r}.",
            "closed_qa",
        ),
        answers.number("arithmetic", r),
        {"a": str(a), "b": str(b), "c": str(c)},
    )


def _legs_total(rng: random.Random) -> Drawn:
    animal = _pick(rng, [a for a, v in ANIMALS.items() if v[0] != "fish"])
    n = rng.randrange(2, 6)
    legs = LEGS[ANIMALS[animal][0]]
    plural = PLURALS.get(animal, animal + "s")
    return (
        _rec(
            f"How many legs do {n} {plural} have in total?",
            f"{_cap(_article(animal))} {animal} has {legs} legs, so {n} {plural} have {n * legs} legs.",
            "closed_qa",
        ),
        answers.number("arithmetic", n * legs),
        {"n": str(n), "p": plural},
    )


def _word_list(rng: random.Random, lo: int = 3, hi: int = 5) -> list[str]:
    return rng.sample(LIST_WORDS, rng.randrange(lo, hi + 1))


def _reverse_list(rng: random.Random) -> Drawn:
    words = _word_list(rng)
    q = _pick(rng, ("Reverse the order of these words: {w}.", "Write these words in reverse order: {w}."))
    return (
        _rec(q.format(w=", ".join(words)), ", ".join(reversed(words)), "generation"),
        answers.sequence("list", words[::-1]),
        {"w": ", ".join(words)},
    )


def _sort_list(rng: random.Random) -> Drawn:
    words = _word_list(rng)
    return (
        _rec(f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(sorted(words)), "generation"),
        answers.sequence("list", sorted(words)),
        {"w": ", ".join(words)},
    )


# List operations a list task chains: (description, function).
LIST_OPS: tuple[tuple[str, Callable[[list[str]], list[str]]], ...] = (
    ("reverse them", lambda w: w[::-1]),
    ("sort them alphabetically", sorted),
    ("remove the first word", lambda w: w[1:]),
    ("remove the last word", lambda w: w[:-1]),
    ("write them in capital letters", lambda w: [x.upper() for x in w]),
    ("keep only the first two", lambda w: w[:2]),
)
TRAINING_LIST_CHAIN = 2  # the longest chain of LIST_OPS a training instruction asks for


def _two_list_ops(rng: random.Random) -> Drawn:
    words = _word_list(rng, 4, 5)
    (d1, f1), (d2, f2) = rng.sample(LIST_OPS, TRAINING_LIST_CHAIN)
    q = f"Take these words: {', '.join(words)}. First {d1}, then {d2}."
    out = f2(f1(words))
    return (
        _rec(q, ", ".join(out), "generation"),
        answers.sequence("list", out),
        {"w": ", ".join(words), "d1": d1, "d2": d2},
    )


def _spell(rng: random.Random) -> Drawn:
    word = _pick(rng, SPELL_WORDS)
    op = _pick(rng, ("forward", "backward", "backward_upper"))
    slots = {"w": word, "variant": op}
    if op == "forward":
        letters = " ".join(word)
        instruction = f"Spell the word {word} one letter at a time."
    elif op == "backward":
        letters = " ".join(reversed(word))
        instruction = f"Spell the word {word} backwards, one letter at a time."
    else:
        letters = " ".join(reversed(word)).upper()
        instruction = (
            f"Write the word {word} in capital letters, then spell it backwards one letter at a time."
        )
    return _rec(instruction, letters, "generation"), answers.sequence("list", letters.split()), slots


def _creature(rng: random.Random, names: tuple[str, ...] = NAMES) -> dict[str, str | int]:
    return {
        "name": _pick(rng, names),
        "color": _pick(rng, COLORS),
        "kind": _pick(rng, list(ANIMALS)),
        "home": _pick(rng, HABITATS),
        "food": _pick(rng, FOODS),
        "age": rng.randrange(3, 16),
    }


def _describe(rng: random.Random, c: dict[str, str | int]) -> str:
    sentences = [
        f"{c['name']} is {_article(str(c['color']))} {c['color']} {c['kind']}.",
        f"It lives in the {c['home']} and eats {c['food']}.",
        f"It is {c['age']} years old.",
    ]
    return " ".join([sentences[0], *rng.sample(sentences[1:], 2)])


def _creature_context(rng: random.Random, names: tuple[str, ...]) -> tuple[dict[str, str | int], str]:
    """An invented creature, described in the context, sometimes next to a distractor creature."""
    target = _creature(rng, names)
    parts = [_describe(rng, target)]
    if rng.random() < 0.5:
        other = _creature(rng, names)
        while other["name"] == target["name"]:
            other["name"] = _pick(rng, names)
        parts.insert(rng.randrange(2), _describe(rng, other))
    return target, " ".join(parts)


def _creature_lookup(rng: random.Random, names: tuple[str, ...] = NAMES) -> Drawn:
    c, ctx = _creature_context(rng, names)
    n = c["name"]
    field = _pick(rng, ("home", "food", "age", "color"))
    q, a = {
        "home": (
            f"Where does {n} live?",
            _pick(rng, (f"In the {c['home']}.", f"{n} lives in the {c['home']}.")),
        ),
        "food": (f"What does {n} eat?", _pick(rng, (f"{_cap(str(c['food']))}.", f"{n} eats {c['food']}."))),
        "age": (f"How old is {n}?", _pick(rng, (f"{c['age']}", f"{n} is {c['age']} years old."))),
        "color": (f"What color is {n}?", _pick(rng, (f"{c['color']}", f"{n} is {c['color']}."))),
    }[field]
    key = (
        answers.number("context", int(c["age"]))
        if field == "age"
        else answers.choice(
            "context", str(c[field]), {"home": HABITATS, "food": FOODS, "color": COLORS}[field]
        )
    )
    return _rec(q, a, "closed_qa", context=ctx), key, {"n": str(n), "variant": field}


def _creature_transform(rng: random.Random, names: tuple[str, ...] = NAMES) -> Drawn:
    c, ctx = _creature_context(rng, names)
    n, age, kind = c["name"], int(c["age"]), str(c["kind"])
    op = _pick(rng, ("older", "younger", "upper", "plural", "class", "fly"))
    slots = {"n": str(n), "variant": op}
    key: AnswerKey
    if op == "older":
        k = rng.randrange(2, 10)  # from 2: keeps "years" grammatical
        q, a = f"How old will {n} be in {k} years?", f"{n} is {age}, so in {k} years {n} will be {age + k}."
        key, slots["k"] = answers.number("context", age + k), str(k)
    elif op == "younger":
        k = rng.randrange(2, age)
        q, a = f"How old was {n} {k} years ago?", f"{n} is {age}, so {k} years ago {n} was {age - k}."
        key, slots["k"] = answers.number("context", age - k), str(k)
    elif op == "upper":
        q, a = f"What does {n} eat? Answer in capital letters.", str(c["food"]).upper()
        key = answers.sequence("context", [a])
    elif op == "plural":
        q, a = f"What kind of animal is {n}? Give the plural form.", PLURALS.get(kind, kind + "s")
        key = answers.sequence("context", [a])
    elif op == "class":
        cls = ANIMALS[kind][0]
        q, a = (
            f"Is {n} a mammal, a bird, a fish or an insect?",
            f"{n} is {_article(kind)} {kind}, so it is {_article(cls)} {cls}.",
        )
        key = answers.choice("context", cls, CLASSES)
    else:
        can = ANIMALS[kind][1]
        q, a = f"Can {n} fly?", f"{'Yes' if can else 'No'}, {n} is {_article(kind)} {kind}."
        key = answers.choice("context", "yes" if can else "no", ("yes", "no"))
    return _rec(q, a, "information_extraction", context=ctx), key, slots


def _extract_numbers(rng: random.Random, names: tuple[str, ...] = NAMES) -> Drawn:
    name = _pick(rng, names)
    owned = [PLURALS.get(a, a + "s") for a in ("cat", "dog", "duck", "cow", "bee")]
    px, py = rng.sample(owned, 2)
    m, k = rng.randrange(2, 30), rng.randrange(2, 30)
    ctx = f"{name} has {m} {px} and {k} {py}."
    if rng.random() < 0.5:
        return (
            _rec(
                "Extract all the numbers from the text.", f"{m}, {k}", "information_extraction", context=ctx
            ),
            answers.sequence("context", [str(m), str(k)]),
            {"variant": "extract"},
        )
    return (
        _rec(
            f"How many animals does {name} have in total?",
            f"{m} + {k} = {m + k}. The answer is {m + k}.",
            "information_extraction",
            context=ctx,
        ),
        answers.number("context", m + k),
        {"n": name, "variant": "total"},
    )


def _summarize(rng: random.Random, names: tuple[str, ...] = NAMES) -> Drawn:
    c = _creature(rng, names)
    ctx = _describe(rng, c)
    n, col, kind, home, food, age = c["name"], c["color"], c["kind"], c["home"], c["food"], c["age"]
    a = _pick(
        rng,
        (
            f"{n} is {_article(str(col))} {col} {kind} from the {home}.",
            f"{n}, {_article(str(col))} {col} {kind}, lives in the {home} and eats {food}.",
            f"The text is about {n}, {_article(str(age))} {age} year old {kind} in the {home}.",
        ),
    )
    q = _pick(rng, ("Summarize the text in one sentence.", "Give a one sentence summary of the text."))
    return _rec(q, a, "summarization", context=ctx), None, {}


# (name, relative weight, generator): the compositional tasks get more weight, they are what separates
# a teacher from a tiny student.
TASKS: tuple[tuple[str, int, _Task], ...] = (
    ("fruit_color", 1, _fruit_color),
    ("animal_sound", 1, _animal_sound),
    ("antonym", 1, _antonym),
    ("plural", 1, _plural),
    ("animal_class", 1, _animal_class),
    ("even_odd", 1, _even_odd),
    ("word_kind", 1, _word_kind),
    ("add_small", 1, _add_small),
    ("larger", 1, _larger),
    ("warm_cool_color", 1, _warm_cool_color),
    ("synonym", 1, _synonym),
    ("flying_animals", 1, _flying_animals),
    ("fruit_of_color", 1, _fruit_of_color),
    ("animal_of_habitat", 1, _animal_of_habitat),
    ("number_between", 1, _number_between),
    ("pet_name", 1, _pet_name),
    ("animal_sentence", 1, _animal_sentence),
    ("adjective_sentence", 1, _adjective_sentence),
    ("poem", 1, _poem),
    ("review_sentiment", 1, _review_sentiment),
    ("arith_chain", 2, _arith_chain),
    ("arith_mul", 1, _arith_mul),
    ("legs_total", 1, _legs_total),
    ("reverse_list", 1, _reverse_list),
    ("sort_list", 1, _sort_list),
    ("two_list_ops", 2, _two_list_ops),
    ("spell", 1, _spell),
    ("creature_lookup", 2, _creature_lookup),
    ("creature_transform", 3, _creature_transform),
    ("extract_numbers", 1, _extract_numbers),
    ("summarize", 2, _summarize),
)
TASK_FUNCTIONS: dict[str, _Task] = {name: fn for name, _, fn in TASKS}
_CUM_WEIGHTS = list(itertools.accumulate(w for _, w, _ in TASKS))


def draw(task: str, rng: random.Random, **kwargs: Any) -> DemoExample:
    """One example of `task` (a name of TASKS), its key naming the task; kwargs go to the task (names=)."""
    record, key, slots = TASK_FUNCTIONS[task](rng, **kwargs)
    return DemoExample(record, None if key is None else replace(key, task=task), task, slots)


def generate_demo_examples(num_records: int, seed: int) -> list[DemoExample]:
    """`num_records` examples, each from a task drawn from TASKS by weight; same seed, same list.

    The answer keys come from the same draws as the records (no extra random numbers), so the records are
    exactly those generate_demo_records always returned."""
    if num_records < 0:
        raise ConfigError(f"num_records must be >= 0, got {num_records}.")
    rng = random.Random(seed)
    names = [name for name, _, _ in TASKS]
    return [draw(rng.choices(names, cum_weights=_CUM_WEIGHTS)[0], rng) for _ in range(num_records)]


def generate_demo_records(num_records: int, seed: int) -> list[Record]:
    """`num_records` records, each from a task drawn from TASKS by weight; same seed, same list."""
    return [example.record for example in generate_demo_examples(num_records, seed)]
