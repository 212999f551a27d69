"""Evaluation: Rouge-L against rouge-score, test-set loading, and the Ray Data generation stage end to end on
real tiny Qwen3-MoE checkpoints (one module-scoped local Ray cluster)."""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import pytest
from rouge_score import rouge_scorer
from support.paths import TINY
from support.tiny import demo_tokenizer, tiny_arch, tiny_moe

from pipeline.cli import evaluate_models
from pipeline.config import load_config, with_overrides
from pipeline.data.rouge import mean_rouge_l, rouge_l
from pipeline.data.stage import prepare_data
from pipeline.distill.stage import run_settings
from pipeline.errors import ConfigError, DataError
from pipeline.evaluate.provenance import describe_checkpoint
from pipeline.evaluate.results import read_results_csv
from pipeline.evaluate.stage import default_models, generation_units, parse_model_args, run_evaluate
from pipeline.evaluate.test_sets import load_test_set, read_examples_jsonl
from pipeline.run_identity import claim_run_dir


# --- Rouge-L ------------------------------------------------------------------------------------------------
def test_rouge_l_matches_rouge_score_and_scores_empty_as_zero() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pred, ref = "The cats are running in the garden", "the cat runs in a garden today"
    assert rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)
    # stemmed LCS "the cat run in garden": 5 of 7 tokens each side
    assert rouge_l(pred, ref) == pytest.approx(5 / 7)
    refs = ["completely unrelated words", ref, "the cats are running in the garden"]
    assert rouge_l(pred, refs) == pytest.approx(1.0)  # max over references
    assert rouge_l(pred, refs[:2]) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)
    assert rouge_l("", ref) == 0.0 and rouge_l("   \n", refs) == 0.0
    # An empty generation counts as 0 in the mean, it is never dropped.
    assert mean_rouge_l([pred, ""], [refs, ref]) == pytest.approx(0.5)


# --- test sets ----------------------------------------------------------------------------------------------
def test_test_set_files_presets_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    rows = [
        {"instruction": "Add 2 and 3.", "context": "", "response": "5", "category": "math"},
        {"instruction": "Name a colour.", "input": "", "references": ["red", "blue"]},
        {"instruction": "Say hi.", "output": "hi"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ts = load_test_set(f"Mine={path}", max_examples=2)
    assert ts.name == "Mine" and len(ts.examples) == 2
    assert ts.examples[1].references == ("red", "blue")
    assert load_test_set(str(path)).name == "mine"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed"):
        read_examples_jsonl(bad)
    for preset in ("sni", "vicuna"):  # offline: a clear error naming the preset and the local-JSONL fix
        with pytest.raises(DataError, match=rf"preset '{preset}'.*JSONL.*evaluate\.test_sets"):
            load_test_set(preset)


def test_model_args() -> None:
    assert parse_model_args(["t=/a/teacher/final", "/b/students/kd-run/final"]) == {
        "t": "/a/teacher/final",
        "kd-run": "/b/students/kd-run/final",
    }
    with pytest.raises(ConfigError, match="twice"):
        parse_model_args(["a=/x", "a=/y"])


# --- the Ray Data stage -------------------------------------------------------------------------------------
# One layer, top-1 over 2 experts; positions and init are TinyMoEConfig's defaults.
CHECKPOINT_ARCH = tiny_arch(
    num_layers=1, num_experts=2, top_k=1, num_heads=2, num_kv_heads=1, head_dim=16,
    max_position_embeddings=256, initializer_range=0.02,
)  # fmt: skip


def _save_checkpoint(out: Path, tokenizer, info: dict, seed: int, always_empty: bool = False) -> Path:
    model = tiny_moe(CHECKPOINT_ARCH, seed=seed, tokenizer=tokenizer)
    if always_empty:  # every token but eos suppressed: each generation decodes to ""
        model.generation_config.suppress_tokens = [
            i for i in range(len(tokenizer)) if i != tokenizer.eos_token_id
        ]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "moedistill_export.json").write_text(json.dumps(info))
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("eval")
    config = with_overrides(
        load_config(TINY),
        {
            "output_dir": str(root / "run"),
            "evaluate.max_examples": 6,
            "evaluate.num_seeds": 2,
            "evaluate.max_new_tokens": 6,
            "evaluate.batch_size": 4,
        },
    )
    prepared = prepare_data(config)
    tokenizer = demo_tokenizer(prepared.splits.train, root / "tok", vocab_size=300)
    teacher = _save_checkpoint(
        root / "run" / "teacher" / "final", tokenizer, {"stage": "finetune-teacher"}, 0
    )
    (teacher.parent / "finetune_summary.json").write_text(json.dumps({"after": {"val_loss": 3.5}}))
    run = root / "run" / "students" / "kd-k3-a0.2-b0.1-e2-s0"
    _save_checkpoint(run / "final", tokenizer, {"stage": "distill", "method": "kd"}, 1, always_empty=True)
    (run / "summary.json").write_text(json.dumps({"run_name": run.name, "method": "kd", "val_loss": 4.25}))
    # The run's identity as `moedistill distill` records it: evaluation reads it there, never from the name.
    settings = {"distill.method": "kd", "distill.k": 3, "distill.alpha": 0.2, "distill.beta": 0.1}
    distilled = with_overrides(config, {**settings, "distill.train.seed": 0})
    claim_run_dir(run, run_settings(distilled, "key"), what="student run", fix="")
    (root / "run" / "students" / "unfinished" / "final").mkdir(parents=True)  # no export marker: skipped
    return config, root


@pytest.mark.usefixtures("ray_cluster")
def test_run_evaluate_through_the_actor_pool(workspace) -> None:
    config, root = workspace
    # user data beside the demo's sets: a JSONL test set without answer keys
    user = root / "user.jsonl"
    user.write_text(json.dumps({"instruction": "Name a warm color.", "response": "red"}) + "\n")
    config = with_overrides(config, {"evaluate.test_sets": [f"user={user}"]})
    assert list(default_models(config)) == ["teacher", "kd-k3-a0.2-b0.1-e2-s0"]
    results = run_evaluate(config, progress=False)
    student = "kd-k3-a0.2-b0.1-e2-s0"
    sets = ("demo-test", "paraphrase", "composition", "entities", "user")
    assert {(r["model"], r["test_set"]) for r in results.rows} == {
        (m, ts) for m in ("teacher", student) for ts in sets
    }
    teacher_row = next(r for r in results.rows if r["model"] == "teacher")
    assert teacher_row["num_examples"] == 6 and teacher_row["num_seeds"] == 2
    assert teacher_row["method"] == "teacher" and teacher_row["val_loss"] == 3.5
    seeds = results.seed_scores["teacher", "demo-test"]
    assert len(seeds) == 2
    mean, std = results.score("teacher", "demo-test")
    assert mean == pytest.approx(sum(seeds) / 2) and std == pytest.approx(abs(seeds[0] - seeds[1]) / 2**0.5)

    # Every (example, seed) is in predictions.jsonl, scored against its reference with rouge_l.
    every = [json.loads(x) for x in (root / "run/eval/teacher/predictions.jsonl").read_text().splitlines()]
    assert len(every) == (6 * 4 + 1) * 2
    lines = [x for x in every if x["test_set"] == "demo-test"]
    assert len(lines) == 6 * 2 and {x["seed"] for x in lines} == {0, 1}
    for x in lines:
        assert x["rouge_l"] == pytest.approx(rouge_l(x["prediction"], x["references"]))
    # ... and, where the example has an answer key, judged against it; the rows' task accuracy is their mean.
    for ts in sets[:4]:
        judged = [x["correct"] for x in every if x["test_set"] == ts and "correct" in x]
        row = next(r for r in results.rows if r["model"] == "teacher" and r["test_set"] == ts)
        assert judged and row["task_accuracy"] == pytest.approx(100 * sum(judged) / len(judged))
    assert not [x for x in every if x["test_set"] == "user" and "correct" in x]
    user_rows = [r for r in results.rows if r["test_set"] == "user"]
    assert all(r.get("task_accuracy") is None and r.get("answer_coverage") is None for r in user_rows)
    per_seed = [100 * sum(x["rouge_l"] for x in lines if x["seed"] == s) / 6 for s in (0, 1)]
    assert [x["prediction"] for x in lines if x["seed"] == 0] != [
        x["prediction"] for x in lines if x["seed"] == 1
    ]
    assert per_seed == pytest.approx(seeds)

    # The always-empty student: every generation is "", scored 0 and kept.
    row = next(r for r in results.rows if r["model"] == student)
    assert row["rouge_l_mean"] == 0.0 and row["empty_rate"] == 1.0 and row["num_examples"] == 6
    assert row["task_accuracy"] == 0.0  # an empty answer is wrong, never skipped
    assert (row["method"], row["k"], row["alpha"], row["beta"], row["student_experts"], row["seed"]) == (
        "kd",
        3,
        0.2,
        0.1,
        2,
        0,
    )
    assert row["val_loss"] == 4.25

    # Files: per-model and combined CSV/markdown, PNG chart.
    for path in (
        results.csv_path,
        results.md_path,
        results.png_path,
        root / "run/eval" / student / "results.md",
    ):
        assert path.is_file() and path.stat().st_size > 0
    with open(results.csv_path) as fh:
        assert len(list(csv.DictReader(fh))) == 2 * len(sets)
    assert "demo-test (task acc.)" in results.md_path.read_text()
    assert "user (task acc.)" not in results.md_path.read_text()
    assert read_results_csv(results.csv_path)[0]["rouge_l_mean"] == pytest.approx(mean)
    assert f"{mean:.2f} ± {std:.2f}" in results.md_path.read_text()

    # The same request again (through the CLI entry) reuses the finished results instead of regenerating.
    args = argparse.Namespace(model=[f"teacher={root / 'run/teacher/final'}"])
    again = evaluate_models(config, args.model)
    assert again.reused == ["teacher"] and again.score("teacher", "demo-test") == pytest.approx((mean, std))
    # The combined table keeps the student evaluated earlier under the same protocol.
    assert list(dict.fromkeys(r["model"] for r in again.rows)) == ["teacher", student]


def test_generation_units_are_fixed_chunks_of_one_seed_and_test_set() -> None:
    def gen(seed: int, test_set: int) -> dict:
        return {"seed": seed, "test_set": test_set, "mc": ""}

    items = [gen(0, 0)] * 5 + [gen(0, 1)] * 2 + [gen(1, 0)] * 3 + [{"seed": 0, "test_set": 0, "mc": "{}"}] * 2
    assert generation_units(items, 2) == [[0, 1], [2, 3], [4], [5, 6], [7, 8], [9], [10], [11]]


@pytest.mark.usefixtures("ray_cluster")
def test_sampled_results_do_not_depend_on_the_models_evaluated_beside(workspace) -> None:
    """A model's sampled generations are the same whether it is evaluated alone or after another model, with
    an example count that is no multiple of the batch size (Ray Data batches would straddle models)."""
    config, root = workspace
    teacher = str(root / "run/teacher/final")
    student = str(root / "run/students/kd-k3-a0.2-b0.1-e2-s0/final")

    def predictions(tag: str, models: dict[str, str]) -> list[str]:
        overrides = {
            "output_dir": str(root / tag),
            "evaluate.max_examples": 5,
            "evaluate.heldout_examples": 0,
        }
        cfg = with_overrides(config, overrides)
        run_evaluate(cfg, models, progress=False)
        lines = (root / tag / "eval/teacher/predictions.jsonl").read_text().splitlines()
        return [json.loads(x)["prediction"] for x in lines]

    alone = predictions("alone", {"teacher": teacher})
    assert predictions("beside", {"student": student, "teacher": teacher}) == alone
    assert len(alone) == 5 * 2 and len(set(alone)) > 1


def test_describe_checkpoint_without_run_metadata(tmp_path: Path) -> None:
    (tmp_path / "some-run" / "final").mkdir(parents=True)
    info = describe_checkpoint("x", str(tmp_path / "some-run" / "final"))
    assert info["model"] == "x" and info.get("k") is None


# --- multiple choice through the stage ---------------------------------------------------------------------
HAND_MC = [  # demo-world questions; the answer is an index or a letter (fmt: skip keeps the rows short)
    {"question": "What color is a lemon?", "choices": ["It is yellow.", "It is blue."], "answer": 0},
    {"question": "Is 7 even or odd?", "A": "even", "B": "odd", "answer": "B"},
    {"question": "What does a cow say?", "choices": ["It says hoot.", "It says moo.", "It says caw."],
     "answer": 1},
]  # fmt: skip


@pytest.mark.usefixtures("ray_cluster")
def test_multiple_choice_accuracy_rows_through_the_stage(workspace) -> None:
    from pipeline.data.stage import load_tokenizer
    from pipeline.evaluate.multiple_choice import DEMO_SET, evaluate_multiple_choice, load_mc_items
    from pipeline.flows import write_seed_tables
    from pipeline.models.build import load_causal_lm

    config, root = workspace
    hand = root / "hand-mc.jsonl"
    hand.write_text("\n".join(json.dumps(r) for r in HAND_MC) + "\n")
    mc_config = with_overrides(
        config,
        {
            "output_dir": str(root / "mc-run"),  # its own eval dir: the first test's results stay as they are
            "evaluate.num_seeds": 1,
            "evaluate.max_examples": 2,
            "evaluate.heldout_examples": 0,  # the test split alone beside the multiple-choice sets
            "evaluate.multiple_choice": [
                {"name": "hand", "path": str(hand)},
                {"name": "demo-mc", "dataset": "demo", "limit": 4, "prompt_style": "response"},
            ],
        },
    )
    student = "kd-k3-a0.2-b0.1-e2-s0"
    models = {"teacher": str(root / "run/teacher/final"), student: str(root / "run/students" / student)}
    models[student] += "/final"
    results = run_evaluate(mc_config, models, progress=False)
    mc_rows = [r for r in results.rows if r.get("accuracy") is not None]
    expected_sets = {(m, s) for m in models for s in ("hand", "demo-mc")}
    assert {(r["model"], r["test_set"]) for r in mc_rows} == expected_sets
    assert all(r.get("rouge_l_mean") is None and r.get("num_seeds") is None for r in mc_rows)
    assert {r["test_set"] for r in results.rows if r.get("rouge_l_mean") is not None} == {"demo-test"}
    # The actors' accuracy is the module's on the same checkpoint, items and prompt style.
    sets = {
        "hand": (load_mc_items(str(hand)), "plain"),
        "demo-mc": (load_mc_items(str(DEMO_SET), limit=4), "response"),
    }
    for name, path in models.items():
        model, tok = load_causal_lm(path), load_tokenizer(path)
        for ts, (items, style) in sets.items():
            expected = evaluate_multiple_choice(model, tok, {ts: items}, style)[ts]
            row = next(r for r in mc_rows if r["model"] == name and r["test_set"] == ts)
            assert row["num_examples"] == len(items)
            assert row["accuracy"] == pytest.approx(100 * expected["acc"])
            assert row["accuracy_norm"] == pytest.approx(100 * expected["acc_norm"])
            assert results.accuracy(name, ts) == row["accuracy"]
    lines = (root / "mc-run/eval/teacher/multiple_choice.jsonl").read_text().splitlines()
    assert len(lines) == 3 + 4 and json.loads(lines[1])["answer"] == 1  # "B" -> 1

    # CSV and markdown: accuracy columns after the Rouge-L one; the student's row is the best non-teacher.
    on_disk = [r for r in read_results_csv(results.csv_path) if r["test_set"] == "hand"]
    in_memory = [r["accuracy"] for r in mc_rows if r["test_set"] == "hand"]
    assert [r["accuracy"] for r in on_disk] == pytest.approx(in_memory)
    header = results.md_path.read_text().splitlines()[2]
    # the demo test split is a column group (Rouge-L, task accuracy against its answer keys)
    assert header == "| Model | demo-test | demo-test (task acc.) | hand (acc.) | demo-mc (acc.) |", header
    # Training seeds aggregate like Rouge-L: mean ± std over the runs; seeds.md gets an accuracy table.
    seeded = []
    for seed, shift in ((0, 0.0), (1, 10.0), (2, 20.0)):
        for r in results.rows:
            if r["model"] == student:
                acc = None if r.get("accuracy") is None else min(100.0, r["accuracy"] + shift)
                seeded.append({**r, "model": f"kd-s{seed}", "seed": seed, "accuracy": acc,
                               "val_loss": 4.0 + seed})  # fmt: skip
    rows = [r for r in results.rows if r["model"] == "teacher"] + seeded
    from pipeline.evaluate.results import format_results_markdown

    kd_line = next(x for x in format_results_markdown(rows).splitlines() if x.startswith("| kd"))
    hand_accs = [r["accuracy"] for r in seeded if r["test_set"] == "hand"]
    mean, std = sum(hand_accs) / 3, statistics.stdev(hand_accs)
    assert f"{mean:.2f} ± {std:.2f} (n=3)" in kd_line, kd_line
    seeds_md = write_seed_tables(rows, root / "mc-run").read_text()
    assert "multiple-choice accuracy" in seeds_md and "task accuracy" in seeds_md, seeds_md
    # Unchanged checkpoints and sets: the next call reuses every model's results, accuracy included.
    again = run_evaluate(mc_config, models, progress=False)
    assert sorted(again.reused) == sorted(models)
    assert again.accuracy(student, "demo-mc") == results.accuracy(student, "demo-mc")


def test_multiple_choice_config_errors_name_the_fix(tmp_path: Path) -> None:
    bad_suffix = tmp_path / "mc.txt"
    bad_suffix.write_text("x")
    cases = [
        ([{"name": "x"}], "exactly one of path"),
        ([{"name": "x", "path": str(tmp_path / "missing.jsonl")}], "does not exist"),
        ([{"name": "x", "path": str(bad_suffix)}], "not a .jsonl"),
        ([{"name": "a", "dataset": "demo"}, {"name": "a", "dataset": "demo"}], "used twice"),
        ([{"name": "x", "dataset": "demo", "prompt_style": "chat"}], "allowed values"),
    ]
    for sets, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(TINY, {"evaluate.multiple_choice": sets})


def test_a_held_evaluation_lock_stops_a_second_evaluation_before_it_writes(
    workspace, monkeypatch: pytest.MonkeyPatch
) -> None:  # issue 24, probe 4: one writer per output_dir/eval
    from pipeline.errors import CacheError
    from pipeline.locks import RUN_LOCK_FILE, WAIT_ENV, run_lock
    from pipeline.workspace import paths_for

    config, _ = workspace
    eval_dir = paths_for(config).eval
    before = sorted(p.relative_to(eval_dir) for p in eval_dir.rglob("*")) if eval_dir.exists() else []
    monkeypatch.setenv(WAIT_ENV, "0")
    busy = r"another run is writing the evaluation outputs .*pid \d+.*Fix: wait"
    with run_lock(eval_dir, "evaluation outputs"), pytest.raises(CacheError, match=busy):
        run_evaluate(config, progress=False)
    after = sorted(p.relative_to(eval_dir) for p in eval_dir.rglob("*") if p.name != RUN_LOCK_FILE)
    assert after == [p for p in before if p.name != RUN_LOCK_FILE]  # nothing written while it was held
    assert not (eval_dir / RUN_LOCK_FILE).exists()
