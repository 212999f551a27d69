"""`moedistill report teacher-labels`: label mass and entropy read from a real cache of the session's tiny
teacher, checked against the teacher's own full-vocabulary forward over the cached sequences."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.read.reader import open_cache
from pipeline.cache.stage import run_cache, teacher_checkpoint
from pipeline.cli import main
from pipeline.models.build import load_causal_lm
from pipeline.reports.teacher_labels import teacher_labels


def test_label_mass_matches_the_teachers_forward(tiny_teacher_cache: Any, tmp_path: Path, capsys) -> None:
    config = tiny_teacher_cache
    path = run_cache(config).path  # the session's complete cache: found, not rebuilt
    cache = open_cache(path)
    examples = cache.read_shard(int(cache.shards[0]["shard_id"]), {"logits"})[:4]
    teacher = load_causal_lm(teacher_checkpoint(config), torch_dtype=torch.float32)
    probs, top1, entropy_full = [], [], []
    with torch.no_grad():
        for ex in examples:
            ids = torch.from_numpy(ex["input_ids"].astype(np.int64))[None]
            logp = torch.log_softmax(teacher(input_ids=ids).logits[0].double(), dim=-1)
            positions = torch.from_numpy(np.flatnonzero(ex["response_mask"][1:] == 1))
            labels = ids[0, positions + 1]
            rows = logp[positions]
            probs.append(rows.gather(1, labels[:, None]).exp().squeeze(1))
            top1.append((rows.argmax(dim=1) == labels).double())
            entropy_full.append(-(rows.exp() * rows).sum(dim=1))
    expected_mass = torch.cat(probs).mean().item()
    report = teacher_labels(path, max_sequences=4)
    assert report.sequences == 4 and report.positions == len(torch.cat(probs))
    # The cache keeps the top-k in float16 at most; the reference is almost always inside it.
    assert abs(report.label_mass - expected_mass) < 0.02, (report, expected_mass)
    assert abs(report.label_top1 - torch.cat(top1).mean().item()) < 0.05
    # k + 1 bins merge the tail: never more than the full entropy.
    assert report.entropy <= torch.cat(entropy_full).mean().item() + 1e-3

    out = tmp_path / "labels"
    assert main(["report", "teacher-labels", path, "--sequences", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mass on the reference token" in printed and "4 sequences" in printed
    saved = json.loads((out / "teacher_labels.json").read_text())
    assert saved["label_mass"] == report.label_mass
