"""Where an evaluation's rows come from, and when they can be reused.

`describe_checkpoint` fills a results row's columns from the checkpoint's run (its settings.json, summary.json
and exported config), never from its name. `evaluation_protocol` is everything that decides a model's numbers
besides its checkpoint (sampling, seeds, the chunking of generate calls, every test set's content); a model's
protocol.json, written last, records its fingerprint (protocol + checkpoint identity), so a rerun with the
same checkpoint, protocol and test sets reuses its results (`reusable_results`), and the results table adds
earlier models evaluated under the same protocol (`earlier_results`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.config import Config, stable_hash
from pipeline.errors import ConfigError
from pipeline.evaluate.results import read_results_csv
from pipeline.evaluate.test_sets import EvalSet, MCSet
from pipeline.models.dims import read_dims
from pipeline.models.export import EXPORT_MARKER
from pipeline.run_identity import SETTINGS_FILE

PROTOCOL_FILE = "protocol.json"  # written last: its presence marks a model's results complete and reusable


def describe_checkpoint(name: str, checkpoint: str) -> dict[str, Any]:
    """Schema columns known from the checkpoint's run, never from its name (a label only): method, K, alpha,
    beta and seed from the run's settings.json, the validation loss from its summary.json, and the student's
    expert count from the exported model's config."""
    ckpt = Path(checkpoint)
    info: dict[str, Any] = {"model": name, "checkpoint": str(checkpoint)}
    marker = _read_json(ckpt / EXPORT_MARKER) or {}
    if marker.get("stage") == "finetune-teacher" or name == "teacher":
        info["method"] = "teacher"
        finetune = _read_json(ckpt.parent / "finetune_summary.json") or {}  # runs/<name>/teacher/
        info["val_loss"] = (finetune.get("after") or {}).get("val_loss")
        return info
    run_dir = ckpt.parent  # runs/<name>/students/<run>/final
    summary = _read_json(run_dir / "summary.json") or {}
    distill = (_read_json(run_dir / SETTINGS_FILE) or {}).get("distill") or {}
    info["method"] = summary.get("method") or marker.get("method") or distill.get("method")
    if (ckpt / "config.json").is_file():
        info["student_experts"] = read_dims(str(ckpt), role="evaluated model").num_experts
    if distill:
        seed = (distill.get("train") or {}).get("seed")
        info.update({key: distill.get(key) for key in ("k", "alpha", "beta")}, seed=seed)
        info["setting"] = _setting(info)
    info["val_loss"] = summary.get("val_loss")
    return info


def _setting(info: dict[str, Any]) -> str:
    """The hyper-parameters that matter for the method (K/alpha only with MC, beta only with ERD)."""
    # why: distill.methods imports the token losses (torch); the evaluation driver is otherwise torch-free
    from pipeline.distill.methods import get_method

    try:
        method = get_method(str(info["method"]))
        uses_mc, uses_erd = method.uses_mc, method.uses_erd
    except ConfigError:  # a method this version does not know: show everything
        uses_mc = uses_erd = True
    parts = []
    if uses_mc:
        parts += [f"K={info['k']}", f"α={info['alpha']:g}"]
    if uses_erd:
        parts.append(f"β={info['beta']:g}")
    if info.get("student_experts") is not None:
        parts.append(f"E={info['student_experts']}")
    return ", ".join(parts)


def evaluation_protocol(
    config: Config, test_sets: list[EvalSet], seeds: list[int], mc_sets: Sequence[MCSet] = ()
) -> dict[str, Any]:
    """Everything besides the checkpoint that decides a model's numbers; its hash names comparable results."""
    ev = config.evaluate
    # only when configured, so the results of configs without multiple-choice sets stay reusable
    mc = {
        s.name: stable_hash({"style": s.style, "items": [asdict(it) for it in s.items]}, length=64)
        for s in mc_sets
    }
    return ({"multiple_choice": mc} if mc else {}) | {
        # 2: generate calls are fixed chunks of the test sets (generation_units), not Ray Data batches;
        # 3: responses are also scored against answer keys (task accuracy, answer spread)
        "version": 3,
        "greedy": ev.greedy,
        "temperature": ev.temperature,
        "top_p": ev.top_p,
        "max_new_tokens": ev.max_new_tokens,
        "seeds": seeds,
        # the chunk size of generation_units: batch composition changes sampled outputs
        "batch_size": ev.batch_size,
        "test_sets": {
            ts.name: hashlib.sha256(json.dumps([asdict(e) for e in ts.examples]).encode()).hexdigest()
            for ts in test_sets
        },
    }


def checkpoint_identity(checkpoint: str) -> dict[str, Any]:
    """Which checkpoint this is: its export marker (new with every export), else its files' sizes, times."""
    ckpt = Path(checkpoint).resolve()
    marker = ckpt / EXPORT_MARKER
    if marker.is_file():  # rewritten (with a new time) by every export
        return {"path": str(ckpt), "export": marker.read_text()}
    return {
        "path": str(ckpt),
        "files": sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in ckpt.iterdir()),
    }


def reusable_results(
    model_dir: Path, fingerprint: str
) -> tuple[list[dict[str, Any]], dict[str, list[float]]] | None:
    """(rows, per-seed scores) of an earlier, complete evaluation with this fingerprint; else None."""
    protocol = _read_json(model_dir / PROTOCOL_FILE)
    if not protocol or protocol.get("fingerprint") != fingerprint:
        return None
    if not (model_dir / "results.csv").is_file() or not (model_dir / "predictions.jsonl").is_file():
        return None
    return read_results_csv(model_dir / "results.csv"), protocol["seed_scores"]


def earlier_results(eval_dir: Path, protocol_hash: str, exclude: set[str]) -> list[dict[str, Any]]:
    """Rows of models evaluated by earlier calls with the same protocol and test sets (comparable numbers)."""
    rows: list[dict[str, Any]] = []
    for protocol_file in sorted(eval_dir.glob(f"*/{PROTOCOL_FILE}")):
        model_dir = protocol_file.parent
        info = _read_json(protocol_file) or {}
        comparable = model_dir.name not in exclude and info.get("protocol") == protocol_hash
        if comparable and (model_dir / "results.csv").is_file():
            rows += read_results_csv(model_dir / "results.csv")
    return rows


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_protocol(
    model_dir: Path, fingerprint: str, protocol_hash: str, seed_scores: dict[str, list[float]]
) -> None:
    """Written last: its presence marks the model's results as complete and reusable."""
    payload = {"fingerprint": fingerprint, "protocol": protocol_hash, "seed_scores": seed_scores}
    (model_dir / PROTOCOL_FILE).write_text(json.dumps(payload, indent=2))
