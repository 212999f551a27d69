"""The distillation task every Ray Train worker builds: the student, the batch collation and the loss.

It holds no teacher, only the cache's per-token targets. Built from the typed config plus the few values the
driver derives from the cache (tokenizer, layer pairs, teacher hidden size), so a worker rebuilds exactly
the student the driver planned. Importable without Ray, zarr or datasets (tests run it in plain processes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from pipeline.cache.read.reader import open_cache
from pipeline.config import Config
from pipeline.data.collate import distill_positions, pad_batch
from pipeline.data.stage import load_tokenizer
from pipeline.distill.diagnostics import term_gradient_metrics
from pipeline.distill.methods import ResolvedMethod, resolve_method
from pipeline.distill.objective import combine_terms, objective_terms
from pipeline.distill.student import DistillStudent
from pipeline.errors import CacheError, ConfigError
from pipeline.models.adapter import MoEAdapter
from pipeline.models.export import export_hf_checkpoint
from pipeline.models.stage import materialize_model
from pipeline.training.parallel import decoder_layers

PER_TOKEN_COLUMNS = (
    "logit_indices",
    "logit_values",
    "logit_tail_logmass",
    "gates",
    "expert_states",
    "expert_state_coeffs",
    "expert_state_mask",
)
STATE_COLUMNS = ("expert_states", "expert_state_coeffs")


class DistillTask:
    """`pipeline.training.runner.fit`'s task for one student run (built inside each worker)."""

    def __init__(
        self,
        config: Config,
        *,
        tokenizer_path: str,
        pairs: Sequence[tuple[int, int]],
        teacher_hidden_size: int,
        cache_path: str | None = None,
        method: ResolvedMethod | None = None,
    ) -> None:
        """`pairs`: (student layer, teacher layer) pairs; `teacher_hidden_size`: the cached states' width;
        `cache_path`: the cache whose state basis the MC term reads (distill.mc_state_space: subspace);
        `method`: the run's resolved method (run_distill resolves it once; None: resolved here)."""
        self.config = config
        self.resolved = method or resolve_method(config.distill)
        self.method = self.resolved.spec  # the terms the student trains on
        self.distill = self.resolved.distill  # with the preset's fixed settings filled in
        self.tokenizer_path = tokenizer_path
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        self.teacher_hidden_size = int(teacher_hidden_size)
        self._tokenizer = None
        self._generator: torch.Generator | None = None
        self._last_step, self._micro = -1, 0
        self.cache_path = cache_path
        self._basis: torch.Tensor | None = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def build_model(self) -> torch.nn.Module:
        student = materialize_model(self.config.student, self.tokenizer).float()
        return DistillStudent(student, [s for s, _ in self.pairs], self.teacher_hidden_size)

    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if self.method.uses_teacher_responses:
            batch = _with_teacher_responses(batch)
        padded = pad_batch(batch, self.tokenizer.pad_token_id)
        out = {k: padded[k] for k in ("input_ids", "attention_mask", "response_mask")}
        expected = int(distill_positions(out["response_mask"]).sum())
        for name in PER_TOKEN_COLUMNS:
            if name in batch and not self.method.uses_teacher_responses:
                out[name] = torch.from_numpy(np.concatenate([np.asarray(a) for a in batch[name]], axis=0))
                if out[name].shape[0] != expected:
                    raise CacheError(
                        f"cached {name} has {out[name].shape[0]} token rows for a batch with {expected} "
                        "distillation positions: the cache was built from different tokenisation. Rebuild "
                        "it with `moedistill cache --config ...` for this config."
                    )
        if "expert_state_mask" in out:  # subsampled cache: keep only the rows that carry states
            out["expert_state_mask"] = out["expert_state_mask"].bool()
            for name in STATE_COLUMNS:
                if name in out:
                    out[name] = out[name][out["expert_state_mask"]]
        return out

    def state_basis(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """V [P, E_S, D, q] of the batch's expert_state_coeffs [N, P, E_S, q] (None without them), read
        from the cache once per worker (small: no per-token data) and kept on the batch's device."""
        coeffs = batch.get("expert_state_coeffs")
        if coeffs is None or not self.method.needs_expert_states:
            return None
        if self._basis is None:
            if self.cache_path is None:
                raise ConfigError(
                    "distill.mc_state_space: subspace needs the cache's state basis, but this task was "
                    "built without cache_path. Fix: pass cache_path=... to DistillTask (run_distill does)."
                )
            cache = open_cache(self.cache_path)
            self._basis = cache.group_basis(int(coeffs.shape[2]), [t for _, t in self.pairs]).v
        if self._basis.device != coeffs.device:
            self._basis = self._basis.to(coeffs.device)
        return self._basis

    def fsdp_units(self, model: DistillStudent) -> list[torch.nn.Module]:
        """Decoder layers FSDP may shard on their own: all but the paired ones when the MC term reads every
        expert's weights after the forward (pipeline.training.parallel explains why)."""
        layers = decoder_layers(model)
        if not self.method.needs_expert_states:
            return layers
        decoder = MoEAdapter(model.student).moe_layers  # pairs count MoE layers; dense layers sit between
        paired = {id(model.student.model.layers[decoder[s]]) for s, _ in self.pairs}
        return [layer for layer in layers if id(layer) not in paired]

    def mc_generator(self, device: torch.device, step: int) -> torch.Generator:
        """MC draws seeded by (seed, rank, step, micro-batch): independent across workers and identical
        after a resume, with no generator state to checkpoint. Lives on the gates' device (multinomial
        refuses a CPU generator for CUDA probabilities)."""
        # Ray Train's torch backend gives every worker a process group whose rank is its world rank; without
        # one (a plain process: tests, the GPU check) this is rank 0, so the step runs without Ray installed.
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._micro = self._micro + 1 if step == self._last_step else 0
        self._last_step = step
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        seed = hash((self.config.distill.train.seed, rank, step, self._micro)) & 0x7FFF_FFFF_FFFF_FFFF
        return self._generator.manual_seed(seed)

    def compute_loss(self, model, batch, step):
        generator = self.mc_generator(batch["input_ids"].device, step) if self.method.uses_mc else None
        token_mask = distill_positions(batch["response_mask"])
        forward = model(
            batch["input_ids"],
            batch["attention_mask"],
            token_mask,
            with_experts=self.method.needs_expert_states,
            detach_expert_inputs=self.distill.mc_grad_scope == "experts",
        )
        basis = self.state_basis(batch)
        terms, metrics = objective_terms(
            self.method, self.distill, forward, batch, token_mask, generator, step=step, state_basis=basis
        )
        if self.diagnose(step):
            metrics.update(term_gradient_metrics(model, terms))
        return combine_terms(terms, metrics)

    def diagnose(self, step: int) -> bool:
        """Gradient diagnostics on the steps the training loop logs (the last of each log_every window),
        when distill.diagnostics is on. Not under multi-worker FSDP, whose sharded parameters carry no
        per-group names."""
        train = self.distill.train
        sharded = train.strategy == "fsdp" and train.num_workers > 1
        return self.distill.diagnostics and not sharded and (step + 1) % train.log_every == 0

    def export(self, model: torch.nn.Module, export_dir: str) -> None:
        # Only the HF student is exported; the projections P are training-only (docs/method.md).
        export_hf_checkpoint(
            model.student, self.tokenizer, export_dir, info={"stage": "distill", "method": self.resolved.name}
        )


def _with_teacher_responses(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """SeqKD: the prompt followed by the teacher's cached response instead of the dataset's."""
    ids, masks = [], []
    for input_ids, mask, response in zip(
        batch["input_ids"], batch["response_mask"], batch["teacher_response"], strict=True
    ):
        mask = np.asarray(mask)
        prompt_len = int(np.argmax(mask == 1)) if mask.any() else len(mask)
        prompt = list(np.asarray(input_ids)[:prompt_len])
        resp = list(np.asarray(response))
        ids.append(prompt + resp)
        masks.append([0] * len(prompt) + [1] * len(resp))
    return {"input_ids": ids, "response_mask": masks, "seq_id": list(batch["seq_id"])}
