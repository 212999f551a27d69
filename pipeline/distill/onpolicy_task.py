"""On-policy KD as a Ray Train task: the student samples on its worker, the teacher service scores them.

One task for every wired on-policy preset (pipeline.distill.methods.ON_POLICY_METHODS), parameterised by it:
* which rows of a batch are the student's own samples: GKD draws once per batch (probability lambda =
  `student_fraction`), ImitKD per sequence (dataset share beta_i decaying linearly over the run's steps),
  MiniLLM always; DistiLLM-2 trains on both sides of every prompt: the cached teacher response and the
  student's own, both scored by the teacher service (the cache holds no targets for teacher responses);
* the loss on the batch (`OnPolicyMethodSpec.loss`, a function of pipeline.distill.onpolicy, with its
  `loss_kwargs`); no SFT term, as these methods.
DistiLLM (distillm-sgo) draws per batch (onpolicy.distillm_batch_source): the dataset, fresh student samples
or ones reused from a per-worker replay buffer; the training loop's validation hook (`validation_every`,
`on_validation`) raises the student probability when the validation loss rises; schedule and buffer travel
in every checkpoint (`task_state`), so a resumed run continues where it stopped.
Draws come from DistillTask's seeding (seed, rank, step, micro-batch), so a resumed run draws the same.
Student rows: the worker generates responses to the batch's prompts with the student itself (temperature
sampling) and sends only their token ids to the teacher service. Dataset rows: the batch's responses with
their cached targets (the base preset's cached fields, `OnPolicyMethodSpec.base`).
SAR trains on the dataset sequences with its base preset's terms (SFT + forward KL), on targets the teacher
service serves after a router step toward the student (`_sar_step`: token ids and sparse rows travel).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from pipeline.cache.build.sparsify import topk_sparsify
from pipeline.cache.build.teacher import to_storage
from pipeline.config import Config
from pipeline.data.collate import distill_positions, pad_batch
from pipeline.distill import onpolicy
from pipeline.distill.methods import SAR_ROUTER_LR, ResolvedMethod, resolve_method
from pipeline.distill.onpolicy import SparseTargets, generated_examples
from pipeline.distill.task import DistillTask
from pipeline.errors import ConfigError
from pipeline.models.generate import generate_token_ids, validation_loss
from pipeline.teacher_service.rows import SPARSE_FIELDS

_SPARSE_NAMES = tuple(name for name, _ in SPARSE_FIELDS)  # logit_indices, logit_values, logit_tail_logmass


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
        validation_examples: Sequence[dict[str, Any]] | None = None,
        method: ResolvedMethod | None = None,
    ) -> None:
        """`validation_examples`: tokenised validation records, for a method that validates during training
        (distillm-sgo); `method`: the run's resolved method (None: resolved here)."""
        method = method or resolve_method(config.distill)
        online = method.online
        if online is None:
            raise ConfigError(
                f"distill.method={config.distill.method!r} is an offline method: it trains with DistillTask. "
                "Fix: set distill.method to an on-policy preset (imitkd, gkd-on-policy, minillm, distillm-2, "
                "sar)."
            )
        super().__init__(
            config,
            tokenizer_path=tokenizer_path,
            pairs=pairs,
            teacher_hidden_size=teacher_hidden_size,
            method=method,  # dataset batches: its base preset's terms (sar trains on them)
        )
        self.online = online
        self.client = client  # a TeacherClient: picklable, travels inside the task factory
        self.total_steps = int(total_steps)
        self.student_fraction = student_fraction
        self.max_new_tokens = max_new_tokens
        self.validation_examples = list(validation_examples or [])
        self.sgo_schedule: onpolicy.AdaptiveSGOSchedule | None = None
        self.validation_every = 0  # the training loop's validation cadence (0: none)
        if online.sgo:
            self._init_sgo()

    def compute_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        seed = self.mc_generator(torch.device("cpu"), step).initial_seed()
        steps = {
            "sampled": self._sampled_step,
            "contrastive": self._contrastive_step,
            "router_step": self._sar_step,
        }  # the preset's `step` (OnPolicyMethodSpec)
        return steps[self.online.step](model, batch, step, seed)

    def _sampled_step(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int, seed: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One loss on a batch of dataset rows (cached targets) and the student's own samples (served)."""
        extra: dict[str, float] = {}
        if self.online.rows == "adaptive":  # DistiLLM: the whole batch from one source, its schedule's draw
            examples, targets, from_data, extra = self._sgo_batch(model, batch, random.Random(seed), seed)
        else:
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
            **extra,
        }
        return loss, parts

    def _init_sgo(self) -> None:
        """DistiLLM's schedule, replay buffer and validation cadence (its preset's OnPolicyMethodSpec.sgo)."""
        sgo, train = self.online.sgo, self.config.distill.train
        if not self.validation_examples:
            raise ConfigError(
                f"{self.online.name} raises its student-output probability when the validation loss rises, "
                "but OnPolicyTask got no validation examples. Fix: pass the tokenised validation split as "
                "validation_examples (run_distill does); if that split is empty, raise data.val_fraction."
            )
        self.sgo_schedule = onpolicy.AdaptiveSGOSchedule(max_prob=sgo["max_prob"], step=sgo["step"])
        self.replay = onpolicy.ReplayBuffer(int(sgo["replay_batches"]) * train.batch_size, seed=train.seed)
        self.replay_prob = float(sgo["replay_prob"])
        self.validation_every = max(1, self.total_steps // int(sgo["validations"]))

    def _sgo_batch(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], rng: random.Random, seed: int
    ) -> tuple[list[dict[str, Any]], SparseTargets, list[bool], dict[str, float]]:
        """DistiLLM's batch: the dataset responses with cached targets, fresh student samples (kept in the
        replay buffer) or samples reused from it; also its rows' from-data flags and metrics."""
        assert self.sgo_schedule is not None
        n = int(batch["input_ids"].shape[0])
        prob = self.sgo_schedule.prob
        source = onpolicy.distillm_batch_source(prob, self.replay_prob, self.replay, n, rng)
        if source == "dataset":
            examples, targets = self._mixed_batch(model, batch, [True] * n, seed)
        else:
            if source == "generate":
                ids, mask = batch["input_ids"].cpu(), batch["response_mask"].cpu()
                fresh = self._student_rows(model, ids, mask, list(range(n)), seed)
                pairs = [fresh[i] for i in sorted(fresh)]
                self.replay.add(pairs)
            else:
                pairs = self.replay.sample(n)
            if not pairs:
                raise ConfigError("every student sample was empty. Fix: raise max_new_tokens.")
            examples = [example for example, _ in pairs]
            targets = SparseTargets(*(torch.cat(c) for c in zip(*(t for _, t in pairs), strict=True)))
        metrics = {"sgo_prob": prob, "replayed": float(source == "replay")}
        return examples, targets, [source == "dataset"] * n, metrics

    def validation_loss(self, model: torch.nn.Module) -> float:
        """The student's response-token cross-entropy on the validation split: the measure the distill stage
        reports for the finished run (pipeline.models.generate.validation_loss), here on every worker."""
        student = _unwrapped(model).student
        return validation_loss(student, self.validation_examples, self.tokenizer.pad_token_id)

    def on_validation(self, val_loss: float, step: int) -> dict[str, float]:
        """DistiLLM's rule: a validation loss above the previous one raises the student-output probability."""
        assert self.sgo_schedule is not None
        self.sgo_schedule.update(val_loss)
        return {}

    def task_state(self) -> dict[str, Any]:
        """distillm-sgo's schedule and replay buffer, as tensors and plain containers (a checkpoint's task
        state, loaded with weights_only=True)."""
        if self.sgo_schedule is None:
            return {}
        version, words, gauss = self.replay.rng.getstate()
        return {
            "sgo_prob": self.sgo_schedule.prob,
            "last_val_loss": self.sgo_schedule.last_val_loss,
            "replay": [[example, list(targets)] for example, targets in self.replay.items],
            "replay_rng": [version, list(words), gauss],
        }

    def load_task_state(self, state: dict[str, Any]) -> None:
        if self.sgo_schedule is None or not state:
            return
        self.sgo_schedule.prob = float(state["sgo_prob"])
        self.sgo_schedule.last_val_loss = state["last_val_loss"]
        self.replay.items.clear()
        self.replay.add([(example, SparseTargets(*targets)) for example, targets in state["replay"]])
        version, words, gauss = state["replay_rng"]
        self.replay.rng.setstate((version, tuple(words), gauss))

    def _contrastive_step(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int, seed: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """DistiLLM-2: skew KL on the teacher's responses + skew reverse KL on the student's, one forward."""
        ids, mask = batch["input_ids"].cpu(), batch["response_mask"].cpu()
        teacher_side = _batch_examples(batch)
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

    def _sar_step(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int, seed: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """SAR on the batch's dataset sequences: rank 0 steps the teacher's routers toward the student's
        sparse distribution there (every replica takes the same step); then each worker trains on its base
        preset's terms (SFT + forward KL) against what the updated, densely routing teacher serves. With
        several workers only rank 0 steps (one router step per micro-batch whatever the worker count); the
        barriers keep every worker's scoring away from the routers while they change."""
        examples = _batch_examples(batch)
        token_mask = distill_positions(batch["response_mask"])
        with torch.no_grad():  # on every rank: a DDP / FSDP forward is a collective
            forward = model(batch["input_ids"], batch["attention_mask"], token_mask, with_experts=False)
            logits = forward.logits[token_mask].float()
        rank, world = _rank_and_world()
        _barrier(world)  # every worker's targets of the previous micro-batch are in
        parts: dict[str, float] = {}
        if rank == 0:
            k = min(self.config.cache.logits_k, int(logits.shape[1]))  # the cache's sparse format
            counts = token_mask.sum(dim=1).tolist()
            columns = [torch.split(t, counts) for t in topk_sparsify(logits, k)]
            rows = [{n: to_storage(n, t, "float16") for n, t in zip(_SPARSE_NAMES, seq, strict=True)}
                    for seq in zip(*columns, strict=True)]  # fmt: skip
            loss_fn = partial(getattr(onpolicy, self.online.loss), **self.online.loss_kwargs)
            # the replicas take identical steps: one loss (before the step) stands for all
            parts["sar_loss"] = self.client.router_step(examples, rows, loss_fn, SAR_ROUTER_LR)[0]
        _barrier(world)  # the routers are updated before any worker scores
        served = SparseTargets.from_rows(self.client.score(examples))
        device = batch["input_ids"].device
        served_batch = {**batch, **{n: t.to(device) for n, t in zip(_SPARSE_NAMES, served, strict=True)}}
        loss, metrics = super().compute_loss(model, served_batch, step)
        return loss, {**metrics, **parts}

    def _dataset_rows(self, n: int, step: int, rng: random.Random) -> list[bool]:
        """Per row: True = the dataset sequence with its cached targets, False = the student's own sample
        (the preset's `rows`, pipeline.distill.methods.ONPOLICY_ROWS)."""
        rows = self.online.rows
        if rows == "per_batch":
            return [not onpolicy.gkd_use_student_data(self.student_fraction, rng)] * n
        if rows == "per_sequence":
            share = onpolicy.imitkd_dataset_prob(step, max(1, self.total_steps))
            return onpolicy.choose_dataset_rows(n, share, rng)
        if rows == "student":
            return [False] * n
        raise ConfigError(f"on-policy method {self.online.name!r}: OnPolicyTask has no data rule {rows!r}")

    def _loss(
        self, targets: SparseTargets, logits: torch.Tensor, input_ids: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor:
        fn, kwargs = getattr(onpolicy, self.online.loss), dict(self.online.loss_kwargs)
        if self.online.loss_inputs == "samples":  # a policy gradient (minillm)
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
        inner = _unwrapped(model)
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


def _batch_examples(batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """The batch's sequences as teacher-service examples (token ids only, padding cut; seq_id = row)."""
    ids, mask = batch["input_ids"].cpu(), batch["response_mask"].cpu()
    lengths = batch["attention_mask"].cpu().sum(dim=1).tolist()
    return [
        {"seq_id": i, "input_ids": ids[i, :n].tolist(), "response_mask": mask[i, :n].tolist()}
        for i, n in enumerate(int(x) for x in lengths)
    ]


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the training process group; (0, 1) in a plain process (tests)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _unwrapped(model: torch.nn.Module) -> Any:
    """The DistillStudent inside a DDP wrapper (a lone worker's model is not wrapped)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
