"""Results tables (Rouge-L, and accuracy on multiple-choice sets): one CSV schema shared by `moedistill
evaluate` and sweep runners, rendered as a markdown table (methods x test sets, "mean ± std", paper style)
and a grouped bar chart.

CSV schema (RESULT_COLUMNS, one row per evaluated model and test set; empty cell = not applicable). A
generation test set's row has the rouge_l_* columns, a multiple-choice set's (evaluate.multiple_choice) the
accuracy ones; every row needs one of rouge_l_mean and accuracy:

  model            display name of the evaluated checkpoint (e.g. "teacher", a student run name)    required
  method           distillation method ("teacher", "sft", "kd", "b-distill", ...); empty: use model
  setting          free-form ablation label ("K=3", "4->2", a sweep's grid point "lambda_mc=0.5", ...);
                   joins method in the row label (format_setting builds one from dotted config keys)
  k, alpha, beta   B-Distill MC length / MC damping / ERD entropy weight of the run
  student_experts  E_S of the student
  seed             training seed of the run (several seeds of one method+setting are aggregated)
  test_set         test-set name (a column of the table)                                            required
  num_examples     test examples (prompts or multiple-choice items) scored
  num_seeds        sampling seeds per example (1 for greedy decoding; empty for multiple choice)
  rouge_l_mean     Rouge-L F1 in percent (0-100), mean over sampling seeds of the per-seed mean
  rouge_l_std      std (ddof=1) over sampling seeds of the per-seed mean, percent; 0 for one seed
  empty_rate       fraction of empty generations (scored 0, never dropped)
  accuracy         multiple-choice accuracy in percent: the option of highest summed log-likelihood
  accuracy_norm    the same with the per-token mean log-likelihood (length normalised)
  task_accuracy    percent of sampled responses judged correct against their answer keys
                   (pipeline/evaluate/correctness.py), mean over sampling seeds; empty when the test set has
                   no answer keys (user data); task_accuracy_std: its std (ddof=1) over seeds
  task_accuracy.<family>  the same per task family (pipeline.data.answers.FAMILIES), seeds pooled
  answer_coverage, answer_kl  several-answer tasks: share of the valid answers given (percent) and KL (nats)
                   of the model's answer distribution to the generator's; *_generator: the generator's own
                   values at the same number of answers
  val_loss         the model's validation loss (response-token cross-entropy), when known
  checkpoint       path of the evaluated checkpoint

Extra columns are kept when reading and writing. Table rules: the row label is "method (setting)", or the
model name when method is empty or when two different models would get the same label. Rows sharing a label
and test set but with different training seeds are aggregated: mean ± std (ddof=1) of rouge_l_mean (of
accuracy for a multiple-choice set) across training runs, shown with "(n=runs)". A generation test set with
answer keys is a column group: its Rouge-L column, then "<set> (task acc.)". "Avg." is the mean of Rouge-L
over the generation test sets (when there are several); the multiple-choice sets' accuracy columns, headed
"<set> (acc.)", follow it. The best non-teacher mean of each column is bold.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.plotting import pyplot

log = logging.getLogger(__name__)

RESULT_COLUMNS: tuple[str, ...] = (
    "model",
    "method",
    "setting",
    "k",
    "alpha",
    "beta",
    "student_experts",
    "seed",
    "test_set",
    "num_examples",
    "num_seeds",
    "rouge_l_mean",
    "rouge_l_std",
    "empty_rate",
    "accuracy",
    "accuracy_norm",
    "task_accuracy",
    "task_accuracy_std",
    "answer_coverage",
    "answer_coverage_generator",
    "answer_kl",
    "answer_kl_generator",
    "val_loss",
    "checkpoint",
)
_INT_COLUMNS = ("k", "student_experts", "seed", "num_examples", "num_seeds")
_FLOAT_COLUMNS = (
    "alpha", "beta", "rouge_l_mean", "rouge_l_std", "empty_rate", "accuracy", "accuracy_norm", "val_loss",
    "task_accuracy", "task_accuracy_std", "answer_coverage", "answer_coverage_generator", "answer_kl",
    "answer_kl_generator",
)  # fmt: skip
FAMILY_PREFIX = "task_accuracy."  # per-family accuracy columns (extra columns, parsed as numbers)
_REQUIRED = ("model", "test_set")
_SCORES = ("rouge_l_mean", "accuracy")  # each row has one of them
AVG = "Avg."


def normalize_row(row: Mapping[str, Any], where: str = "results row") -> dict[str, Any]:
    """Every schema column present (None when empty), numbers parsed; DataError on a missing required one."""
    out: dict[str, Any] = {c: None for c in RESULT_COLUMNS}
    for key, value in row.items():
        out[key] = None if value is None or (isinstance(value, str) and not value.strip()) else value
    families = [c for c in out if c.startswith(FAMILY_PREFIX)]
    for col in (*_INT_COLUMNS, *_FLOAT_COLUMNS, *families):
        if out[col] is not None:
            try:
                out[col] = int(float(out[col])) if col in _INT_COLUMNS else float(out[col])
            except (TypeError, ValueError):
                raise DataError(
                    f"{where}: column {col}={out[col]!r} is not a number. Fix the value."
                ) from None
    missing = [c for c in _REQUIRED if out[c] is None]
    if all(out[c] is None for c in _SCORES):
        missing.append(" or ".join(_SCORES))
    if missing:
        raise DataError(
            f"{where}: missing required column(s) {missing}. Fix: results rows need "
            f"{', '.join(_REQUIRED)} and one of {', '.join(_SCORES)} (schema: pipeline/evaluate/results.py)."
        )
    for col in ("model", "method", "setting", "test_set", "checkpoint"):
        if out[col] is not None:
            out[col] = str(out[col])
    return out


def write_results_csv(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    rows = [normalize_row(r) for r in rows]
    extra = sorted({k for r in rows for k in r} - set(RESULT_COLUMNS))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*RESULT_COLUMNS, *extra])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if v is None else v for k, v in r.items()})
    tmp.replace(path)
    return path


def read_results_csv(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"results file {path} does not exist. Fix: run `moedistill evaluate` first.")
    with open(path, newline="") as fh:
        return [normalize_row(r, f"{path}:{i + 2}") for i, r in enumerate(csv.DictReader(fh))]


def collect_results(target: str | Path) -> list[dict[str, Any]]:
    """Rows from a results CSV, a directory holding results.csv (an eval or a sweep's collected table), or a
    sweep directory whose runs each hold a results.csv somewhere below it."""
    target = Path(target)
    if target.is_file():
        return read_results_csv(target)
    if not target.is_dir():
        raise DataError(f"{target} is neither a results CSV nor a directory. Fix: check the path.")
    if (target / "results.csv").is_file():
        return read_results_csv(target / "results.csv")
    files = sorted(target.rglob("results.csv"))
    if not files:
        raise DataError(
            f"no results.csv under {target}. Fix: point at an eval directory (runs/<name>/eval), a results "
            "CSV, or a sweep directory whose runs were evaluated."
        )
    return [row for f in files for row in read_results_csv(f)]


def rows_of_runs(rows: Iterable[Mapping[str, Any]], runs: Iterable[Any]) -> list[dict[str, Any]]:
    """The teacher's rows and those of `runs` (objects with run_name and val_loss, e.g. DistillResults), in
    their original order, each run's row carrying its run's validation loss. `run_evaluate` also returns
    models evaluated earlier under the same output_dir; a sweep's or the demo's table shows its own only."""
    val_loss = {run.run_name: run.val_loss for run in runs}
    own = [dict(r) for r in rows if r["model"] == "teacher" or r["model"] in val_loss]
    for row in own:
        if val_loss.get(row["model"]) is not None:
            row["val_loss"] = val_loss[row["model"]]
    return own


def format_setting(point: Mapping[str, Any]) -> str:
    """A readable `setting` label for a grid point of dotted config keys: each key shortened to its shortest
    dotted suffix that no other key of the point shares, e.g.
    {"distill.lambda_mc": 0.5, "student.build.num_experts": 2} -> "lambda_mc=0.5, num_experts=2"."""
    keys = list(point)
    parts = {k: k.split(".") for k in keys}
    short: dict[str, str] = {}
    for key in keys:
        for n in range(1, len(parts[key]) + 1):
            suffix = ".".join(parts[key][-n:])
            others = (o for o in keys if o != key)
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                break
        short[key] = suffix
    return ", ".join(f"{short[k]}={_format_value(point[k])}" for k in keys)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool | int | str) or value is None:
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


# --- aggregation --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    mean: float
    std: float  # NaN: none to show (Avg., one run's accuracy: multiple-choice scoring samples nothing)
    runs: int  # training runs aggregated (1: std is across sampling seeds)


@dataclass(frozen=True)
class ResultsTable:
    labels: list[str]
    # generation sets, AVG when there are several of them, then the multiple-choice (accuracy) sets
    test_sets: list[str]
    cells: dict[tuple[str, str], Cell]
    teacher_labels: set[str]
    num_seeds: list[int]
    accuracy_sets: frozenset[str] = frozenset()

    def header(self, test_set: str) -> str:
        return f"{test_set} (acc.)" if test_set in self.accuracy_sets else test_set


def task_column(test_set: str) -> str:
    """The table column of a generation test set's task accuracy (its own key and header)."""
    return f"{test_set} (task acc.)"


def score_column(row: Mapping[str, Any]) -> str:
    """The column a normalised row's table cell shows: rouge_l_mean, or accuracy on a multiple-choice set."""
    return "rouge_l_mean" if row["rouge_l_mean"] is not None else "accuracy"


def build_table(rows: Sequence[Mapping[str, Any]]) -> ResultsTable:
    rows = [normalize_row(r) for r in rows]
    if not rows:
        raise DataError("no results rows to tabulate. Fix: evaluate at least one model first.")
    labels = {id(r): _label(r) for r in rows}
    seen: dict[tuple[str, str, Any], str] = {}
    if any(
        seen.setdefault((labels[id(r)], r["test_set"], r["seed"]), r["model"]) != r["model"] for r in rows
    ):
        labels = {id(r): r["model"] for r in rows}  # method+setting is ambiguous: fall back to model names
    groups: dict[tuple[str, str], dict[Any, dict[str, Any]]] = {}
    order_labels: list[str] = []
    order_sets: list[str] = []
    metric: dict[str, str] = {}
    teacher: set[str] = set()
    for r in rows:
        label, ts = labels[id(r)], r["test_set"]
        if label not in order_labels:
            order_labels.append(label)
        if ts not in order_sets:
            order_sets.append(ts)
        if metric.setdefault(ts, score_column(r)) != score_column(r):
            raise DataError(
                f"test set {ts!r} has both Rouge-L and accuracy rows. Fix: give the multiple-choice set "
                "(evaluate.multiple_choice) a name of its own."
            )
        if (r["method"] or "").lower() == "teacher" or r["model"].lower() == "teacher":
            teacher.add(label)
        bucket = groups.setdefault((label, ts), {})
        key = (r["seed"], r["model"])
        if key in bucket:
            log.warning("duplicate results for %s on %s (seed %s): keeping the last", label, ts, r["seed"])
        bucket[key] = r
    cells: dict[tuple[str, str], Cell] = {}
    for (label, ts), bucket in groups.items():
        runs, column = list(bucket.values()), metric[ts]
        rouge = column == "rouge_l_mean"  # multiple choice samples nothing: no spread over seeds
        cells[label, ts] = _cell([(r[column], (r["rouge_l_std"] or 0.0) if rouge else None) for r in runs])
        keyed = [
            (r["task_accuracy"], r["task_accuracy_std"] or 0.0)
            for r in runs
            if r["task_accuracy"] is not None
        ]
        if keyed:  # absent (no answer keys) stays absent, never 0
            cells[label, task_column(ts)] = _cell(keyed)
    rouge_sets = [ts for ts in order_sets if metric[ts] == "rouge_l_mean"]
    accuracy_sets = [ts for ts in order_sets if metric[ts] == "accuracy"]
    if len(rouge_sets) > 1:
        for label in order_labels:
            per_set = [cells[label, ts].mean for ts in rouge_sets if (label, ts) in cells]
            if len(per_set) == len(rouge_sets):  # an average over a subset would mislead
                cells[label, AVG] = Cell(statistics.fmean(per_set), float("nan"), 1)
        rouge_sets = [*rouge_sets, AVG]
    seeds = sorted({r["num_seeds"] for r in rows if r["num_seeds"] is not None})
    grouped = [c for ts in rouge_sets for c in (ts, task_column(ts)) if c == ts or _has_column(cells, c)]
    columns = [*grouped, *accuracy_sets]
    return ResultsTable(order_labels, columns, cells, teacher, seeds, frozenset(accuracy_sets))


def _cell(runs: Sequence[tuple[float, float | None]]) -> Cell:
    """One run: its mean and its spread over sampling seeds (NaN: none); several: mean ± std over runs."""
    if len(runs) == 1:
        mean, spread = runs[0]
        return Cell(mean, float("nan") if spread is None else spread, 1)
    means = [mean for mean, _ in runs]
    return Cell(statistics.fmean(means), statistics.stdev(means), len(runs))


def _has_column(cells: Mapping[tuple[str, str], Cell], column: str) -> bool:
    return any(c == column for _, c in cells)


def _label(row: Mapping[str, Any]) -> str:
    if not row["method"]:
        return row["model"]
    return f"{row['method']} ({row['setting']})" if row["setting"] else row["method"]


# --- rendering ----------------------------------------------------------------------------------------------
def format_results_markdown(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> str:
    table = build_table(rows)
    best: dict[str, float] = {}
    for ts in table.test_sets:
        means = [c.mean for (lab, t), c in table.cells.items() if t == ts and lab not in table.teacher_labels]
        if len(means) > 1:
            best[ts] = max(means)
    lines = [f"## {title}", ""] if title else []
    lines.append("| Model | " + " | ".join(table.header(ts) for ts in table.test_sets) + " |")
    lines.append("|---|" + "---:|" * len(table.test_sets))
    for label in table.labels:
        cells = []
        for ts in table.test_sets:
            cell = table.cells.get((label, ts))
            if cell is None:
                cells.append("–")
                continue
            text = f"{cell.mean:.2f}" if math.isnan(cell.std) else f"{cell.mean:.2f} ± {cell.std:.2f}"
            if cell.runs > 1:
                text += f" (n={cell.runs})"
            if label not in table.teacher_labels and ts in best and cell.mean == best[ts]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    seeds = "/".join(str(s) for s in table.num_seeds) or "?"
    lines += [
        "",
        f"Rouge-L F1 (%), mean ± std over {seeds} sampling seed(s) per example (std over training runs where "
        "n= is shown); empty generations score 0. Bold: best non-teacher mean per column.",
    ]
    if any(ts.endswith(task_column("")) for ts in table.test_sets):
        lines.append(
            "(task acc.): sampled responses judged correct against the generator's answer keys (%), mean ± "
            "std over sampling seeds (docs/evaluation.md)."
        )
    if table.accuracy_sets:
        lines.append(
            "(acc.): multiple-choice accuracy (%), the option of highest summed log-likelihood; no sampling, "
            "so a std only over training runs (n=)."
        )
    return "\n".join(lines) + "\n"


def plot_results(rows: Sequence[Mapping[str, Any]], png_path: str | Path, title: str | None = None) -> Path:
    plt = pyplot()
    table = build_table(rows)
    n_labels, n_sets = len(table.labels), len(table.test_sets)
    width = 0.8 / n_labels
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + n_sets * (0.45 * n_labels + 0.6)), 4.2))
    cmap = plt.get_cmap("tab10" if n_labels <= 10 else "tab20")
    for i, label in enumerate(table.labels):
        xs, ys, errs = [], [], []
        for j, ts in enumerate(table.test_sets):
            cell = table.cells.get((label, ts))
            if cell is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(cell.mean)
                errs.append(cell.std)  # NaN (Avg.) draws no error bar
        bars = ax.bar(xs, ys, width * 0.92, yerr=errs, capsize=2, label=label, color=cmap(i % cmap.N))
        if n_labels * n_sets <= 40:
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(range(n_sets), [table.header(ts) for ts in table.test_sets])
    accuracies = table.accuracy_sets or any(ts.endswith(task_column("")) for ts in table.test_sets)
    ax.set_ylabel("Rouge-L / accuracy (%)" if accuracies else "Rouge-L (%)")
    ax.set_title(title or "Rouge-L by model and test set (mean ± std over sampling seeds)")
    ax.set_ylim(
        0, max([c.mean + (c.std if c.std == c.std else 0) for c in table.cells.values()] + [1]) * 1.18
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=130)
    plt.close(fig)
    return png_path


def write_results_table(
    rows: Sequence[Mapping[str, Any]], out_dir: str | Path, stem: str = "results", title: str | None = None
) -> tuple[Path, Path]:
    """`<out_dir>/<stem>.md` (markdown table) and `<out_dir>/<stem>.png` (bar chart); returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(format_results_markdown(rows, title=title))
    return md_path, plot_results(rows, out_dir / f"{stem}.png", title=title)
