"""Evaluation test sets: the config's held-out split, local JSONL files, `datasets` sources and the paper's
benchmark presets, all turned into `EvalExample`s (an instruction plus one or more reference responses).

A test-set spec (an entry of `evaluate.test_sets`) is one of
  * a preset name: dolly, selfinst, vicuna, sni, unni (the B-Distill / MiniLLM benchmarks);
  * a .jsonl / .json file: one object per line with `instruction`, optional `context` (or `input`) and the
    reference(s) as `response` / `output` (a string) or `references` / `outputs` (a list of strings: Rouge-L
    takes the max over them), optionally an `answer_key` (pipeline.data.answers.AnswerKey.to_dict) for
    task accuracy;
  * anything `pipeline.data.records.load_records` reads (a local dataset directory, a hub name already in the
    local Hugging Face cache), in Dolly format, split "test";
  * `NAME=SOURCE` for any of the above, to choose the column name in the results table.

With the demo data, the config's test split carries the generator's answer keys and the held-out demo sets
(pipeline.data.demo_eval_sets) are added (`demo_test_sets`). Examples without a key (user data) are scored
by Rouge-L alone: their test set has no accuracy columns.

What one config evaluates on, assembled before any model runs: `load_test_sets` (its test split, the demo's
held-out sets, `evaluate.test_sets`) and `load_multiple_choice_sets` (`evaluate.multiple_choice`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.data.answers import AnswerKey
from pipeline.data.demo_dataset import DemoExample
from pipeline.data.demo_eval_sets import HELDOUT_SETS, demo_answer_keys, generate_heldout
from pipeline.data.records import Record, load_records
from pipeline.data.stage import PreparedData, prepare_data
from pipeline.errors import ConfigError, DataError
from pipeline.evaluate.multiple_choice import DEMO_SET, MCItem, PromptStyle, load_mc_items


@dataclass(frozen=True)
class EvalExample:
    instruction: str
    context: str
    references: tuple[str, ...]
    category: str = ""
    answer: AnswerKey | None = (
        None  # what a correct response is (pipeline.evaluate.correctness); None: unknown
    )

    def to_record(self) -> Record:
        """The generation input (the prompt template only reads instruction and context)."""
        return Record(self.instruction, self.context, self.references[0], self.category)


@dataclass(frozen=True)
class EvalSet:
    name: str
    source: str
    examples: list[EvalExample]


@dataclass(frozen=True)
class Preset:
    display: str  # column name in results tables, as the paper writes it
    hub_id: str | None  # public source; None where no public copy with references exists
    config: str | None = None
    split: str = "test"
    note: str = ""


# The paper's general-field benchmarks (Table 1). Hub ids are the public originals; most need conversion
# (MiniLLM's processed test splits are distributed as files, not on the hub), hence the local-JSONL route.
PRESETS: dict[str, Preset] = {
    "dolly": Preset(
        "Dolly",
        "databricks/databricks-dolly-15k",
        split="train",
        note="the paper evaluates on a held-out 500-example Dolly test split (MiniLLM's)",
    ),
    "selfinst": Preset("SelfInst", "yizhongw/self_instruct", config="human_eval", split="train"),
    "vicuna": Preset(
        "Vicuna",
        None,
        note="the 80 Vicuna questions have no public reference answers on the hub (MiniLLM used GPT-4's)",
    ),
    "sni": Preset("S-NI", "Muennighoff/natural-instructions", split="test"),
    "unni": Preset("UnNI", "mrm8488/unnatural-instructions-core", split="train"),
}

_INSTRUCTION_KEYS = ("instruction", "prompt", "question")
_CONTEXT_KEYS = ("context", "input")
_SINGLE_REF_KEYS = ("response", "output", "answer")
_MULTI_REF_KEYS = ("references", "outputs", "responses", "targets")


def parse_spec(spec: str) -> tuple[str, str]:
    """(display name, source) of a test-set spec."""
    name, sep, source = spec.partition("=")
    if sep and name.strip() and source.strip():
        return name.strip(), source.strip()
    if spec.lower() in PRESETS:
        return PRESETS[spec.lower()].display, spec.lower()
    return Path(spec).stem if Path(spec).suffix else spec.rstrip("/").rsplit("/", 1)[-1], spec


def load_test_set(spec: str, max_examples: int | None = None) -> EvalSet:
    name, source = parse_spec(spec)
    if source.lower() in PRESETS:
        examples = _load_preset(source.lower())
    elif Path(source).suffix.lower() in (".jsonl", ".json"):
        examples = read_examples_jsonl(source)
    else:
        records, _ = load_records(source, split="test")
        examples = examples_from_records(records)
    if max_examples is not None:
        examples = examples[:max_examples]
    return EvalSet(name=name, source=source, examples=examples)


def examples_from_records(
    records: Sequence[Record], keys: Sequence[AnswerKey | None] | None = None
) -> list[EvalExample]:
    """One example per record, its reference the record's response, with `keys[i]` as its answer key."""
    keys = keys if keys is not None else [None] * len(records)
    return [
        EvalExample(r.instruction, r.context, (r.response,), r.category, key)
        for r, key in zip(records, keys, strict=True)
    ]


def demo_test_sets(num_examples: int, seed: int) -> list[EvalSet]:
    """The held-out demo sets (pipeline.data.demo_eval_sets), `num_examples` each, with their answer keys."""
    return [
        EvalSet(
            name, f"held-out demo set (seed {seed})", _examples_of(generate_heldout(name, num_examples, seed))
        )
        for name in HELDOUT_SETS
    ]


def _examples_of(examples: Iterable[DemoExample]) -> list[EvalExample]:
    examples = list(examples)
    return examples_from_records([e.record for e in examples], [e.key for e in examples])


def read_examples_jsonl(path: str | Path) -> list[EvalExample]:
    """Examples from a JSONL (or JSON list) file; a malformed row is a DataError naming file:line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"test set file {path} does not exist. Fix: check the path in evaluate.test_sets.")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        rows = [(f"{path}: item {i}", row) for i, row in enumerate(json.loads(text))]
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({exc}). Fix or delete that line."
                ) from None
    examples = [_example_from_row(row, where) for where, row in rows]
    if not examples:
        raise DataError(
            f"test set file {path} holds no examples. Fix: point evaluate.test_sets at a JSONL file."
        )
    return examples


def _example_from_row(row: Any, where: str) -> EvalExample:
    fix = (
        "Fix: each line needs a string 'instruction', an optional 'context' (or 'input') and a reference: "
        "'response' / 'output' (string) or 'references' / 'outputs' (list of strings)."
    )
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}. {fix}")
    instruction = _first(row, _INSTRUCTION_KEYS)
    context = _first(row, _CONTEXT_KEYS) or ""
    refs: list[str] = []
    for key in _MULTI_REF_KEYS + _SINGLE_REF_KEYS:
        value = row.get(key)
        if isinstance(value, str):
            refs = [value]
        elif isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
            refs = list(value)
        if refs:
            break
    refs = [r for r in refs if r.strip()]
    if (
        not isinstance(instruction, str)
        or not instruction.strip()
        or not isinstance(context, str)
        or not refs
    ):
        raise DataError(f"{where}: malformed test example (keys: {sorted(row)}). {fix}")
    category = row.get("category") if isinstance(row.get("category"), str) else ""
    return EvalExample(instruction, context, tuple(refs), category, _answer_key(row.get("answer_key"), where))


def _answer_key(raw: Any, where: str) -> AnswerKey | None:
    if raw is None:
        return None
    try:
        return AnswerKey.from_dict(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(
            f"{where}: malformed answer_key ({exc}). Fix: write it as AnswerKey.to_dict() does "
            "(family, kind, answer: [...], options: [...], count; pipeline/data/answers.py), or drop it."
        ) from None


def _first(row: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None


def _load_preset(key: str) -> list[EvalExample]:
    preset = PRESETS[key]
    how = (
        f"Fix: on a machine with internet, export the {preset.display} test set to a JSONL file "
        "(instruction, context, response -- or references: [...]) and list it in evaluate.test_sets as "
        f"'{key}=/path/to/{key}_test.jsonl'."
    )
    if preset.hub_id is None:
        raise DataError(f"test set preset {key!r} ({preset.display}): {preset.note}. {how}")
    try:
        import datasets

        ds = datasets.load_dataset(preset.hub_id, preset.config, split=preset.split)
    except Exception as exc:  # offline, not in the local cache, or the hub layout changed
        raise DataError(
            f"test set preset {key!r} ({preset.display}, hub id {preset.hub_id}) cannot be loaded: "
            f"{type(exc).__name__}: {str(exc)[:200]}. This machine may be offline (the pipeline never "
            f"downloads during a job). {how}"
        ) from None
    return [_example_from_row(row, f"{preset.hub_id} row {i}") for i, row in enumerate(ds)]


# --- a config's test sets ---------------------------------------------------------------------------------
def held_out_name(config: Config) -> str:
    src = config.data.source
    stem = (
        "demo"
        if src == "demo"
        else (Path(src).stem if Path(src).suffix else src.rstrip("/").rsplit("/", 1)[-1])
    )
    return f"{stem}-test"


def load_test_sets(config: Config, prepared: PreparedData | None = None) -> list[EvalSet]:
    """The config's test split (capped at evaluate.max_examples), the demo's held-out sets, then every
    `evaluate.test_sets` entry; names must differ and no set may be empty."""
    ev = config.evaluate
    test = (prepared or prepare_data(config)).splits.test
    if ev.max_examples is not None:
        test = test[: ev.max_examples]
    demo = config.data.source == "demo"
    # the demo generator's answer keys travel beside the records (never in the JSONL); user data has none
    keys = demo_answer_keys(test, config.data.num_demo_records, config.data.seed) if demo else None
    sets = [EvalSet(held_out_name(config), "config test split", examples_from_records(test, keys))]
    if ev.heldout_examples < 0:
        raise ConfigError(
            f"evaluate.heldout_examples={ev.heldout_examples} must be >= 0. Fix: --set "
            "evaluate.heldout_examples=100 (0: the test split alone)."
        )
    heldout = min(ev.heldout_examples, ev.max_examples or ev.heldout_examples)
    if demo and heldout > 0:
        sets += demo_test_sets(heldout, config.data.seed)
    sets += [load_test_set(spec, ev.max_examples) for spec in ev.test_sets]
    names = [s.name for s in sets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"test set name(s) {dupes} appear twice; name them with NAME=SOURCE in evaluate.test_sets"
        )
    empty = [s.name for s in sets if not s.examples]
    if empty:
        raise DataError(
            f"test set(s) {empty} have no examples. Fix: raise data.test_fraction or check "
            "evaluate.test_sets."
        )
    return sets


@dataclass(frozen=True)
class MCSet:
    name: str
    source: str
    style: PromptStyle
    items: list[MCItem]


def load_multiple_choice_sets(config: Config, test_sets: list[EvalSet]) -> list[MCSet]:
    """`evaluate.multiple_choice` (validated by pipeline.config); names must differ from the test sets'."""
    sets = []
    for spec in config.evaluate.multiple_choice:
        source = spec.path or (str(DEMO_SET) if spec.dataset == "demo" else str(spec.dataset))
        items = load_mc_items(source, spec.split, spec.limit)
        sets.append(MCSet(spec.name, source, spec.prompt_style, items))
    clash = sorted({s.name for s in sets} & {ts.name for ts in test_sets})
    if clash:
        raise ConfigError(
            f"multiple-choice set name(s) {clash} are also test-set names. Fix: rename them in "
            "evaluate.multiple_choice (name:)."
        )
    return sets
