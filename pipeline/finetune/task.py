"""The teacher's supervised fine-tuning as a training task for the shared loop (also the `sft` recipe)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import ModelConfig
from pipeline.data.collate import pad_batch
from pipeline.data.stage import load_tokenizer
from pipeline.models.export import export_hf_checkpoint
from pipeline.models.stage import materialize_model


class SupervisedTask:
    """Plain next-token cross-entropy on response tokens (the teacher's SFT; also the `sft` baseline)."""

    def __init__(self, model_cfg: ModelConfig, tokenizer_path: str) -> None:
        self.model_cfg = model_cfg
        self.tokenizer_path = tokenizer_path
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def build_model(self) -> torch.nn.Module:
        return materialize_model(self.model_cfg, self.tokenizer).float()

    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        padded = pad_batch(batch, self.tokenizer.pad_token_id)
        return {k: padded[k] for k in ("input_ids", "attention_mask", "labels")}

    def compute_loss(self, model, batch, step):
        loss = model(**batch).loss
        return loss, {"loss": float(loss.detach())}

    def export(self, model: torch.nn.Module, export_dir: str) -> None:
        export_hf_checkpoint(model, self.tokenizer, export_dir, info={"stage": "finetune-teacher"})
