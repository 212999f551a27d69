"""The storage report of the cache a config would build, from dimensions alone: no model is loaded, teacher
dimensions come from the teacher's config.json (local path), the table of known hub architectures or the
local Hugging Face cache (pipeline.models.dims.resolve_architecture). The report itself:
pipeline/reports/storage.py."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pipeline.cache.format.codecs import StatesCodec
from pipeline.config import CacheConfig, Config
from pipeline.models.alignment import layer_pairs
from pipeline.models.dims import model_dims, resolve_architecture
from pipeline.reports.storage import (
    DEFAULT_PROJECTED_TOKENS,
    FieldBytes,
    StorageReport,
    dense_fp32,
    describe_states,
)
from pipeline.storage import human_bytes


def project_from_config(
    config: Config, projected_tokens: float | None = None, usd_per_gb_month: float = 0.023, source: str = ""
) -> StorageReport:
    """Bytes per token of the cache `config` would build, from dimensions alone (no model is loaded)."""
    t = config.teacher
    vocab = _tokenizer_vocab(config) if t.build is not None else None  # a built model's logits: its tokenizer
    arch = model_dims(t, vocab, read=functools.partial(resolve_architecture, role="teacher"))
    experts = arch.num_experts or t.num_experts  # a checkpoint without an expert count: the config's
    model_type = arch.model_type
    if t.build is not None:
        model_type += " (built)"
    elif t.upcycle_from is not None:
        model_type += f" upcycled to {experts} experts"
    layers_cfg = config.cache.layers
    if layers_cfg == "all":
        cached = arch.num_layers
    elif layers_cfg == "paired":
        student_layers = _student_layers(config)
        cached = len({tl for _, tl in layer_pairs(arch.num_layers, student_layers)})
    else:
        cached = len(layers_cfg)
    width = config.cache.width or experts
    k = config.cache.logits_k
    # Index estimate: sequences of max_length tokens, half of them response (input_ids int32 + mask int8 per
    # token, 20 B of per-sequence columns, Arrow list offsets).
    seq = config.data.max_length
    index = (seq * 5 + 20 + 8) / (seq / 2)
    codec = config_states_codec(config.cache)
    logical = {
        "logits": k * (4 + 2) + 4.0,
        "gates": cached * width * 2.0,
        "expert_states": (
            codec.stored_bytes_per_token(cached, width, arch.hidden_size)
            if config.cache.store_expert_states
            else 0.0
        ),
        "index": index,
    }
    dense = dense_fp32(
        {"num_layers": arch.num_layers, "num_experts": experts, "hidden_size": arch.hidden_size,
         "vocab_size": arch.vocab_size},
        index_per_token=index,
    )  # fmt: skip
    fields = [FieldBytes(n, v, v, dense[n]) for n, v in logical.items()]
    dims = {
        "teacher": t.path or t.upcycle_from or "built from config",
        "model_type": model_type,
        "num_layers": arch.num_layers,
        "num_experts": experts,
        "hidden_size": arch.hidden_size,
        "vocab_size": arch.vocab_size,
        "cached_layers": cached,
        "width": width,
        "logits": f"{config.cache.logits_mode}-{k}",
        "states": describe_states(codec, config.cache.states_mass)
        if config.cache.store_expert_states
        else "not stored",
    }
    notes = [
        "projection from the config alone: uncompressed sizes (compression needs data; a built store's "
        "report shows the measured ratio)",
        f"index estimated for {seq}-token sequences with half of the tokens in the response",
    ]
    if codec.rank is not None and config.cache.store_expert_states:
        basis = cached * width * arch.hidden_size * (codec.rank + 1) * 4
        notes.append(
            f"plus the rank-{codec.rank} state basis, once per cache: {human_bytes(basis)} (not per token); "
            "what low rank and fp8/int8 cost the student (MC-loss error, gradient cosine) is measured on the "
            "demo teacher by jobs/benchmarks/bench_state_codecs.py, not for this model"
        )
    return StorageReport(
        source=source or f"config {config.name}",
        measured=False,
        dims=dims,
        fields=fields,
        projected_tokens=DEFAULT_PROJECTED_TOKENS if projected_tokens is None else float(projected_tokens),
        usd_per_gb_month=usd_per_gb_month,
        notes=notes,
    )


def config_states_codec(cache: CacheConfig) -> StatesCodec:
    """The states codec a config's cache section asks for (states_codec null = states_dtype)."""
    return StatesCodec(
        codec=cache.states_codec or cache.states_dtype,
        rank=cache.states_rank,
        basis_tokens=cache.states_basis_tokens,
        token_fraction=cache.states_token_fraction,
    )


def _student_layers(config: Config) -> int:
    return model_dims(config.student, read=functools.partial(resolve_architecture, role="student")).num_layers


def _tokenizer_vocab(config: Config) -> int:
    path = config.tokenizer.path
    if path is None:
        return config.tokenizer.vocab_size  # the demo tokenizer is trained to this size
    local = Path(path).expanduser()
    if (local / "tokenizer.json").is_file():
        tok = json.loads((local / "tokenizer.json").read_text())
        return len(tok["model"]["vocab"]) + len(tok.get("added_tokens", []))
    vocab = resolve_architecture(path, role="tokenizer").vocab_size
    assert vocab is not None  # a checkpoint's config always has one
    return vocab
