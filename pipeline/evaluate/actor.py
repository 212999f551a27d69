"""The Ray Data actor that generates responses and scores them with Rouge-L, and scores multiple-choice items
(rows whose `mc` column holds one: pipeline.evaluate.multiple_choice.score_item, every option's summed
log-likelihood, returned in `mc_scores` for the driver to take the accuracy of).

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
from pipeline.evaluate.multiple_choice import MCItem, score_item

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
        mc = [str(m) for m in batch["mc"]] if "mc" in batch else [""] * len(row_ids)
        mc_scores = self._score_choices(batch, mc)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (model, seed) in enumerate(zip(batch["model"], batch["seed"], strict=True)):
            if not mc[i]:
                groups.setdefault((int(model), int(seed)), []).append(i)
        predictions: dict[int, str] = {i: "" for i in range(len(row_ids)) if mc[i]}
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
            0.0 if choice else rouge_l(p, json.loads(str(refs)))
            for p, refs, choice in zip(preds, batch["references"], mc, strict=True)
        ]
        return {
            "row_id": np.asarray(row_ids, dtype=np.int64),
            "prediction": np.asarray(preds, dtype=object),
            "rouge_l": np.asarray(scores, dtype=np.float64),
            "mc_scores": np.asarray(mc_scores, dtype=object),
        }

    def _score_choices(self, batch: dict[str, np.ndarray], mc: list[str]) -> list[str]:
        """JSON {"logprob_sum": [...], "tokens": [...]} per multiple-choice row, "" for generation rows."""
        out = [""] * len(mc)
        for i, text in enumerate(mc):
            if text:
                self._use(int(batch["model"][i]))
                spec = json.loads(text)
                item = MCItem(spec["question"], tuple(spec["choices"]), int(spec["answer"]))
                score = score_item(self.model, self.tokenizer, item, spec["style"], self.device)
                out[i] = json.dumps(
                    {"logprob_sum": list(score.option_logprob_sum), "tokens": list(score.option_tokens)}
                )
        return out
