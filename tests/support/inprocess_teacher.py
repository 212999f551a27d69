"""The TeacherClient interface (score, router_step) over a real TeacherScorer in this process (no Ray): for
single on-policy steps in tests. It records what it served."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.cache.read.reader import open_cache
from pipeline.cache.stage import cache_spec_from_config, locate_cache, teacher_checkpoint
from pipeline.config import Config
from pipeline.data.stage import prepare_data
from pipeline.teacher_service.scorer import TeacherScorer


class InProcessClient:
    def __init__(self, config: Config) -> None:
        prepared = prepare_data(config)
        spec = cache_spec_from_config(config, teacher_checkpoint(config), prepared.tokenizer_path)
        self.scorer = TeacherScorer(spec, open_cache(locate_cache(config)).width, 0.0, cpu_threads=1)
        self.sequences = 0  # sequences scored so far
        self.served: list[dict[str, Any]] = []  # the rows of the last score call

    def score(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.sequences += len(examples)
        self.served = self.scorer.score(examples)["results"]
        return self.served

    def router_step(
        self, examples: list[dict[str, Any]], rows: list[dict[str, Any]], loss_fn: Callable, lr: float
    ) -> list[float]:
        return [self.scorer.router_step(examples, rows, loss_fn, lr)]  # one actor
