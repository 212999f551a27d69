"""On-policy KD methods as pure functions: which sequences a step trains on, and the loss on their targets.

Teacher targets are the cache's sparse format (k kept log-probs + the tail's log-mass per distillation
position), whether read from the cache (dataset / teacher responses) or scored by the teacher service
(student generations). Losses call the sparse-target losses of `pipeline.distill.token_losses`; everything
is on the k + 1 coarsened bins those use (exact when k = V). Rows of every [N, ...] tensor are distillation
positions in (sequence, position) order, `lengths` the rows per sequence.

Methods and what is simplified here (beyond the coarsened bins):
* ImitKD (Lin et al. 2020): forward KL on a mixture of dataset and student-generated sequences, the dataset
  share beta_i decaying linearly over training. Simplified: the mixture is chosen per sequence (a whole
  sequence comes from the data or from the student), not per token of a mixed-policy rollout.
* GKD (Agarwal et al. 2024): with probability lambda a batch is the student's own samples, else the dataset's
  responses; generalised JSD_beta on either. As in the paper (choice per batch).
* MiniLLM (Gu et al. 2024): reverse KL by policy gradient: the single-step term (per-token reverse KL) plus a
  long-term term with length-normalised future rewards r_t = log p(y_t) - log q(y_t), both weighted by the
  importance weight of teacher-mixed sampling (per-token approximation, as the paper). The future returns
  are whitened over the batch, as the released code does to its advantages (the baseline the paper's
  equations leave out; without it the demo's students collapsed, docs/method.md). Simplified: rewards
  are read on the coarsened bins (log-mass of the tail bin for a token outside the teacher's top-k); no PPO
  clipping (each batch of samples makes one update, so the ratio is 1 and clipping would be a no-op) and no
  pre-training (L_PT) term; generating from the teacher-mixed distribution p~ = alpha p +
  (1 - alpha) q needs the teacher at every decoding step, so the integration samples from the student
  (alpha = 0, weights 1) and `mixed_sampling_weights` serves a caller that does mix.
* DistiLLM (Ko et al. 2024): skew KL / skew reverse KL, with student-generated outputs (SGO) used with a
  probability raised when the validation loss rises, and SGOs reused from a replay buffer. Our reading of the
  schedule: +`step` per validation loss increase, capped at `max_prob`; buffer reuse share fixed.
* DistiLLM-2 (Ko et al. 2025): skew KL on teacher responses + skew reverse KL on student responses (the
  contrastive pair). Simplified: fixed alpha and equal weights (no curriculum on alpha or batch reweighting).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from pipeline.distill.token_losses import (
    DEFAULT_TEACHER_LOG_FLOOR,
    NEG_INF,
    coarsened_logprobs,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
)
from pipeline.errors import ConfigError
from pipeline.teacher_service.rows import sparse_tensors


class SparseTargets(NamedTuple):
    """Teacher targets of N distillation positions: indices [N, k], logprobs [N, k] fp32, tail [N] fp32."""

    indices: Tensor
    logprobs: Tensor
    tail: Tensor

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> SparseTargets:
        """Concatenate per-sequence cache or teacher-service rows (logit_indices / logit_values /
        logit_tail_logmass, any numeric dtype) in order."""
        return cls(*sparse_tensors(rows))


def generated_examples(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    seq_ids: Sequence[int],
    eos_id: int | None,
    pad_id: int,
) -> list[dict[str, Any]]:
    """Student samples as training examples (what the teacher service scores: token ids only).

    Each response is cut after its first eos (kept, as in tokenised records) or, without one, stripped of
    trailing padding; response_mask is 1 on the response. Empty responses have nothing to distil: dropped.
    """
    out = []
    for prompt, response, seq_id in zip(prompts, responses, seq_ids, strict=True):
        resp = [int(t) for t in response]
        if eos_id is not None and eos_id in resp:
            resp = resp[: resp.index(eos_id) + 1]
        else:
            while resp and resp[-1] == pad_id:
                resp.pop()
        if resp:
            ids = [int(t) for t in prompt] + resp
            out.append(
                {
                    "seq_id": int(seq_id),
                    "input_ids": ids,
                    "response_mask": [0] * len(prompt) + [1] * len(resp),
                }
            )
    return out


# --- shared pieces -----------------------------------------------------------------------------------------
def _unit(value: float, name: str) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{name}={value} must be in [0, 1]")
    return float(value)


def linear_decay(step: int, decay_steps: int, start: float = 1.0, end: float = 0.0) -> float:
    """start at step 0, then linearly to `end` at `decay_steps`, constant after."""
    if decay_steps < 1:
        raise ConfigError(f"decay_steps={decay_steps} must be >= 1")
    frac = min(max(step, 0), decay_steps) / decay_steps
    return start + (end - start) * frac


def _per_sequence_mean(values: Tensor, lengths: Sequence[int]) -> Tensor:
    """Mean over each sequence's rows, then over sequences (every sequence weighs the same)."""
    if sum(lengths) != values.shape[0] or any(n < 1 for n in lengths):
        raise ValueError(f"lengths {list(lengths)} must be >= 1 and sum to the {values.shape[0]} rows")
    return torch.stack([part.mean() for part in torch.split(values, list(lengths))]).mean()


# --- ImitKD ------------------------------------------------------------------------------------------------
def imitkd_dataset_prob(step: int, decay_steps: int) -> float:
    """beta_i of ImitKD: the share of dataset sequences, 1 at the start, 0 after `decay_steps`."""
    return linear_decay(step, decay_steps, 1.0, 0.0)


def choose_dataset_rows(num_rows: int, dataset_prob: float, generator: random.Random) -> list[bool]:
    """Per sequence: True = train on the dataset sequence, False = on the student's own generation."""
    p = _unit(dataset_prob, "dataset_prob")
    return [generator.random() < p for _ in range(num_rows)]


def mix_rows(dataset: Sequence[Any], generated: Sequence[Any], use_dataset: Sequence[bool]) -> list[Any]:
    """The ImitKD batch: row i from `dataset` where use_dataset[i], else from `generated`."""
    if not len(dataset) == len(generated) == len(use_dataset):
        raise ValueError("dataset, generated and use_dataset must have one entry per sequence")
    return [d if keep else g for d, g, keep in zip(dataset, generated, use_dataset, strict=True)]


def imitkd_loss(targets: SparseTargets, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Forward KL to the teacher on the mixed batch's positions (mean over positions)."""
    return forward_kl(*targets, student_logits, temperature=temperature).mean()


# --- GKD ---------------------------------------------------------------------------------------------------
def gkd_use_student_data(student_fraction: float, generator: random.Random) -> bool:
    """GKD's per-batch draw: True (probability lambda) = train on the student's own samples this step."""
    return generator.random() < _unit(student_fraction, "student_fraction (lambda)")


def gkd_loss(
    targets: SparseTargets, student_logits: Tensor, beta: float = 0.5, temperature: float = 1.0
) -> Tensor:
    """Generalised JSD_beta(p || q) (mean over positions), on whichever data `gkd_use_student_data` chose."""
    return generalized_jsd(*targets, student_logits, beta=beta, temperature=temperature).mean()


# --- MiniLLM -----------------------------------------------------------------------------------------------
def bin_logprobs(
    targets: SparseTargets, student_logits: Tensor, next_tokens: Tensor
) -> tuple[Tensor, Tensor]:
    """(teacher, student) log-probability of the bin holding each sampled next token: its own bin when the
    teacher kept it, else the tail bin. [N] each; the student side keeps its gradient."""
    t_log, s_log = coarsened_logprobs(*targets, student_logits)
    kept = (targets.indices.long() == next_tokens.long().unsqueeze(1)) & (targets.logprobs > NEG_INF)
    k = targets.indices.shape[1]
    column = torch.where(kept.any(dim=1), kept.float().argmax(dim=1), k).unsqueeze(1)
    return t_log.gather(1, column).squeeze(1), s_log.gather(1, column).squeeze(1)


def length_normalized_returns(rewards: Tensor, lengths: Sequence[int]) -> Tensor:
    """MiniLLM's R^Norm_{t+1}: per position t, the mean of the rewards of the positions after t in its
    sequence (0 at a sequence's last position). [N]."""
    out = []
    for r in torch.split(rewards, list(lengths)):
        n = r.shape[0]
        future_sum = r.flip(0).cumsum(0).flip(0) - r  # sum over t' > t
        count = torch.arange(n - 1, -1, -1, dtype=r.dtype, device=r.device)
        out.append(torch.where(count > 0, future_sum / count.clamp_min(1), 0.0))
    return torch.cat(out)


def whitened_returns(returns: Tensor, lengths: Sequence[int]) -> Tensor:
    """Returns shifted and scaled to mean 0 and std 1 over the positions that have a future (the released
    MiniLLM code whitens its advantages over the batch). The whitening is the baseline of the policy
    gradient: raw returns E_q[log p - log q] = -KL are negative on average, and a gradient that pushes down
    every sampled token moves mass to unsampled ones. Each sequence's last position (no future rewards)
    keeps 0. Fewer than two such positions: returned unchanged."""
    has_future = torch.cat([torch.arange(n - 1, -1, -1, device=returns.device) > 0 for n in lengths])
    picked = returns[has_future]
    if picked.numel() < 2:
        return returns
    scaled = (picked - picked.mean()) / (picked.std() + 1e-8)
    return torch.zeros_like(returns).masked_scatter(has_future, scaled)


def mixed_sampling_weights(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """w_t = q(y_t) / (alpha p(y_t) + (1 - alpha) q(y_t)) for tokens drawn from the teacher-mixed policy;
    alpha = 0 (pure student sampling) gives 1."""
    alpha = _unit(alpha, "alpha (teacher mix)")
    if alpha == 0.0:
        return torch.ones_like(student_logp)
    if alpha == 1.0:
        return (student_logp - teacher_logp).exp()
    mix = torch.logaddexp(teacher_logp + math.log(alpha), student_logp + math.log1p(-alpha))
    return (student_logp - mix).exp()


def minillm_loss(
    targets: SparseTargets,
    student_logits: Tensor,
    next_tokens: Tensor,
    lengths: Sequence[int],
    mix_alpha: float = 0.0,
    teacher_log_floor: float = DEFAULT_TEACHER_LOG_FLOOR,
    whiten: bool = True,
) -> Tensor:
    """Surrogate whose gradient is MiniLLM's: sum_t w_t [KL_t(q || p) - A_{t+1} log q(y_t)] with w and A
    held constant, averaged per sequence then over sequences. A = R^Norm, whitened over the batch unless
    `whiten=False` (the paper's equation as written; see whitened_returns). `next_tokens` [N]: the sampled
    token at each position; `mix_alpha`: the teacher share of the distribution they were sampled from."""
    t_lp, s_lp = bin_logprobs(targets, student_logits, next_tokens)
    t_lp = t_lp.clamp_min(teacher_log_floor)
    weights = mixed_sampling_weights(s_lp.detach(), t_lp, mix_alpha)
    returns = length_normalized_returns((t_lp - s_lp).detach(), lengths)
    if whiten:
        returns = whitened_returns(returns, lengths)
    single = reverse_kl(*targets, student_logits, teacher_log_floor=teacher_log_floor)
    return _per_sequence_mean(weights * (single - returns * s_lp), lengths)


# --- DistiLLM ----------------------------------------------------------------------------------------------
@dataclass
class AdaptiveSGOSchedule:
    """Probability of training on student-generated outputs: starts at `start`, +`step` whenever the
    validation loss rises over the previous one, capped at `max_prob`."""

    max_prob: float = 0.5
    step: float = 0.1
    start: float = 0.0
    prob: float = field(init=False)
    last_val_loss: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        _unit(self.max_prob, "max_prob")
        _unit(self.step, "step")
        self.prob = min(_unit(self.start, "start"), self.max_prob)

    def update(self, val_loss: float) -> float:
        if self.last_val_loss is not None and val_loss > self.last_val_loss:
            self.prob = min(self.prob + self.step, self.max_prob)
        self.last_val_loss = float(val_loss)
        return self.prob


class ReplayBuffer:
    """Recent student-generated sequences (FIFO, `capacity`), drawn uniformly without replacement."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ConfigError(f"replay buffer capacity={capacity} must be >= 1")
        self.items: deque[Any] = deque(maxlen=capacity)
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, rows: Sequence[Any]) -> None:
        self.items.extend(rows)

    def sample(self, n: int) -> list[Any]:
        if n > len(self.items):
            raise ValueError(f"asked for {n} sequences, the replay buffer holds {len(self.items)}")
        return self.rng.sample(list(self.items), n)


BatchSource = Literal["dataset", "generate", "replay"]


def distillm_batch_source(
    sgo_prob: float, replay_prob: float, buffer: ReplayBuffer, batch_size: int, generator: random.Random
) -> BatchSource:
    """Where this step's sequences come from: the dataset (1 - sgo_prob), else student outputs, reused from
    the buffer with probability `replay_prob` once it holds a batch, else freshly generated."""
    if generator.random() >= _unit(sgo_prob, "sgo_prob"):
        return "dataset"
    reuse = generator.random() < _unit(replay_prob, "replay_prob")
    return "replay" if reuse and len(buffer) >= batch_size else "generate"


def distillm_loss(
    targets: SparseTargets,
    student_logits: Tensor,
    divergence: Literal["skl", "srkl"] = "skl",
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """Skew KL (skl) or skew reverse KL (srkl), alpha = 0.1 as DistiLLM (mean over positions)."""
    fn = {"skl": skew_forward_kl, "srkl": skew_reverse_kl}.get(divergence)
    if fn is None:
        raise ConfigError(f"divergence={divergence!r} must be 'skl' or 'srkl'")
    return fn(*targets, student_logits, alpha=alpha, temperature=temperature).mean()


# --- DistiLLM-2 --------------------------------------------------------------------------------------------
def distillm2_loss(
    teacher_side: tuple[SparseTargets, Tensor],
    student_side: tuple[SparseTargets, Tensor],
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """Skew KL on teacher responses + skew reverse KL on the student's own responses (each a mean over its
    positions). Each side: (teacher targets, student logits) at that response's positions."""
    (t_targets, t_logits), (s_targets, s_logits) = teacher_side, student_side
    pull_up = skew_forward_kl(*t_targets, t_logits, alpha=alpha, temperature=temperature).mean()
    push_down = skew_reverse_kl(*s_targets, s_logits, alpha=alpha, temperature=temperature).mean()
    return pull_up + push_down
