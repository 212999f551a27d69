"""Student expert load: the paper's Figure 10 -- per-layer mean router probability of each expert -- as a
heat map (rows = layers, columns = experts, annotated values) plus a text table with the gate entropy.

Source: a distillation run's metrics.jsonl (pipeline.training.metrics), whose rows carry
`load/pair{p}/e{e}` (mean student router probability of expert e on paired layer p over the step's response
tokens) and `gate_entropy/pair{p}` (mean per-token router entropy, nats). Layer pair p is student MoE layer p
(pipeline.distill.losses.layer_pairs pairs every student layer in order). The figures average the last
`last_n` logged rows that carry load metrics -- or, when a row is marked `"final": true`, the last such row.
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

_LOAD = re.compile(r"^load/pair(\d+)/e(\d+)$")
_ENTROPY = re.compile(r"^gate_entropy/pair(\d+)$")
DEFAULT_LAST_N = 5


@dataclass
class GateLoad:
    run: str
    source: Path
    load: np.ndarray  # [layers, experts] mean router probability
    entropy: np.ndarray  # [layers] mean per-token entropy (nats); NaN where not logged
    steps: list[int]  # steps averaged

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])

    @property
    def balance(self) -> np.ndarray:
        """Entropy of the mean load / ln(E): 1 = every expert gets the same share."""
        p = np.clip(self.load / self.load.sum(1, keepdims=True), 1e-12, 1)
        return (
            -(p * np.log(p)).sum(1) / math.log(self.num_experts) if self.num_experts > 1 else np.ones(len(p))
        )


def find_metrics(target: str | Path) -> list[tuple[str, Path]]:
    """(run name, metrics.jsonl) for a metrics file, a run directory, or a directory of run directories."""
    target = Path(target)
    if target.is_file():
        run = target.parent.parent.name if target.parent.name == "metrics" else target.parent.name
        return [(run, target)]
    for candidate in (target / "metrics" / "metrics.jsonl", target / "metrics.jsonl"):
        if candidate.is_file():
            return [(target.name, candidate)]
    if target.is_dir():
        runs = sorted(p for p in target.iterdir() if (p / "metrics" / "metrics.jsonl").is_file())
        if runs:
            return [(p.name, p / "metrics" / "metrics.jsonl") for p in runs]
    raise DataError(
        f"no metrics.jsonl at {target}. Fix: pass a student run directory (runs/<name>/students/<run>) or "
        "its metrics/metrics.jsonl, or the students/ directory to compare every run."
    )


def load_gate_metrics(path: str | Path, run: str = "", last_n: int = DEFAULT_LAST_N) -> GateLoad:
    path = Path(path)
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{lineno}: not valid JSON. Fix or delete that line.") from None
        if any(_LOAD.match(k) for k in row):
            rows.append(row)
    if not rows:
        raise DataError(
            f"{path} has no load/pair*/e* metrics: the run logged no student router statistics (a run of "
            "an older pipeline version, or not a distillation run)."
        )
    finals = [r for r in rows if r.get("final")]
    chosen = finals[-1:] if finals else rows[-max(1, last_n) :]
    keys = [(int(m[1]), int(m[2])) for k in chosen[-1] if (m := _LOAD.match(k))]
    layers, experts = max(p for p, _ in keys) + 1, max(e for _, e in keys) + 1
    load = np.full((len(chosen), layers, experts), np.nan)
    entropy = np.full((len(chosen), layers), np.nan)
    for i, row in enumerate(chosen):
        for key, value in row.items():
            if m := _LOAD.match(key):
                load[i, int(m[1]), int(m[2])] = float(value)
            elif m := _ENTROPY.match(key):
                entropy[i, int(m[1])] = float(value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN (never logged) entropy stays NaN
        mean_entropy = np.nanmean(entropy, axis=0)
    return GateLoad(
        run=run or path.parent.name,
        source=path,
        load=np.nanmean(load, axis=0),
        entropy=mean_entropy,
        steps=[int(r.get("step", -1)) for r in chosen],
    )


def format_gate_table(g: GateLoad) -> str:
    steps = f"step {g.steps[0]}" if len(g.steps) == 1 else f"steps {g.steps[0]}..{g.steps[-1]}"
    header = ["layer", *(f"e{e}" for e in range(g.num_experts)), "entropy", "H/lnE", "max"]
    lines = [
        f"{g.run}: mean router probability per expert, averaged over {len(g.steps)} logged row(s) ({steps}); "
        f"uniform share = {1 / g.num_experts:.3f}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
    ]
    for layer in range(g.load.shape[0]):
        cells = [f"{v:.3f}" for v in g.load[layer]]
        ent = "–" if np.isnan(g.entropy[layer]) else f"{g.entropy[layer]:.3f}"
        lines.append(
            f"| {layer} | "
            + " | ".join(cells)
            + f" | {ent} | {g.balance[layer]:.3f} | {g.load[layer].max():.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_gate_heatmaps(loads: list[GateLoad], png_path: str | Path) -> Path:
    """One annotated heat map per run, stacked vertically on one colour scale (Figure 10 layout)."""
    plt = pyplot()
    vmax = max(float(np.nanmax(g.load)) for g in loads)
    vmin = min(float(np.nanmin(g.load)) for g in loads)
    max_experts = max(g.num_experts for g in loads)
    heights = [g.load.shape[0] for g in loads]
    fig, axes = plt.subplots(
        len(loads),
        1,
        figsize=(1.6 + 0.9 * max_experts + 1.2, 1.1 * len(loads) + 0.42 * sum(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, g in zip(axes[:, 0], loads, strict=True):
        image = ax.imshow(g.load, cmap="YlOrRd", vmin=vmin, vmax=vmax, aspect="auto")
        mid = (vmin + vmax) / 2
        for (layer, expert), value in np.ndenumerate(g.load):
            ax.text(expert, layer, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if value > mid else "black")  # fmt: skip
        ax.set_xticks(range(g.num_experts), [f"Expert {e}" for e in range(g.num_experts)], fontsize=8)
        ax.set_yticks(range(g.load.shape[0]), [f"Layer {p}" for p in range(g.load.shape[0])], fontsize=8)
        ax.set_title(f"{g.run} (uniform = {1 / g.num_experts:.2f})", fontsize=9)
    assert image is not None
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="mean gate score", shrink=0.9)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=130)
    plt.close(fig)
    return png_path


def write_gate_report(
    target: str | Path, out_dir: str | Path | None = None, last_n: int = DEFAULT_LAST_N
) -> tuple[list[GateLoad], Path, Path]:
    """gates.png + gates.md for one run (or every run under a directory that logged router statistics: a
    logits-only student, such as moe-kd's LoRA-MoE, logs none); returns (loads, md, png)."""
    found = find_metrics(target)
    if len(found) > 1:  # a lone run without router statistics still gets load_gate_metrics' error
        found = [(run, path) for run, path in found if "load/pair" in path.read_text()] or found
    loads = [load_gate_metrics(path, run, last_n) for run, path in found]
    target = Path(target)
    if out_dir is None:  # beside the run: the run directory (or the directory of runs)
        out_dir = target if target.is_dir() else found[0][1].parent
        out_dir = out_dir.parent if out_dir.name == "metrics" else out_dir
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "gates.md"
    md.write_text("\n".join(format_gate_table(g) for g in loads))
    return loads, md, plot_gate_heatmaps(loads, out / "gates.png")
