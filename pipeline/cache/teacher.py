"""The teacher side of the cache stage: tokenise a shard's records, run the teacher, produce its arrays.

`tokenize_shard` and `compute_shard` are plain functions (the local executor, tests and the benchmark call
them without Ray); `TeacherShardStage` is the Ray Data actor wrapper (tokenising runs as CPU tasks, see
build.py). One input row = one shard, so a shard's content depends only on its own records (and the
micro-batch size and CPU thread count, which change float rounding): deterministic whatever the scheduling.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.cache.shard import ShardData, rows_to_table, shard_to_row
from pipeline.cache.spec import CacheSpec


@dataclass(frozen=True)
class TeacherOutputSpec:
    """The slice of CacheSpec the per-shard computation needs, with the width resolved."""

    cached_layers: tuple[int, ...]
    width: int
    logits_mode: str
    logits_k: int
    states_dtype: str
    store_expert_states: bool
    teacher_responses: str
    max_new_tokens: int

    @classmethod
    def from_spec(cls, spec: CacheSpec, width: int) -> TeacherOutputSpec:
        return cls(
            cached_layers=spec.cached_layers,
            width=width,
            logits_mode=spec.logits_mode,
            logits_k=spec.logits_k,
            states_dtype=spec.states_dtype,
            store_expert_states=spec.store_expert_states,
            teacher_responses=spec.teacher_responses,
            max_new_tokens=spec.max_new_tokens,
        )


# --- tokenisation (CPU tasks) -------------------------------------------------------------------------------
_TOKENIZERS: dict[str, Any] = {}


def load_tokenizer(path: str) -> Any:
    if path not in _TOKENIZERS:  # one load per worker process, not per shard
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


def tokenize_shard(
    tokenizer: Any, records: Sequence[Any], first_seq_id: int, max_length: int
) -> list[dict[str, Any]]:
    """Tokenised examples of one shard; seq_id = index of the record in the full record list."""
    from pipeline.data.tokenize import tokenize_records

    examples, _stats = tokenize_records(tokenizer, list(records), max_length)
    for ex in examples:
        ex["seq_id"] += first_seq_id
    return examples


# --- the teacher computation --------------------------------------------------------------------------------
def sparsify_logits(
    logits: torch.Tensor, mode: str, k: int, seeds: Sequence[int], counts: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse teacher distribution for rows of `logits` [N, V] -> (indices [N,k], logprobs [N,k], tail [N]).

    Sampled mode draws per sequence from a generator seeded by its seq_id, so the draws do not depend on how
    sequences are grouped into micro-batches.
    """
    from pipeline.distill.token_losses import sample_sparsify, topk_sparsify

    logits = logits.float()
    if mode == "topk":
        return topk_sparsify(logits, k)
    parts = []
    for rows, seed in zip(torch.split(logits, list(counts)), seeds, strict=True):
        gen = torch.Generator(device=logits.device).manual_seed(int(seed))
        parts.append(sample_sparsify(rows, k, generator=gen))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def encode_states(states: torch.Tensor, dtype: str) -> np.ndarray:
    """float tensor -> numpy in the storage dtype (bfloat16 as uint16 bits: zarr has no bfloat16)."""
    if dtype == "bfloat16":
        return states.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return states.to(torch.float16).cpu().numpy()


def decode_states(arr: np.ndarray, logical: str) -> torch.Tensor:
    """Inverse of encode_states, to float32."""
    if logical == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(arr)).float()


@torch.no_grad()
def teacher_targets(
    adapter: Any, batch: dict[str, torch.Tensor], out: TeacherOutputSpec
) -> dict[str, torch.Tensor]:
    """One micro-batch: logits (full, at the distillation positions), aggregated gates and states (float32).

    Rows are the distillation positions in (sequence, position) order.
    """
    from pipeline.data.collate import distill_positions
    from pipeline.distill.losses import aggregate_expert_states, aggregate_gates

    token_mask = distill_positions(batch["response_mask"])
    fwd = adapter.forward_with_experts(
        batch["input_ids"], batch["attention_mask"], out.cached_layers, token_mask
    )
    result = {"logits": fwd.logits[token_mask].float()}
    probs = [fwd.router_probs[layer].float() for layer in out.cached_layers]
    result["gates"] = torch.stack([aggregate_gates(p, out.width) for p in probs], dim=1)
    if out.store_expert_states:
        result["expert_states"] = torch.stack(
            [
                aggregate_expert_states(p, fwd.expert_outputs[layer].float(), out.width)
                for p, layer in zip(probs, out.cached_layers, strict=True)
            ],
            dim=1,
        )
    return result


def compute_shard(
    adapter: Any,
    examples: Sequence[dict[str, Any]],
    shard_id: int,
    num_records: int,
    out: TeacherOutputSpec,
    micro_batch: int,
    pad_id: int,
) -> ShardData:
    """All cached arrays of one shard. Sequences are micro-batched longest-first (less padding) and the rows
    put back in seq_id order, so results depend on the shard's content only."""
    from pipeline.data.collate import pad_batch

    t0 = time.perf_counter()
    device = next(adapter.model.parameters()).device
    counts = [int(sum(e["response_mask"][1:])) for e in examples]
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]) if counts else np.zeros(1, np.int64)
    # Preallocate the shard in its storage dtypes and fill it per micro-batch: peak memory is the shard's
    # stored size plus one micro-batch in fp32 (never the whole shard's fp32 states or dense logits).
    arrays = {
        name: np.empty((int(offsets[-1]), *shape), dtype=dtype)
        for name, (shape, dtype) in _storage_layout(out, int(adapter.hidden_size)).items()
    }
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    for start in range(0, len(order), micro_batch):
        idx = order[start : start + micro_batch]
        batch = {k: v.to(device) for k, v in pad_batch([examples[i] for i in idx], pad_id).items()}
        targets = teacher_targets(adapter, batch, out)
        splits = [counts[i] for i in idx]
        logits = targets.pop("logits")
        seeds = [examples[i]["seq_id"] for i in idx]
        ind, val, tail = sparsify_logits(logits, out.logits_mode, out.logits_k, seeds, splits)
        targets.update(logit_indices=ind, logit_values=val, logit_tail_logmass=tail)
        for name, t in targets.items():
            stored = _to_storage(name, t, out.states_dtype)
            row = 0  # rows of a micro-batch are in (sequence, position) order
            for i, n in zip(idx, splits, strict=True):
                arrays[name][offsets[i] : offsets[i] + n] = stored[row : row + n]
                row += n
    responses = None
    if out.teacher_responses != "none":
        responses = generate_responses(
            adapter.model, examples, out.teacher_responses, out.max_new_tokens, pad_id
        )
    return ShardData(
        shard_id=shard_id,
        num_records=num_records,
        seq_ids=[int(e["seq_id"]) for e in examples],
        input_ids=[list(map(int, e["input_ids"])) for e in examples],
        response_mask=[list(map(int, e["response_mask"])) for e in examples],
        num_tokens=counts,
        arrays=arrays,
        teacher_response=responses,
        teacher_seconds=time.perf_counter() - t0,
    )


def _storage_layout(out: TeacherOutputSpec, hidden_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Trailing shape and numpy storage dtype of each per-token array."""
    p, w = len(out.cached_layers), out.width
    layout: dict[str, tuple[tuple[int, ...], Any]] = {
        "logit_indices": ((out.logits_k,), np.int32),
        "logit_values": ((out.logits_k,), np.float16),
        "logit_tail_logmass": ((), np.float32),
        "gates": ((p, w), np.float16),
    }
    if out.store_expert_states:
        layout["expert_states"] = (
            (p, w, hidden_size),
            np.uint16 if out.states_dtype == "bfloat16" else np.float16,
        )
    return layout


def _to_storage(name: str, t: torch.Tensor, states_dtype: str) -> np.ndarray:
    if name == "expert_states":
        return encode_states(t, states_dtype)
    dtype = {"logit_indices": torch.int32, "logit_tail_logmass": torch.float32}.get(name, torch.float16)
    return t.to(dtype).cpu().numpy()


@torch.no_grad()
def generate_responses(
    model: Any, examples: Sequence[dict[str, Any]], mode: str, max_new_tokens: int, pad_id: int
) -> list[list[int]]:
    """Teacher responses for SeqKD, one sequence at a time (no padding effects); sampling is seeded by seq_id
    (temperature 1, no top-k/top-p truncation) so a resumed build regenerates identical responses."""
    device = next(model.parameters()).device
    eos = model.config.eos_token_id
    out = []
    for ex in examples:
        mask = list(ex["response_mask"])
        prompt_len = mask.index(1) if 1 in mask else len(mask)
        prompt = torch.tensor([list(ex["input_ids"])[:prompt_len]], dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {"do_sample": False}
        if mode == "sample":
            kwargs = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
        cuda_ids = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_ids):
            torch.manual_seed(int(ex["seq_id"]))
            gen = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad_id,
                **kwargs,
            )
        out.append([int(t) for t in gen[0, prompt_len:].tolist()])
    return out


def _teacher_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


class TeacherShardStage:
    """Ray Data actor UDF: one model replica; one input row (a tokenised shard) -> one output row (arrays)."""

    def __init__(self, spec: CacheSpec, width: int, micro_batch: int, num_gpus: float) -> None:
        from pipeline.models.adapter import MoEAdapter
        from pipeline.models.build import load_causal_lm

        self.device = _teacher_device(num_gpus)
        model = load_causal_lm(spec.teacher_path, torch_dtype=spec.compute_dtype).to(self.device)
        self.adapter = MoEAdapter(model)
        self.out = TeacherOutputSpec.from_spec(spec, width)
        self.micro_batch = micro_batch
        pad = model.config.pad_token_id
        self.pad_id = int(
            pad if pad is not None else 0
        )  # right padding is masked; the id only has to be valid

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for row in batch.to_pylist():
            examples = [
                {"seq_id": s, "input_ids": ids, "response_mask": m}
                for s, ids, m in zip(row["seq_id"], row["input_ids"], row["response_mask"], strict=True)
            ]
            data = compute_shard(
                self.adapter,
                examples,
                row["shard_id"],
                row["num_records"],
                self.out,
                self.micro_batch,
                self.pad_id,
            )
            rows.append(shard_to_row(data))
        return rows_to_table(rows)
