"""Loss terms over training: each term's loss and its share of the gradient, overall and per parameter group.

Source: a distillation run's metrics.jsonl (pipeline.training.metrics), whose rows carry `loss_<term>` (the
term's unweighted value) and, on diagnostic steps, `grad/<term>/<group>/norm` and `.../cos_rest` from
pipeline.distill.diagnostics (the gradient of the term as weighted in the total loss). A term's gradient
share in a group is its norm divided by the sum of all terms' norms there: which term moves that part of the
student most. `cos_rest` < 0 means the term pulls against the others.

Outputs, beside the run (or in `out_dir`): terms.png (losses, overall gradient share over steps, mean share
per group) and terms.md (per-group table of mean share and mean cos_rest over the logged steps).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.plotting import pyplot
from pipeline.reports.gates import find_metrics

_GRAD = re.compile(r"^grad/([^/]+)/([^/]+)/(norm|cos_rest)$")
_LOSS = re.compile(r"^loss_(.+)$")
ALL = "all"


@dataclass
class TermHistory:
    run: str
    source: Path
    terms: list[str]  # terms with gradient diagnostics, in logging order
    groups: list[str]  # parameter groups, "all" first
    loss_steps: np.ndarray  # [R] steps of rows with losses
    losses: dict[str, np.ndarray]  # term -> [R] (NaN where not logged)
    grad_steps: np.ndarray  # [G] steps of rows with gradient diagnostics
    norms: np.ndarray  # [G, terms, groups]
    cos_rest: np.ndarray  # [G, terms, groups] (NaN where undefined)

    def shares(self) -> np.ndarray:
        """[G, terms, groups] norm / sum of norms over terms (NaN where no term has gradient)."""
        total = self.norms.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, self.norms / total, np.nan)


def load_term_history(path: str | Path, run: str = "") -> TermHistory:
    path = Path(path)
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{lineno}: not valid JSON. Fix or delete that line.") from None
    grad_rows = [r for r in rows if any(_GRAD.match(k) for k in r)]
    if not grad_rows:
        raise DataError(
            f"{path} has no grad/<term>/<group>/norm metrics: the run logged no loss-term diagnostics "
            "(a single-term method such as sft, diagnostics switched off with distill.diagnostics: false, "
            "or a run of an older pipeline version). Fix: rerun with distill.diagnostics: true."
        )
    terms: list[str] = []
    groups: list[str] = [ALL]
    for row in grad_rows:
        for key in row:
            if m := _GRAD.match(key):
                if m[1] not in terms:
                    terms.append(m[1])
                if m[2] not in groups:
                    groups.append(m[2])
    norms = np.full((len(grad_rows), len(terms), len(groups)), np.nan)
    cos = np.full_like(norms, np.nan)
    for i, row in enumerate(grad_rows):
        for key, value in row.items():
            if m := _GRAD.match(key):
                target = norms if m[3] == "norm" else cos
                target[i, terms.index(m[1]), groups.index(m[2])] = _number(value)
    loss_rows = [r for r in rows if any(_LOSS.match(k) for k in r)]
    losses = {
        term: np.array([_number(r.get(f"loss_{term}", math.nan)) for r in loss_rows])
        for term in terms
        if any(f"loss_{term}" in r for r in loss_rows)
    }
    return TermHistory(
        run=run or path.parent.name,
        source=path,
        terms=terms,
        groups=groups,
        loss_steps=np.array([int(r.get("step", -1)) for r in loss_rows]),
        losses=losses,
        grad_steps=np.array([int(r.get("step", -1)) for r in grad_rows]),
        norms=norms,
        cos_rest=cos,
    )


def _number(value: object) -> float:
    return math.nan if value is None else float(value)  # type: ignore[arg-type]


def _nanmean(values: np.ndarray, axis: int = 0) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column (never defined) stays NaN
        return np.nanmean(values, axis=axis)


def format_terms_summary(h: TermHistory) -> str:
    share = _nanmean(h.shares())  # [terms, groups]
    cos = _nanmean(h.cos_rest)
    steps = f"{len(h.grad_steps)} diagnostic step(s), {h.grad_steps[0]}..{h.grad_steps[-1]}"
    lines = [
        f"# Loss terms of {h.run}",
        "",
        f"Gradient share (norm of the term's gradient / sum over terms) and cosine with the sum of the other "
        f"terms' gradients, mean over {steps}. Cosine '–': the term has no gradient on that group.",
        "",
        "| group | " + " | ".join(f"{t} share | {t} cos" for t in h.terms) + " | dominant |",
        "|---|" + "---:|---:|" * len(h.terms) + "---|",
    ]
    for j, group in enumerate(h.groups):
        cells = []
        for i in range(len(h.terms)):
            cells.append("–" if np.isnan(share[i, j]) else f"{share[i, j]:.2f}")
            cells.append("–" if np.isnan(cos[i, j]) else f"{cos[i, j]:+.2f}")
        dominant = "–" if np.isnan(share[:, j]).all() else h.terms[int(np.nanargmax(share[:, j]))]
        lines.append(f"| {group} | " + " | ".join(cells) + f" | {dominant} |")
    if h.losses:
        lines += ["", "| term | first loss | last loss |", "|---|---:|---:|"]
        for term, values in h.losses.items():
            finite = values[np.isfinite(values)]
            if finite.size:
                lines.append(f"| {term} | {finite[0]:.4f} | {finite[-1]:.4f} |")
    return "\n".join(lines) + "\n"


def plot_terms(h: TermHistory, png_path: str | Path) -> Path:
    """Three panels: term losses over steps, overall gradient share over steps, mean share per group."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    colors = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(h.terms)}
    ax = axes[0]
    for term, values in h.losses.items():
        ax.plot(h.loss_steps, values, label=term, color=colors[term])
    if h.losses and all(np.nanmin(v) > 0 for v in h.losses.values() if np.isfinite(v).any()):
        ax.set_yscale("log")
    ax.set(title="term loss (unweighted)", xlabel="step")
    ax.legend(fontsize=8)
    shares = h.shares()
    ax = axes[1]
    for i, term in enumerate(h.terms):
        ax.plot(h.grad_steps, shares[:, i, h.groups.index(ALL)], marker=".", label=term, color=colors[term])
    ax.set(title="gradient share, all parameters", xlabel="step", ylim=(0, 1))
    ax.legend(fontsize=8)
    ax = axes[2]
    mean_share = np.nan_to_num(_nanmean(shares))  # [terms, groups]
    bottom = np.zeros(len(h.groups))
    for i, term in enumerate(h.terms):
        ax.bar(h.groups, mean_share[i], bottom=bottom, label=term, color=colors[term])
        bottom += mean_share[i]
    ax.set(title="mean gradient share per parameter group", ylim=(0, 1))
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(h.run, fontsize=10)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def write_terms_report(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """terms.md + terms.png for one student run (its directory or its metrics.jsonl); returns (md, png)."""
    found = find_metrics(run_dir)
    if len(found) != 1:
        raise DataError(
            f"{run_dir} holds {len(found)} runs; `report terms` reads one. Fix: pass one run directory, "
            f"e.g. {Path(run_dir) / found[0][0]}."
        )
    run, path = found[0]
    history = load_term_history(path, run)
    if out_dir is None:  # beside the run
        out_dir = path.parent.parent if path.parent.name == "metrics" else path.parent
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "terms.md"
    md.write_text(format_terms_summary(history))
    return md, plot_terms(history, out / "terms.png")
