"""A model's dimensions from its config alone, never from its weights.

The one probe for every stage that must know a model's shape without loading it: the cache stage (the
teacher's layers, experts and sizes for the cache key and manifest), the student side (layer pairing, expert
count, logits width), evaluation (an exported student's expert count) and the storage report. Light on
purpose: a local checkpoint's config.json is read as JSON, and only a hub id goes through transformers'
AutoConfig, so report and evaluation paths stay free of torch.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.models.families import moe_layer_indices, num_routed_experts
from pipeline.network import hub_load_kwargs

# What pipeline.models.build.tiny_moe_hf_config instantiates for a `build` model.
BUILT_MODEL_TYPE = "qwen3_moe"


@dataclass(frozen=True)
class ModelDims:
    model_type: str  # the config's model_type (for `upcycle_from`: the dense source's)
    num_layers: int  # MoE layers (what layer pairing counts); every decoder layer for a dense model
    num_experts: int | None  # routed experts per MoE layer; None for a dense model
    hidden_size: int
    vocab_size: int | None  # logits width; None only for a `build` model probed without its tokenizer
    # The decoder layers holding the MoE layers, where some decoder layers are dense (DeepSeek's
    # first_k_dense_replace, Qwen's mlp_only_layers, Llama 4's moe_layers); None: every decoder layer.
    moe_layers: tuple[int, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The manifest's teacher record; `moe_layers` only where it is not every decoder layer (so an
        all-MoE teacher's record is what it always was)."""
        record = dataclasses.asdict(self)
        if self.moe_layers is None:
            del record["moe_layers"]
        else:
            record["moe_layers"] = list(self.moe_layers)
        return record


def dims_from_config(cfg: Mapping[str, Any], name: str) -> ModelDims:
    """Dimensions from a config.json mapping (`name` only names the model in errors)."""
    cfg = cfg.get("text_config") or cfg  # multimodal wrappers keep the language model's config there
    try:
        num_layers, hidden_size = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
        vocab_size = int(cfg["vocab_size"])
    except KeyError as exc:
        raise ConfigError(
            f"config.json of {name!r} has no {exc}: not a decoder LM config. Fix: point at a causal LM "
            "checkpoint (a directory with its config.json) or its hub id."
        ) from None
    experts = num_routed_experts(cfg, name)
    moe = moe_layer_indices(cfg, num_layers) if experts else list(range(num_layers))
    if not moe:
        raise ConfigError(
            f"config.json of {name!r} routes {experts} experts but none of its {num_layers} decoder layers "
            "is an MoE layer (first_k_dense_replace / mlp_only_layers / decoder_sparse_step / "
            "moe_layers). Fix: point at an MoE checkpoint with at least one MoE layer."
        )
    return ModelDims(
        model_type=str(cfg.get("model_type", "?")),
        num_layers=len(moe),
        num_experts=experts,
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        moe_layers=None if len(moe) == num_layers else tuple(moe),
    )


def read_dims(
    name_or_path: str,
    *,
    role: str = "model",
    fix: str = "check the path (a directory with config.json) or the hub id.",
    local_files_only: bool = False,
) -> ModelDims:
    """Dimensions of a checkpoint directory or hub id; ConfigError naming `role` and `fix` when its config
    cannot be read. `local_files_only`: never download a hub config (the local Hugging Face cache only)."""
    config_json = Path(name_or_path).expanduser() / "config.json"
    try:
        if config_json.is_file():
            raw = json.loads(config_json.read_text())
        else:
            from transformers import AutoConfig  # hub ids only: local checkpoints need no transformers

            # A hub id: the local cache only when asked, else a clear error in seconds when offline.
            hub = {"local_files_only": True} if local_files_only else hub_load_kwargs(name_or_path, role)
            raw = AutoConfig.from_pretrained(name_or_path, **hub).to_dict()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the {role} config at {name_or_path!r}: {exc}. Fix: {fix}") from None
    return dims_from_config(raw, name_or_path)


def model_dims(
    model: ModelConfig, vocab_size: int | None = None, *, read: Callable[[str], ModelDims] = read_dims
) -> ModelDims:
    """Dimensions of the model `model` describes, without building it.

    `build`: the architecture section, with `vocab_size` (the tokenizer's size, which a built model's logits
    have); `path`: that checkpoint's config; `upcycle_from`: the dense config with `model.num_experts`.
    `read` resolves a path or hub id (default `read_dims`; the storage report adds offline fallbacks).
    """
    if model.build is not None:
        b = model.build
        return ModelDims(BUILT_MODEL_TYPE, b.num_layers, b.num_experts, b.hidden_size, vocab_size)
    if model.path is not None:
        return read(model.path)
    assert model.upcycle_from is not None  # validate_config guarantees exactly one source
    return dataclasses.replace(read(model.upcycle_from), num_experts=model.num_experts)


# --- offline: dimensions without a download -------------------------------------------------------------
def _dense(model_type: str, num_layers: int, hidden_size: int, vocab_size: int) -> ModelDims:
    return ModelDims(model_type, num_layers, None, hidden_size, vocab_size)


# Dense hub models the presets upcycle (transformers config.json values), so a projection needs no download.
KNOWN_ARCHITECTURES: dict[str, ModelDims] = {
    "qwen3-4b": _dense("qwen3", num_layers=36, hidden_size=2560, vocab_size=151936),
    "qwen3-0.6b": _dense("qwen3", num_layers=28, hidden_size=1024, vocab_size=151936),
    "llama-3.1-8b": _dense("llama", num_layers=32, hidden_size=4096, vocab_size=128256),
    "llama-3.2-1b": _dense("llama", num_layers=16, hidden_size=2048, vocab_size=128256),
}


def normalize_model_name(name: str) -> str:
    """'meta-llama/Llama-3.1-8B-Instruct' -> 'llama-3.1-8b', 'Qwen/Qwen3-4B-Base' -> 'qwen3-4b'."""
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    base = re.sub(r"^meta-", "", base)
    base = re.sub(r"^llama-?(\d)", r"llama-\1", base)
    return re.sub(r"(-(instruct|base|hf|chat|moe))+$", "", base)


def resolve_architecture(name: str, role: str = "teacher") -> ModelDims:
    """Dimensions from a local config.json, the known-architecture table or the local Hugging Face cache --
    never a download, never the weights."""
    if (Path(name).expanduser() / "config.json").is_file():
        return read_dims(name, role=role)
    known = KNOWN_ARCHITECTURES.get(normalize_model_name(name))
    if known is not None:
        return known
    try:
        return read_dims(name, role=role, local_files_only=True)
    except ConfigError:
        raise ConfigError(
            f"unknown {role} {name!r}: its dimensions are not in the table of known architectures "
            f"({', '.join(sorted(KNOWN_ARCHITECTURES))}) nor in the local Hugging Face cache. Fix: give a "
            f"local path (a directory with the model's config.json) as {role}.path / {role}.upcycle_from, "
            "or report on a built store instead."
        ) from None
