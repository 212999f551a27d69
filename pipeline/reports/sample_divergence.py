"""How close each model's own generations are to the teacher: `moedistill report sample-divergence SWEEP`.

Validation loss (cross-entropy on the reference responses) measures how well a student covers the data; the
on-policy methods (MiniLLM, GKD, DistiLLM-2, ...) optimise something else, the teacher's judgement of what the
student itself generates. This report measures both on the validation split (never the test split), for the
teacher and every student of a finished sweep, each model sampling its own responses (temperature 1, top-p 1,
the evaluation protocol, a fixed seed) that the teacher then scores over the full vocabulary:

  ref_ce          cross-entropy per reference response token (the validation loss)
  ref_entropy     the model's entropy at the reference positions (nats)
  sample_rkl      KL(q || p) per token of the model's own samples, q the model and p the teacher (MiniLLM's
                  objective; 0 for the teacher itself)
  sample_fkl      KL(p || q) on the same tokens
  sample_entropy  the model's entropy on its own samples
  sample_len      mean sampled response length (tokens, the end token included)

Outputs beside the sweep's results: sample_divergence.csv (one row per model), sample_divergence.md
(per-model table and seed statistics with paired differences to kd) and sample_divergence.png (ref_ce
against sample_rkl, one point per method, ± std over seeds). Models run one at a time in this process, with
the teacher beside them: a diagnostic for models that fit one device, not a cluster stage.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.data.collate import pad_batch
from pipeline.data.stage import load_tokenizer, prepare_data
from pipeline.data.tokenize import tokenize_prompt, tokenize_records
from pipeline.evaluate.results import read_results_csv
from pipeline.evaluate.stats import mean_std, seed_table_markdown, values_by_seed
from pipeline.models.build import load_causal_lm
from pipeline.models.generate import generate_token_ids
from pipeline.plotting import pyplot

METRICS = ("ref_ce", "ref_entropy", "sample_rkl", "sample_fkl", "sample_entropy", "sample_len")


@dataclass(frozen=True)
class SampleDivergence:
    ref_ce: float
    ref_entropy: float
    sample_rkl: float
    sample_fkl: float
    sample_entropy: float
    sample_len: float


def _response_log_probs(
    model: Any, examples: Sequence[Mapping[str, Any]], pad_id: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch: (log-probabilities [n, V] at the positions that predict a response token, the tokens)."""
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start : start + batch_size], pad_id)
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits.float()
        labels = batch["labels"][:, 1:].to(device)
        keep = labels != -100
        yield logits[:, :-1][keep].log_softmax(-1), labels[keep]


def _entropy(log_q: torch.Tensor) -> torch.Tensor:
    return -(log_q.exp() * log_q).sum(-1)


def measure_model(
    model: Any,
    teacher: Any,
    references: Sequence[Mapping[str, Any]],
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 16,
) -> SampleDivergence:
    """The metrics of one model (module docstring) on tokenised references and their prompts."""
    model.eval()
    teacher.eval()
    ce, ent, n_ref = 0.0, 0.0, 0
    for log_q, labels in _response_log_probs(model, references, pad_id, batch_size):
        ce += float(-log_q.gather(1, labels.unsqueeze(1)).sum())
        ent += float(_entropy(log_q).sum())
        n_ref += labels.numel()
    responses = generate_token_ids(
        model, prompts, max_new_tokens=max_new_tokens, pad_id=pad_id, eos_id=eos_id, greedy=False, seed=seed,
        batch_size=batch_size,
    )  # fmt: skip
    samples = [
        {"input_ids": [*p, *r], "response_mask": [0] * len(p) + [1] * len(r)}
        for p, r in zip(prompts, responses, strict=True)
        if r
    ]
    rkl, fkl, s_ent, n_tok = 0.0, 0.0, 0.0, 0
    student_side = _response_log_probs(model, samples, pad_id, batch_size)
    teacher_side = _response_log_probs(teacher, samples, pad_id, batch_size)
    for (log_q, _), (log_p, _) in zip(student_side, teacher_side, strict=True):
        log_p = log_p.to(log_q.device)
        rkl += float((log_q.exp() * (log_q - log_p)).sum())
        fkl += float((log_p.exp() * (log_p - log_q)).sum())
        s_ent += float(_entropy(log_q).sum())
        n_tok += log_q.shape[0]
    n_ref, n_tok = max(n_ref, 1), max(n_tok, 1)
    length = sum(map(len, responses)) / len(prompts)
    return SampleDivergence(ce / n_ref, ent / n_ref, rkl / n_tok, fkl / n_tok, s_ent / n_tok, length)


def _load(checkpoint: str, device: str) -> Any:
    return load_causal_lm(checkpoint, torch_dtype="float32", setting="a results row's checkpoint").to(device)


def sample_divergence_rows(
    results_rows: Sequence[Mapping[str, Any]],
    references: Sequence[Mapping[str, Any]],
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    seed: int = 0,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """One row per model of a results table (pipeline/evaluate/results.py rows; the teacher's row names the
    teacher checkpoint): model, method, setting, seed and the metrics."""
    models: dict[str, Mapping[str, Any]] = {}
    for row in results_rows:
        models.setdefault(str(row["model"]), row)  # one row per model and test set: the first suffices
    if "teacher" not in models:
        raise ValueError("the results table has no teacher row, so there is no teacher to score samples with")
    teacher = _load(str(models["teacher"]["checkpoint"]), device)
    out = []
    for name, row in models.items():
        model = teacher if name == "teacher" else _load(str(row["checkpoint"]), device)
        metrics = measure_model(
            model, teacher, references, prompts, pad_id=pad_id, eos_id=eos_id, max_new_tokens=max_new_tokens,
            seed=seed,
        )  # fmt: skip
        keys = {k: row.get(k) for k in ("method", "setting", "seed")}
        out.append({"model": name, **keys, **asdict(metrics)})
        print(f"[sample-divergence] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in asdict(metrics).items()))
    return out


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))


def sample_divergence_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Seed statistics of sample_rkl and ref_ce (paired differences to kd), then the per-model table."""
    parts = [
        "# Sample divergence (validation split)\n",
        "Reverse KL to the teacher per token of each model's own samples (lower: the teacher likes what the "
        "model generates):\n",
        seed_table_markdown(rows, "sample_rkl", "sample KL(q||p)"),
        "Cross-entropy on the reference responses (the validation loss):\n",
        seed_table_markdown(rows, "ref_ce", "reference CE"),
        "Per model:\n",
        "| model | " + " | ".join(METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    parts += [f"| {r['model']} | " + " | ".join(_fmt(r[m]) for m in METRICS) + " |" for r in rows]
    return "\n".join(parts) + "\n"


def plot_sample_divergence(rows: Sequence[Mapping[str, Any]], png_path: Path) -> Path:
    """ref_ce (x) against sample_rkl (y): one point per method (± std over seeds), the teacher at (., 0)."""
    plt = pyplot()
    ce, rkl = values_by_seed(rows, "ref_ce"), values_by_seed(rows, "sample_rkl")
    fig, ax = plt.subplots(figsize=(7, 5))
    for key in ce:
        (x, dx), (y, dy) = mean_std(list(ce[key].values())), mean_std(list(rkl[key].values()))
        xerr, yerr = (0.0 if math.isnan(d) else d for d in (dx, dy))  # one seed: no std
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3)
        ax.annotate(key[0] if key[1] is None else f"{key[0]} ({key[1]})", (x, y), fontsize=8)
    teacher = [r for r in rows if r["model"] == "teacher"]
    if teacher:
        ax.scatter([teacher[0]["ref_ce"]], [teacher[0]["sample_rkl"]], marker="*", s=120, color="k")
        ax.annotate("teacher", (teacher[0]["ref_ce"], teacher[0]["sample_rkl"]), fontsize=8)
    ax.set_xlabel("cross-entropy on reference responses (validation)")
    ax.set_ylabel("KL(student || teacher) per token of own samples")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def write_sample_divergence(rows: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """sample_divergence.csv / .md / .png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "sample_divergence.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["model", "method", "setting", "seed", *METRICS])
        writer.writeheader()
        writer.writerows(rows)
    md_path = out_dir / "sample_divergence.md"
    md_path.write_text(sample_divergence_markdown(rows))
    return [csv_path, md_path, plot_sample_divergence(rows, out_dir / "sample_divergence.png")]


def run_sample_divergence(
    config: Config, results_csv: Path, limit: int = 128, device: str = "cpu", out_dir: Path | None = None
) -> list[Path]:
    """The report for the models of `results_csv` on the first `limit` validation records of `config`'s
    data (sampling as `config.evaluate` sets the length; seed 0). Writes beside results_csv by default."""
    data = prepare_data(config)
    tokenizer = load_tokenizer(data.tokenizer_path)
    records = data.splits.validation[:limit]
    references, _ = tokenize_records(tokenizer, records, config.data.max_length)
    prompts = [tokenize_prompt(tokenizer, records[ex["seq_id"]]) for ex in references]
    rows = sample_divergence_rows(
        read_results_csv(results_csv), references, prompts, pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id, max_new_tokens=config.evaluate.max_new_tokens, device=device,
    )  # fmt: skip
    files = write_sample_divergence(rows, out_dir or results_csv.parent)
    print(files[1].read_text())
    return files
