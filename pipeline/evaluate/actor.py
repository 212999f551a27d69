"""The Ray Data actor that generates responses and scores them with Rouge-L.

One actor = one model replica at a time (on its own GPU when `num_gpus_per_actor` > 0, on the node group
that `evaluate.resources` names, e.g. {"student_node": 1}: the stage passes both to Ray Data). Rows name the
checkpoint they are for (`model`, an index into `checkpoints`); rows arrive model-major, so an actor loads
each checkpoint about once and frees the previous one before loading the next.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.data.records import Record
from pipeline.data.rouge import rouge_l
from pipeline.data.stage import load_tokenizer

# Different (seed, first item) groups must get independent sampling streams.
_SEED_STRIDE = 1_000_003


class GeneratorActor:
    def __init__(
        self,
        checkpoints: Sequence[tuple[str, str]],  # (checkpoint, tokenizer path) per model index
        max_new_tokens: int,
        greedy: bool,
        temperature: float,
        top_p: float,
    ) -> None:
        import torch

        self.checkpoints = list(checkpoints)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.kwargs = {
            "max_new_tokens": max_new_tokens,
            "greedy": greedy,
            "temperature": temperature,
            "top_p": top_p,
        }
        self._loaded: int | None = None
        self.model: Any = None
        self.tokenizer: Any = None

    def _use(self, index: int) -> None:
        if self._loaded == index:
            return
        import torch

        # why: torch stays out of this module's import (the evaluation driver only hands the class to Ray)
        from pipeline.models.build import load_causal_lm

        self.model = None  # free the previous replica before loading the next one
        if self.device == "cuda":
            torch.cuda.empty_cache()
        checkpoint, tokenizer_path = self.checkpoints[index]
        self.model = load_causal_lm(checkpoint).to(self.device)
        self.tokenizer = load_tokenizer(tokenizer_path)
        self._loaded = index

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from pipeline.models.generate import generate_responses  # why: torch, as in _use

        row_ids = [int(r) for r in batch["row_id"]]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (model, seed) in enumerate(zip(batch["model"], batch["seed"], strict=True)):
            groups.setdefault((int(model), int(seed)), []).append(i)
        predictions: dict[int, str] = {}
        for (model, seed), idx in sorted(groups.items()):  # one generate call per (model, sampling seed)
            self._use(model)
            records = [Record(str(batch["instruction"][i]), str(batch["context"][i]), "-", "") for i in idx]
            outputs = generate_responses(
                self.model,
                self.tokenizer,
                records,
                # the same (item, seed) draws the same stream for every model: paired comparisons
                seed=seed * _SEED_STRIDE + int(batch["item"][idx[0]]),
                batch_size=len(records),
                **self.kwargs,
            )
            predictions.update(zip(idx, outputs, strict=True))
        preds = [predictions[i] for i in range(len(row_ids))]
        scores = [
            rouge_l(p, json.loads(str(refs))) for p, refs in zip(preds, batch["references"], strict=True)
        ]
        return {
            "row_id": np.asarray(row_ids, dtype=np.int64),
            "prediction": np.asarray(preds, dtype=object),
            "rouge_l": np.asarray(scores, dtype=np.float64),
        }
