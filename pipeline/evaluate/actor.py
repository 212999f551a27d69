"""The Ray Data actor that generates responses and scores them with Rouge-L, and scores multiple-choice items
(rows whose `mc` column holds one: pipeline.evaluate.multiple_choice.score_item, every option's summed
log-likelihood, returned in `mc_scores` for the driver to take the accuracy of).

One actor = one model replica at a time (on its own GPU when `num_gpus_per_actor` > 0, on the node group
that `evaluate.resources` names, e.g. {"student_node": 1}: the stage passes both to Ray Data). Rows name the
checkpoint they are for (`model`, an index into `checkpoints`) and hold one generation unit each (up to
`evaluate.batch_size` prompts generated in one call, or one multiple-choice item); rows arrive model-major,
so an actor loads each checkpoint about once and frees the previous one before loading the next.
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
        """One row per generation unit (pipeline.evaluate.stage.generation_units): its prompts in one generate
        call, or one multiple-choice item."""
        from pipeline.models.generate import generate_responses  # why: torch, as in _use

        predictions, scores, mc_scores = [], [], []
        for i in range(len(batch["row_id"])):
            self._use(int(batch["model"][i]))
            mc = str(batch["mc"][i])
            if mc:
                predictions.append(json.dumps([""]))
                scores.append(json.dumps([0.0]))
                mc_scores.append(self._score_choice(mc))
                continue
            prompts = json.loads(str(batch["prompts"][i]))
            references = json.loads(str(batch["references"][i]))
            records = [Record(instruction, context, "-", "") for instruction, context in prompts]
            outputs = generate_responses(
                self.model,
                self.tokenizer,
                records,
                # the same (unit, seed) draws the same stream for every model: paired comparisons
                seed=int(batch["seed"][i]) * _SEED_STRIDE + int(batch["first_item"][i]),
                batch_size=len(records),
                **self.kwargs,
            )
            predictions.append(json.dumps(outputs))
            scores.append(json.dumps([rouge_l(p, refs) for p, refs in zip(outputs, references, strict=True)]))
            mc_scores.append("")
        return {
            "row_id": np.asarray(batch["row_id"], dtype=np.int64),
            "model": np.asarray(batch["model"], dtype=np.int64),
            "members": np.asarray(batch["members"], dtype=object),
            "predictions": np.asarray(predictions, dtype=object),
            "rouge_l": np.asarray(scores, dtype=object),
            "mc_scores": np.asarray(mc_scores, dtype=object),
        }

    def _score_choice(self, text: str) -> str:
        """JSON {"logprob_sum": [...], "tokens": [...]} of one multiple-choice item on the loaded model."""
        spec = json.loads(text)
        item = MCItem(spec["question"], tuple(spec["choices"]), int(spec["answer"]))
        score = score_item(self.model, self.tokenizer, item, spec["style"], self.device)
        scores = {"logprob_sum": list(score.option_logprob_sum), "tokens": list(score.option_tokens)}
        return json.dumps(scores)
