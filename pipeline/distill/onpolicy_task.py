"""On-policy KD as a Ray Train task: the student samples on its worker, the teacher service scores them.

One task for every wired on-policy preset (pipeline.distill.methods.ON_POLICY_METHODS), parameterised by it:
* which rows of a batch are the student's own samples: GKD draws once per batch (probability lambda =
  `student_fraction`), ImitKD per sequence (dataset share beta_i decaying linearly over the run's steps),
  MiniLLM always; DistiLLM-2 trains on both sides of every prompt: the cached teacher response and the
  student's own, both scored by the teacher service (the cache holds no targets for teacher responses);
* the loss on the batch (`OnPolicyMethodSpec.loss`, a function of pipeline.distill.onpolicy, with its
  `loss_kwargs`); no SFT term, as these methods.
Draws come from DistillTask's seeding (seed, rank, step, micro-batch), so a resumed run draws the same.
Student rows: the worker generates responses to the batch's prompts with the student itself (temperature
sampling) and sends only their token ids to the teacher service. Dataset rows: the batch's responses with
their cached targets (the base preset's cached fields, `OnPolicyMethodSpec.base`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from pipeline.config import Config
from pipeline.data.collate import distill_positions, pad_batch
from pipeline.distill import onpolicy
from pipeline.distill.methods import offline_base, on_policy_method
from pipeline.distill.onpolicy import SparseTargets, generated_examples
from pipeline.distill.task import DistillTask
from pipeline.errors import ConfigError
from pipeline.models.generate import generate_token_ids


class OnPolicyTask(DistillTask):
    def __init__(
        self,
        config: Config,
        *,
        tokenizer_path: str,
        pairs: Sequence[tuple[int, int]],
        teacher_hidden_size: int,
        client: Any,
        total_steps: int,
        student_fraction: float = 1.0,
        max_new_tokens: int = 32,
    ) -> None:
        online = on_policy_method(config.distill)
        if online is None:
            raise ConfigError(
                f"distill.method={config.distill.method!r} is an offline method: it trains with DistillTask. "
                "Fix: set distill.method to an on-policy preset (imitkd, gkd-on-policy, minillm, distillm-2)."
            )
        super().__init__(
            replace(config, distill=offline_base(config.distill)),
            tokenizer_path=tokenizer_path,
            pairs=pairs,
            teacher_hidden_size=teacher_hidden_size,
        )
        self.online = online
        self.method = replace(self.method, name=online.name)  # what the export records
        self.client = client  # a TeacherClient: picklable, travels inside the task factory
        self.total_steps = int(total_steps)
        self.student_fraction = student_fraction
        self.max_new_tokens = max_new_tokens

    def compute_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        seed = self.mc_generator(torch.device("cpu"), step).initial_seed()
        if self.online.loss == "distillm2_loss":
            return self._contrastive_step(model, batch, seed)
        from_data = self._dataset_rows(int(batch["input_ids"].shape[0]), step, random.Random(seed))
        examples, targets = self._mixed_batch(model, batch, from_data, seed)
        device = batch["input_ids"].device
        padded = {k: v.to(device) for k, v in pad_batch(examples, self.tokenizer.pad_token_id).items()}
        targets = SparseTargets(*(t.to(device) for t in targets))
        token_mask = distill_positions(padded["response_mask"])
        forward = model(padded["input_ids"], padded["attention_mask"], token_mask, with_experts=False)
        logits = forward.logits[token_mask].float()
        loss = self._loss(targets, logits, padded["input_ids"], token_mask)
        parts = {
            "loss": float(loss.detach()),
            "on_policy": 1.0 - sum(from_data) / len(from_data),  # share of rows the student generated
            "tokens": float(logits.shape[0]),
        }
        return loss, parts

    def _contrastive_step(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], seed: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """DistiLLM-2: skew KL on the teacher's responses + skew reverse KL on the student's, one forward."""
        ids, mask = batch["input_ids"].cpu(), batch["response_mask"].cpu()
        lengths = batch["attention_mask"].cpu().sum(dim=1).tolist()
        teacher_side = [
            {"seq_id": i, "input_ids": ids[i, :n].tolist(), "response_mask": mask[i, :n].tolist()}
            for i, n in enumerate(int(x) for x in lengths)
        ]
        t_targets = SparseTargets.from_rows(self.client.score(teacher_side))
        student = self._student_rows(model, ids, mask, list(range(len(teacher_side))), seed)
        if not student:
            raise ConfigError("every student sample was empty. Fix: raise max_new_tokens.")
        s_targets = SparseTargets(*(torch.cat(c) for c in zip(*(student[i][1] for i in sorted(student)))))
        examples = teacher_side + [student[i][0] for i in sorted(student)]
        device = batch["input_ids"].device
        padded = {k: v.to(device) for k, v in pad_batch(examples, self.tokenizer.pad_token_id).items()}
        token_mask = distill_positions(padded["response_mask"])
        forward = model(padded["input_ids"], padded["attention_mask"], token_mask, with_experts=False)
        logits = forward.logits[token_mask].float()
        split = int(t_targets.indices.shape[0])  # rows are in example order: the teacher side first
        t_targets, s_targets = (SparseTargets(*(t.to(device) for t in x)) for x in (t_targets, s_targets))
        loss = onpolicy.distillm2_loss(
            (t_targets, logits[:split]),
            (s_targets, logits[split:]),
            temperature=self.config.distill.temperature,
            **self.online.loss_kwargs,
        )
        parts = {"loss": float(loss.detach()), "on_policy": 0.5, "tokens": float(logits.shape[0])}
        return loss, parts

    def _dataset_rows(self, n: int, step: int, rng: random.Random) -> list[bool]:
        """Per row: True = the dataset sequence with its cached targets, False = the student's own sample."""
        loss = self.online.loss
        if loss == "gkd_loss":
            return [not onpolicy.gkd_use_student_data(self.student_fraction, rng)] * n
        if loss == "imitkd_loss":
            share = onpolicy.imitkd_dataset_prob(step, max(1, self.total_steps))
            return onpolicy.choose_dataset_rows(n, share, rng)
        if loss == "minillm_loss":
            return [False] * n
        raise ConfigError(f"on-policy method {self.online.name!r}: OnPolicyTask has no data rule for {loss}")

    def _loss(
        self, targets: SparseTargets, logits: torch.Tensor, input_ids: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor:
        fn, kwargs = getattr(onpolicy, self.online.loss), dict(self.online.loss_kwargs)
        if self.online.loss == "minillm_loss":
            # the sampled token at each distillation position is the next input token
            next_tokens = input_ids[:, 1:][token_mask[:, :-1]]
            lengths = [int(n) for n in token_mask.sum(dim=1).tolist() if n > 0]
            return fn(targets, logits, next_tokens, lengths, **kwargs)
        return fn(targets, logits, temperature=self.config.distill.temperature, **kwargs)

    def _mixed_batch(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], from_data: list[bool], seed: int
    ) -> tuple[list[dict[str, Any]], SparseTargets]:
        """The rows to train on (token-id examples, in batch order) and their teacher targets concatenated:
        cached for dataset rows, served by the teacher for the student's samples (empty samples dropped)."""
        ids, mask = batch["input_ids"].cpu(), batch["response_mask"].cpu()
        lengths = batch["attention_mask"].cpu().sum(dim=1).tolist()
        cached = [
            torch.split(batch[name].cpu(), distill_positions(mask).sum(dim=1).tolist())
            for name in ("logit_indices", "logit_values", "logit_tail_logmass")
        ] if any(from_data) else None  # fmt: skip
        served = self._student_rows(model, ids, mask, [i for i, d in enumerate(from_data) if not d], seed)
        examples, parts = [], []
        for i, use_data in enumerate(from_data):
            if use_data:
                n = int(lengths[i])
                examples.append({"input_ids": ids[i, :n].tolist(), "response_mask": mask[i, :n].tolist()})
                parts.append(SparseTargets(cached[0][i].long(), cached[1][i].float(), cached[2][i].float()))
            elif i in served:
                examples.append(served[i][0])
                parts.append(served[i][1])
        if not examples:
            raise ConfigError("every student sample was empty. Fix: raise max_new_tokens.")
        return examples, SparseTargets(*(torch.cat(column) for column in zip(*parts, strict=True)))

    def _student_rows(
        self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: list[int], seed: int
    ) -> dict[int, tuple[dict[str, Any], SparseTargets]]:
        """Row -> (the student sample for its prompt, the teacher targets for it); only token ids travel."""
        if not rows:
            return {}
        inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        prompts = [ids[i, : int(mask[i].argmax())].tolist() for i in rows]
        tok = self.tokenizer
        responses = generate_token_ids(
            inner.student,
            prompts,
            max_new_tokens=self.max_new_tokens,
            pad_id=tok.pad_token_id,
            eos_id=tok.eos_token_id,
            greedy=False,
            seed=seed & 0x7FFF_FFFF,
        )
        inner.train()  # generate_token_ids leaves the model in eval mode
        examples = generated_examples(prompts, responses, rows, tok.eos_token_id, tok.pad_token_id)
        served = self.client.score(examples) if examples else []
        return {
            int(ex["seq_id"]): (ex, SparseTargets.from_rows([row]))
            for ex, row in zip(examples, served, strict=True)
        }
