"""Stage 3: generate responses for every (model x test example x sampling seed) with one Ray Data actor pool
for all models, the actors scoring them with Rouge-L (pipeline/evaluate/actor.py); the same actors score
every item of the multiple-choice sets (`evaluate.multiple_choice`: each option's log-likelihood,
pipeline.evaluate.multiple_choice) for accuracy. The test sets a config evaluates on come from
pipeline/evaluate/test_sets.py; which run a row describes, and when an earlier evaluation is reused, from
pipeline/evaluate/provenance.py.

    rows = (model, generation unit: up to batch_size test examples of one seed, or one multiple-choice item)
        --ray.data.from_items-->  map_batches(GeneratorActor, ActorPoolStrategy(size=num_actors), num_gpus,
        batch_size=1, resources)  -->  driver: tqdm over generations

Protocol (MiniLLM / DistiLLM / B-Distill): sampling at temperature 1, top-p 1, `evaluate.num_seeds` seeds,
Rouge-L of each generation against its reference(s) (max over references), mean over examples per seed,
then mean ± std (ddof=1) over seeds; `evaluate.greedy` decodes greedily with one seed. Empty generations
score 0 and are never dropped. Where a test example has an answer key (the demo's sets), the driver also
judges each generation correct or not (pipeline.evaluate.correctness: task accuracy, answer spread; the test
sets and the scorer: docs/evaluation.md).

Multiple-choice scoring samples nothing: one pass per item, no seeds; accuracy in percent per set.

Outputs under runs/<name>/eval/:
  <model>/predictions.jsonl  one line per (test set, example, seed): prompt, references, prediction, rouge_l,
                             and with an answer key: task, answer (as read from the prediction), correct
  <model>/multiple_choice.jsonl  one line per (multiple-choice set, item): options' log-likelihoods, picks
  <model>/results.csv|md     that model's rows; <model>/protocol.json (written last, provenance.py) makes a
                             rerun with the same checkpoint, protocol and test sets reuse them instead of
                             regenerating
  results.csv|md|png         the models of this call, plus earlier evaluated models under eval/ whose results
                             used the same protocol and test sets (CSV schema: pipeline/evaluate/results.py)
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, stable_hash
from pipeline.data.stage import prepare_data
from pipeline.errors import ConfigError, ModelError
from pipeline.evaluate.actor import GeneratorActor
from pipeline.evaluate.correctness import Scored, correctness_columns, score_response
from pipeline.evaluate.multiple_choice import ItemScore, accuracy
from pipeline.evaluate.provenance import (
    PROTOCOL_FILE,
    checkpoint_identity,
    describe_checkpoint,
    earlier_results,
    evaluation_protocol,
    reusable_results,
    write_protocol,
)
from pipeline.evaluate.results import format_results_markdown, write_results_csv, write_results_table
from pipeline.evaluate.test_sets import EvalSet, MCSet, load_multiple_choice_sets, load_test_sets
from pipeline.locks import run_lock
from pipeline.models.export import EXPORT_MARKER
from pipeline.models.weights_files import check_weight_files
from pipeline.placement import check_placement, evaluation_actor_options
from pipeline.workspace import paths_for

log = logging.getLogger(__name__)


@dataclass
class EvalResults:
    out_dir: Path
    # pipeline.evaluate.results schema, one per (model, test set): this call's models, then earlier ones
    # evaluated under the same protocol and test sets
    rows: list[dict[str, Any]]
    seed_scores: dict[tuple[str, str], list[float]]  # this call's (model, test set) -> per-seed means (%)
    csv_path: Path
    md_path: Path
    png_path: Path
    model_dirs: dict[str, Path] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)  # models whose earlier results were reused

    def score(self, model: str, test_set: str) -> tuple[float, float]:
        """(mean, std) Rouge-L in percent."""
        for row in self.rows:
            if row["model"] == model and row["test_set"] == test_set:
                return row["rouge_l_mean"], row["rouge_l_std"]
        raise KeyError((model, test_set))

    def accuracy(self, model: str, test_set: str) -> float:
        """Multiple-choice accuracy in percent."""
        for row in self.rows:
            if row["model"] == model and row["test_set"] == test_set and row.get("accuracy") is not None:
                return float(row["accuracy"])
        raise KeyError((model, test_set))

    def markdown(self) -> str:
        return format_results_markdown(self.rows)


# --- which models ------------------------------------------------------------------------------------------
def default_models(config: Config) -> dict[str, str]:
    """The fine-tuned teacher plus every finished student export (one with an export marker) of `config`."""
    paths = paths_for(config)
    models: dict[str, str] = {}
    if (paths.teacher_final / EXPORT_MARKER).is_file():
        models["teacher"] = str(paths.teacher_final)
    else:
        log.warning(
            "no fine-tuned teacher at %s (run `moedistill finetune-teacher`); skipping it",
            paths.teacher_final,
        )
    if paths.students.is_dir():
        for run_dir in sorted(p for p in paths.students.iterdir() if p.is_dir()):
            if (run_dir / "final" / EXPORT_MARKER).is_file():
                models[run_dir.name] = str(run_dir / "final")
    return models


def parse_model_args(specs: list[str]) -> dict[str, str]:
    """`--model NAME=PATH` (or just PATH: named after its directory) -> {name: path}."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = _dir_name(spec), spec
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ConfigError(
                f"--model expects NAME=PATH (e.g. teacher=runs/demo/teacher/final), got {spec!r}"
            )
        if name in models:
            raise ConfigError(f"--model name {name!r} is given twice; give each checkpoint its own name")
        models[name] = path
    return models


def _dir_name(path: str) -> str:
    p = Path(path.rstrip("/"))
    return p.parent.name if p.name == "final" and p.parent.name else p.name


def check_models(config: Config, models: dict[str, str]) -> dict[str, str]:
    if not models:
        raise ModelError(
            f"nothing to evaluate: no finished teacher or student exports under {paths_for(config).root}. "
            "Fix: run `moedistill finetune-teacher` / `moedistill distill` first, or pass --model NAME=PATH."
        )
    for name, path in models.items():
        if not Path(path).is_dir():
            raise ModelError(
                f"checkpoint {path!r} of model {name!r} is not a directory. Fix: check the path (checkpoints "
                "must be on storage every Ray node can read)."
            )
        check_weight_files(path, f"model {name!r} ({path})")  # named here, not inside a Ray task
    return models


def sampling_seeds(config: Config) -> list[int]:
    ev = config.evaluate
    if ev.greedy:
        return [0]  # greedy decoding is deterministic: one pass
    if ev.num_seeds < 1:
        raise ConfigError(f"evaluate.num_seeds must be >= 1, got {ev.num_seeds}")
    return list(range(ev.num_seeds))


def build_items(
    test_sets: list[EvalSet], seeds: list[int], mc_sets: Sequence[MCSet] = ()
) -> list[dict[str, Any]]:
    """Seed-major rows (generation_units chunks them into generate calls); then one row per
    multiple-choice item (`mc`: the item as JSON; "" on generation rows; its test_set indexes mc_sets)."""
    items: list[dict[str, Any]] = []
    for seed in seeds:
        for ts_index, ts in enumerate(test_sets):
            for ex_index, ex in enumerate(ts.examples):
                items.append(
                    {
                        "row_id": len(items),
                        "seed": seed,
                        "test_set": ts_index,
                        "example": ex_index,
                        "instruction": ex.instruction,
                        "context": ex.context,
                        "references": json.dumps(list(ex.references)),
                        "mc": "",
                    }
                )
    for set_index, mc_set in enumerate(mc_sets):
        for item_index, item in enumerate(mc_set.items):
            spec = {"question": item.question, "choices": list(item.choices), "answer": item.answer}
            items.append(
                {
                    "row_id": len(items),
                    "seed": 0,
                    "test_set": set_index,
                    "example": item_index,
                    "instruction": "",
                    "context": "",
                    "references": "[]",
                    "mc": json.dumps({**spec, "style": mc_set.style}),
                }
            )
    return items


# --- the stage ---------------------------------------------------------------------------------------------
def run_evaluate(config: Config, models: dict[str, str] | None = None, progress: bool = True) -> EvalResults:
    """Evaluate `models` ({name: checkpoint dir}; None: `default_models(config)`) on the test sets."""
    models = check_models(config, default_models(config) if models is None else models)
    prepared = prepare_data(config)
    test_sets = load_test_sets(config, prepared)
    mc_sets = load_multiple_choice_sets(config, test_sets)
    seeds = sampling_seeds(config)
    items = build_items(test_sets, seeds, mc_sets)
    eval_dir = paths_for(config).eval
    # One evaluation writes an output_dir's eval/ at a time: a second waits, then reuses what the first wrote.
    with run_lock(eval_dir, "evaluation outputs"):
        protocol = evaluation_protocol(config, test_sets, seeds, mc_sets)
        protocol_hash = stable_hash(protocol)
        finished: dict[str, tuple[list[dict[str, Any]], dict[str, list[float]]]] = {}
        pending: dict[str, tuple[str, str, str]] = {}  # name -> (checkpoint, tokenizer, fingerprint)
        model_dirs = {name: eval_dir / _safe(name) for name in models}
        for name, checkpoint in models.items():
            fingerprint = stable_hash({**protocol, "checkpoint": checkpoint_identity(checkpoint)})
            previous = reusable_results(model_dirs[name], fingerprint)
            if previous is not None:
                same = "same checkpoint, protocol and test sets"
                print(f"[evaluate] {name}: reusing {model_dirs[name]} ({same})")
                finished[name] = previous
            else:
                tokenizer_path = checkpoint if _has_tokenizer(checkpoint) else prepared.tokenizer_path
                pending[name] = (checkpoint, tokenizer_path, fingerprint)
        if pending:
            outputs = _generate(config, {n: (c, t) for n, (c, t, _) in pending.items()}, items, progress)
            for name, (checkpoint, _, fingerprint) in pending.items():
                finished[name] = _score_and_write(
                    name, checkpoint, test_sets, seeds, items, outputs[name], model_dirs[name], mc_sets
                )
                write_protocol(model_dirs[name], fingerprint, protocol_hash, finished[name][1])
        rows = [row for name in models for row in finished[name][0]]
        rows += earlier_results(eval_dir, protocol_hash, exclude={model_dirs[n].name for n in models})
        seed_scores = {(name, ts): s for name in models for ts, s in finished[name][1].items()}
        reused = [name for name in models if name not in pending]
        eval_dir.mkdir(parents=True, exist_ok=True)
        csv_path = write_results_csv(rows, eval_dir / "results.csv")
        keyed = any(ex.answer is not None for ts in test_sets for ex in ts.examples)
        title = (
            f"{config.name}: Rouge-L"
            + (", task accuracy" if keyed else "")
            + (", accuracy" if mc_sets else "")
        )
        md_path, png_path = write_results_table(rows, eval_dir, title=title)
        return EvalResults(eval_dir, rows, seed_scores, csv_path, md_path, png_path, model_dirs, reused)


def generation_units(items: list[dict[str, Any]], size: int) -> list[list[int]]:
    """The item indices each generate call covers: consecutive generation items of one (seed, test set) in
    chunks of `size`, and every multiple-choice item alone.

    A sampled generation depends on the whole batch it is generated in (one RNG stream, shared padding), so
    the batches are fixed here, by the test sets alone, and travel as single Ray Data rows: a model's
    results cannot depend on the other models evaluated beside it or on Ray Data's block boundaries."""
    units: list[list[int]] = []
    for index, item in enumerate(items):
        previous = items[units[-1][0]] if units else None
        if (
            item["mc"]
            or previous is None
            or previous["mc"]
            or (previous["seed"], previous["test_set"]) != (item["seed"], item["test_set"])
            or len(units[-1]) >= size
        ):
            units.append([index])
        else:
            units[-1].append(index)
    return units


def _generate(
    config: Config,
    checkpoints: dict[str, tuple[str, str]],
    items: list[dict[str, Any]],
    progress: bool,
) -> dict[str, dict[int, tuple[str, float, str]]]:
    """name -> row_id -> (prediction, rouge_l in [0, 1], mc_scores) for every (model, item), from one actor
    pool (mc_scores: a multiple-choice row's option scores as JSON, "" on generation rows).

    Rows are (model, generation unit), model-major, so each actor switches checkpoints about once per model
    instead of the pool being torn down and started again for every model.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    ev = config.evaluate
    check_placement(dict(ev.resources), what="evaluation actors (evaluate.resources)")
    names = list(checkpoints)
    # Actors may run in another working directory (a cluster node): absolute paths for local checkpoints.
    resolved = [
        tuple(str(Path(p).resolve()) if Path(p).exists() else p for p in checkpoints[n]) for n in names
    ]
    units = generation_units(items, ev.batch_size)
    rows = [
        {
            "row_id": m * len(units) + u,
            "model": m,
            "seed": items[members[0]]["seed"],
            "first_item": members[0],
            "members": json.dumps(members),
            "prompts": json.dumps([[items[i]["instruction"], items[i]["context"]] for i in members]),
            "references": json.dumps([json.loads(items[i]["references"]) for i in members]),
            "mc": items[members[0]]["mc"],
        }
        for m in range(len(names))
        for u, members in enumerate(units)
    ]
    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars)
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False  # ours counts finished rows
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 32 * max(1, ev.num_actors))))
    ds = ds.map_batches(
        GeneratorActor,
        fn_constructor_kwargs={
            "checkpoints": resolved,
            "max_new_tokens": ev.max_new_tokens,
            "greedy": ev.greedy,
            "temperature": ev.temperature,
            "top_p": ev.top_p,
        },
        compute=ActorPoolStrategy(size=max(1, ev.num_actors)),
        batch_size=1,  # one row = one generate call of up to evaluate.batch_size prompts
        **evaluation_actor_options(config),
    )
    outputs: dict[str, dict[int, tuple[str, float, str]]] = {n: {} for n in names}
    try:
        desc = f"evaluate {len(names)} model(s)"
        total = len(names) * len(items)
        with tqdm(total=total, desc=desc, unit="gen", disable=not progress) as bar:
            for row in ds.iter_rows():
                model = int(row["model"])
                members = json.loads(str(row["members"]))
                predictions = json.loads(str(row["predictions"]))
                scores = json.loads(str(row["rouge_l"]))
                for item, prediction, score in zip(members, predictions, scores, strict=True):
                    outputs[names[model]][item] = (prediction, float(score), str(row["mc_scores"]))
                bar.update(len(members))
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars = saved
    for name in names:
        if len(outputs[name]) != len(items):
            raise ModelError(
                f"evaluation of {name!r} returned {len(outputs[name])} of {len(items)} rows; rerun it"
            )
    return outputs


def _score_and_write(
    name: str,
    checkpoint: str,
    test_sets: list[EvalSet],
    seeds: list[int],
    items: list[dict[str, Any]],
    outputs: dict[int, tuple[str, float, str]],
    model_dir: Path,
    mc_sets: Sequence[MCSet] = (),
) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / PROTOCOL_FILE).unlink(missing_ok=True)  # invalid until everything below is written
    per_seed: dict[tuple[int, int], list[float]] = {}
    scored: dict[int, dict[int, list[Scored]]] = {i: {} for i in range(len(test_sets))}
    empty: dict[int, int] = {}
    tmp = model_dir / "predictions.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for item in items:
            if item["mc"]:
                continue
            prediction, score, _ = outputs[item["row_id"]]
            ts = test_sets[item["test_set"]]
            per_seed.setdefault((item["test_set"], item["seed"]), []).append(score)
            empty[item["test_set"]] = empty.get(item["test_set"], 0) + (not prediction.strip())
            ex = ts.examples[item["example"]]
            check = {}
            if ex.answer is not None:
                judged = score_response(prediction, ex.answer)
                scored[item["test_set"]].setdefault(item["seed"], []).append(judged)
                check = {"task": ex.answer.task, "answer": list(judged.answer), "correct": judged.correct}
            line = {
                "model": name,
                "test_set": ts.name,
                "example_id": item["example"],
                "seed": item["seed"],
                "instruction": ex.instruction,
                "context": ex.context,
                "references": list(ex.references),
                "prediction": prediction,
                "rouge_l": score,
                **check,
            }
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    tmp.replace(model_dir / "predictions.jsonl")
    info = describe_checkpoint(name, checkpoint)
    rows, seed_scores = [], {}
    for ts_index, ts in enumerate(test_sets):
        means = [100.0 * statistics.fmean(per_seed[ts_index, s]) for s in seeds]
        seed_scores[ts.name] = means
        rows.append(
            {
                **info,
                "test_set": ts.name,
                "num_examples": len(ts.examples),
                "num_seeds": len(seeds),
                "rouge_l_mean": statistics.fmean(means),
                "rouge_l_std": statistics.stdev(means) if len(means) > 1 else 0.0,
                "empty_rate": empty.get(ts_index, 0) / (len(ts.examples) * len(seeds)),
                **correctness_columns(scored[ts_index]),
            }
        )
    if mc_sets:
        rows += [{**info, **row} for row in _score_choices(mc_sets, items, outputs, model_dir, name)]
    write_results_csv(rows, model_dir / "results.csv")
    (model_dir / "results.md").write_text(format_results_markdown(rows, title=f"{name}: Rouge-L"))
    return rows, seed_scores


def _score_choices(
    mc_sets: Sequence[MCSet],
    items: list[dict[str, Any]],
    outputs: dict[int, tuple[str, float, str]],
    model_dir: Path,
    name: str,
) -> list[dict[str, Any]]:
    """Accuracy rows (percent) per multiple-choice set from the actors' option scores, and
    <model>/multiple_choice.jsonl with every item's option log-likelihoods and picks."""
    scores: dict[int, list[ItemScore]] = {i: [] for i in range(len(mc_sets))}
    tmp = model_dir / "multiple_choice.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in (r for r in items if r["mc"]):
            mc_set, item = mc_sets[row["test_set"]], mc_sets[row["test_set"]].items[row["example"]]
            got = json.loads(outputs[row["row_id"]][2])
            score = ItemScore(tuple(got["logprob_sum"]), tuple(got["tokens"]), item.answer)
            scores[row["test_set"]].append(score)
            line = {
                "model": name,
                "test_set": mc_set.name,
                "example_id": row["example"],
                "question": item.question,
                "choices": list(item.choices),
                "answer": item.answer,
                "option_logprob_sum": list(score.option_logprob_sum),
                "option_tokens": list(score.option_tokens),
                "pred": score.pred,
                "pred_norm": score.pred_norm,
            }
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    tmp.replace(model_dir / "multiple_choice.jsonl")
    rows = []
    for index, mc_set in enumerate(mc_sets):
        acc = accuracy(scores[index])
        rows.append(
            {
                "test_set": mc_set.name,
                "num_examples": len(mc_set.items),
                "accuracy": 100.0 * acc["acc"],
                "accuracy_norm": 100.0 * acc["acc_norm"],
            }
        )
    return rows


def _has_tokenizer(checkpoint: str) -> bool:
    return any((Path(checkpoint) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name) or "model"
