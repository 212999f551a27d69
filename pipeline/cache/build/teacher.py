"""The teacher side of the cache stage: tokenise a shard's records, run the teacher, produce its arrays.

`tokenize_shard` and `compute_shard` are plain functions (the local executor, tests and the benchmark call
them without Ray); `TeacherShardStage` is the Ray Data actor wrapper (tokenising runs as CPU tasks, see
build.py). One input row = one shard, so a shard's content depends only on its own records (and the
micro-batch size and CPU thread count, which change float rounding and are therefore fixed by the manifest
layout): deterministic whatever the scheduling.

Placement (`teacher_placement`): num_gpus_per_actor 0 -> CPU; (0, 1] -> one GPU (`.to("cuda")`); > 1 -> one
teacher split over that many GPUs by accelerate (`from_pretrained(device_map="auto", max_memory=...)`), for a
teacher larger than one GPU. Inputs go to the input embedding's device; every per-layer result is gathered to
the CPU layer by layer, and logits are sparsified on the output embedding's device before they move.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM

from pipeline.cache.build.augment import augmented_targets
from pipeline.cache.build.sparsify import sparsify_logits
from pipeline.cache.format.codecs import ShardStateRows, StateBasis, StatesCodec, encode_states
from pipeline.cache.format.manifest import read_manifest
from pipeline.cache.format.shard import ShardData, rows_to_table, shard_to_row
from pipeline.cache.format.side_files import read_basis
from pipeline.cache.format.spec import CacheSpec, KnowledgeAugmentation
from pipeline.data.collate import distill_positions, pad_batch
from pipeline.data.tokenize import tokenize_records
from pipeline.errors import CacheError
from pipeline.models.adapter import MoEAdapter
from pipeline.models.alignment import aggregate_expert_states, aggregate_gates
from pipeline.models.build import load_causal_lm
from pipeline.models.generate import generate_token_ids
from pipeline.models.truncation import truncated_states
from pipeline.network import hub_load_kwargs
from pipeline.placement import TeacherPlacement, check_no_offload, teacher_placement, visible_gpu_memory


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
    states: StatesCodec = field(default_factory=StatesCodec)  # schema 2 when not plain float16/bfloat16
    augmentation: KnowledgeAugmentation = field(default_factory=KnowledgeAugmentation)
    states_mass: float = 1.0  # < 1: mass-truncated states (pipeline.models.truncation)

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
            states=spec.states,
            augmentation=spec.knowledge_augmentation,
            states_mass=spec.states_mass,
        )


# teacher_targets' per-row kept router mass (m < 1): summed into the shard's commit record, never stored
KEPT_MASS = "states_kept_mass"


# --- tokenisation (CPU tasks) -------------------------------------------------------------------------------
def tokenize_shard(
    tokenizer: Any, records: Sequence[Any], first_seq_id: int, max_length: int
) -> list[dict[str, Any]]:
    """Tokenised examples of one shard; seq_id = index of the record in the full record list."""
    examples, _stats = tokenize_records(tokenizer, list(records), max_length)
    for ex in examples:
        ex["seq_id"] += first_seq_id
    return examples


# --- the teacher computation --------------------------------------------------------------------------------
@torch.no_grad()
def teacher_targets(
    adapter: Any, batch: dict[str, torch.Tensor], out: TeacherOutputSpec
) -> dict[str, torch.Tensor]:
    """One micro-batch: logits (full, at the distillation positions), aggregated gates and states (float32).

    Rows are the distillation positions in (sequence, position) order. Gates and states are aggregated on
    their layer's device and gathered to the CPU layer by layer (with a device_map teacher, layers sit on
    different GPUs; the all-expert outputs are freed as soon as their layer is folded). Logits stay on the
    output embedding's device, where `sparsify_logits` runs; only the sparse result moves to the CPU.
    """
    token_mask = distill_positions(batch["response_mask"])
    truncated = out.store_expert_states and out.states_mass < 1.0
    fwd = adapter.forward_with_experts(
        batch["input_ids"], batch["attention_mask"], out.cached_layers, token_mask,
        compute_experts=not truncated,
    )  # fmt: skip
    result = {"logits": fwd.logits[token_mask.to(fwd.logits.device)].float()}
    gates, states, kept = [], [], []
    for layer in out.cached_layers:
        probs = fwd.router_probs.pop(layer).float()
        gates.append(aggregate_gates(probs, out.width).cpu())
        if truncated:  # only the experts carrying the top states_mass of each group's router mass run
            x, logits = fwd.expert_inputs.pop(layer), fwd.router_logits.pop(layer)
            view = adapter.block_view(layer)
            h, mass, _ = truncated_states(view, x, logits, probs, out.width, out.states_mass)
            states.append(h.cpu())
            kept.append(mass.cpu())
            del x, logits
        elif out.store_expert_states:
            experts = fwd.expert_outputs.pop(layer)
            states.append(aggregate_expert_states(probs, experts.float(), out.width).cpu())
            del experts
        del probs
    result["gates"] = torch.stack(gates, dim=1)
    if out.store_expert_states:
        result["expert_states"] = torch.stack(states, dim=1)
    if truncated:
        result[KEPT_MASS] = torch.stack(kept, dim=1)  # [N, P]: the router mass whose experts ran
    return result


def score_sequences(
    adapter: Any, batch: dict[str, torch.Tensor], out: TeacherOutputSpec, seeds: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The sparse targets of one padded micro-batch, as the cache stores them: logit_indices, logit_values,
    logit_tail_logmass (rows = distillation positions in (sequence, position) order), gates and, when the
    spec keeps them, expert_states. The one scoring path of both the cache stage (`compute_shard`) and the
    teacher service; `seeds` (one per sequence, its seq_id) seed sampled-mode draws. With knowledge
    augmentation the forward is the KA average (pipeline.cache.build.augment). Sparse arrays may still
    be on the teacher's output device (`to_storage` moves them)."""
    if out.augmentation.is_plain:
        targets = teacher_targets(adapter, batch, out)
    else:
        targets = augmented_targets(
            lambda: teacher_targets(adapter, batch, out), adapter, out.augmentation, seeds
        )
    counts = distill_positions(batch["response_mask"]).sum(dim=1).tolist()
    ind, val, tail = sparsify_logits(targets.pop("logits"), out.logits_mode, out.logits_k, seeds, counts)
    targets.update(logit_indices=ind, logit_values=val, logit_tail_logmass=tail)
    return targets


def compute_shard(
    adapter: Any,
    examples: Sequence[dict[str, Any]],
    shard_id: int,
    num_records: int,
    out: TeacherOutputSpec,
    micro_batch: int,
    pad_id: int,
    basis: StateBasis | None = None,
) -> ShardData:
    """All cached arrays of one shard. Sequences are micro-batched longest-first (less padding) and the rows
    put back in seq_id order, so results depend on the shard's content only. basis: the cache's state basis
    (a low-rank states codec only)."""
    t0 = time.perf_counter()
    device = input_device(adapter.model)
    counts = [int(sum(e["response_mask"][1:])) for e in examples]
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]) if counts else np.zeros(1, np.int64)
    # Preallocate the shard in its storage dtypes and fill it per micro-batch: peak memory is the shard's
    # stored size plus one micro-batch in fp32 (never the whole shard's fp32 states or dense logits).
    arrays = {
        name: np.empty((int(offsets[-1]), *shape), dtype=dtype)
        for name, (shape, dtype) in _storage_layout(out, int(adapter.hidden_size)).items()
    }
    state_rows = None  # schema 2: only kept rows, encoded by the states codec
    if out.store_expert_states and out.states.schema_version > 1:
        trailing = (len(out.cached_layers), out.width, int(adapter.hidden_size))
        seq_ids = [int(e["seq_id"]) for e in examples]
        state_rows = ShardStateRows(out.states, basis, seq_ids, counts, trailing)
        del arrays["expert_states"]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    kept: list[torch.Tensor] = []  # [rows, P] kept router mass per micro-batch (states_mass < 1)
    for start in range(0, len(order), micro_batch):
        idx = order[start : start + micro_batch]
        batch = {k: v.to(device) for k, v in pad_batch([examples[i] for i in idx], pad_id).items()}
        splits = [counts[i] for i in idx]
        targets = score_sequences(adapter, batch, out, [examples[i]["seq_id"] for i in idx])
        if KEPT_MASS in targets:
            kept.append(targets.pop(KEPT_MASS).double())
        for name, t in targets.items():
            if name == "expert_states" and state_rows is not None:
                row = 0
                for i, n in zip(idx, splits, strict=True):
                    state_rows.put(int(offsets[i]), t[row : row + n])
                    row += n
                continue
            stored = to_storage(name, t, out.states_dtype)
            row = 0  # rows of a micro-batch are in (sequence, position) order
            for i, n in zip(idx, splits, strict=True):
                arrays[name][offsets[i] : offsets[i] + n] = stored[row : row + n]
                row += n
    if state_rows is not None:
        arrays.update(state_rows.arrays)
    responses = None
    if out.teacher_responses != "none":
        responses = teacher_responses(
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
        kept_mass=kept_mass_record(out.states_mass, kept) if kept else None,
    )


def kept_mass_record(mass: float, kept: Sequence[torch.Tensor]) -> dict[str, float]:
    """What a shard records of a mass-truncated build (its commit record's "states_mass"): the target m and
    the router mass whose experts ran, over its (token, layer) rows: sum (float64, so shards add up), rows,
    mean and min. Every kept row's mass is >= m (each group keeps at least m of its mass)."""
    rows = torch.cat([k.reshape(-1) for k in kept])
    total = float(rows.sum())
    return {
        "target": float(mass),
        "kept_sum": total,
        "rows": int(rows.numel()),
        "kept_mean": total / max(int(rows.numel()), 1),
        "kept_min": float(rows.min()) if rows.numel() else 1.0,
    }


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


def to_storage(name: str, t: torch.Tensor, states_dtype: str) -> np.ndarray:
    """One scored array in its storage dtype (what a shard holds and the teacher service sends)."""
    if name == "expert_states":
        return encode_states(t, states_dtype)
    dtype = {"logit_indices": torch.int32, "logit_tail_logmass": torch.float32}.get(name, torch.float16)
    return t.to(dtype).cpu().numpy()  # the dtype cast first: a GPU -> CPU copy of the storage size only


def teacher_responses(
    model: Any, examples: Sequence[dict[str, Any]], mode: str, max_new_tokens: int, pad_id: int
) -> list[list[int]]:
    """Teacher responses for SeqKD, one sequence at a time (no padding effects); sampling is seeded by seq_id
    (temperature 1, no top-k/top-p truncation) so a resumed build regenerates identical responses."""
    out = []
    for ex in examples:
        mask = list(ex["response_mask"])
        prompt_len = mask.index(1) if 1 in mask else len(mask)
        out += generate_token_ids(
            model,
            [list(ex["input_ids"])[:prompt_len]],
            max_new_tokens=max_new_tokens,
            pad_id=pad_id,
            eos_id=model.config.eos_token_id,
            greedy=mode != "sample",
            seed=int(ex["seq_id"]),
            batch_size=1,
        )
    return out


def input_device(model: Any) -> torch.device:
    """Where a batch must go: the input embedding's device (the first GPU of a device_map teacher)."""
    return model.get_input_embeddings().weight.device


def load_teacher(teacher_path: str, compute_dtype: str, placement: TeacherPlacement) -> Any:
    """The teacher in eval mode on its placement."""
    if placement.kind != "device_map":
        model = load_causal_lm(teacher_path, torch_dtype=compute_dtype, setting="teacher.path")
        return model.to(placement.kind)
    n = len(placement.max_memory or {})
    try:
        model = AutoModelForCausalLM.from_pretrained(
            teacher_path,
            dtype=getattr(torch, compute_dtype),
            **hub_load_kwargs(teacher_path, "teacher.path"),
            **placement.from_pretrained_kwargs(),
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CacheError(
            f"cannot load the teacher {teacher_path!r} over {n} GPUs (device_map='auto'): "
            f"{str(e).strip().rstrip('.')}. Fix: check "
            "teacher_path; if it does not fit, raise cache.num_gpus_per_actor."
        ) from None
    check_no_offload(getattr(model, "hf_device_map", None), n)
    return model.eval()


class TeacherShardStage:
    """Ray Data actor UDF: one model replica; one input row (a tokenised shard) -> one output row (arrays).

    cpu_threads: torch threads (float rounding depends on it); the Ray path passes the manifest's value, the
    local executor sets it around its whole run instead (None: leave the process setting alone).
    cache_url: the cache being built; a low-rank states codec loads (and checks) its basis from there.
    """

    def __init__(
        self,
        spec: CacheSpec,
        width: int,
        micro_batch: int,
        num_gpus: float,
        cpu_threads: int | None = None,
        cache_url: str | None = None,
    ) -> None:
        if cpu_threads is not None:
            torch.set_num_threads(int(cpu_threads))
        self.placement = teacher_placement(num_gpus, visible_gpu_memory())
        model = load_teacher(spec.teacher_path, spec.compute_dtype, self.placement)
        self.adapter = MoEAdapter(model)
        self.out = TeacherOutputSpec.from_spec(spec, width)
        self.basis = None
        if spec.store_expert_states and spec.states.rank is not None and cache_url is not None:
            manifest = read_manifest(cache_url)
            assert manifest is not None, "the build writes the manifest before any teacher actor starts"
            self.basis = read_basis(cache_url, manifest)
        self.micro_batch = micro_batch
        pad = model.config.pad_token_id
        # right padding is masked; the id only has to be valid
        self.pad_id = int(pad if pad is not None else 0)

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
                self.basis,
            )
            rows.append(shard_to_row(data))
        return rows_to_table(rows)
