"""Tokenisation with an exact response mask.

A tokenised example is `bos? + prompt tokens + response tokens + eos` with response_mask 0 on the prompt
(and bos) and 1 on the response and eos. Prompt and response are tokenised separately and concatenated, so
the mask boundary is exact (no offset mapping guesswork) and a generation prompt (`tokenize_prompt`) is
token-for-token the prefix of the training sequence. Sequences longer than `max_length` are dropped and
counted, never truncated: a cut response would teach the model to stop mid-answer (no eos) and silently
change what the teacher cache holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.data.records import Record
from pipeline.data.split import Splits, split_records
from pipeline.data.template import format_prompt
from pipeline.errors import ConfigError, DataError

__all__ = [
    "Splits",
    "TokenizeStats",
    "split_records",
    "tokenize_prompt",
    "tokenize_record",
    "tokenize_records",
    "uses_bos",
]


@dataclass
class TokenizeStats:
    num_kept: int = 0
    num_too_long: int = 0


def uses_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own special-token handling starts a sequence with bos (Llama: yes, Qwen: no).

    We follow the tokenizer instead of guessing from `bos_token_id`: GPT-2 style tokenizers define a bos
    token but never add it, and the model was trained that way.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def tokenize_prompt(tokenizer: Any, record: Record) -> list[int]:
    """Token ids of the prompt alone (bos included when the tokenizer uses one): the generation input."""
    return _bos(tokenizer) + _encode(tokenizer, [format_prompt(record)])[0]


def tokenize_record(tokenizer: Any, record: Record, max_length: int) -> dict[str, list[int]] | None:
    """{"input_ids", "response_mask"} for one record, or None when it is longer than `max_length` tokens."""
    _check_max_length(max_length)
    prompt_ids, response_ids = _encode(tokenizer, [format_prompt(record), record.response])
    return _assemble(_bos(tokenizer), prompt_ids, response_ids, _eos(tokenizer), max_length)


def tokenize_records(
    tokenizer: Any, records: Sequence[Record], max_length: int
) -> tuple[list[dict[str, Any]], TokenizeStats]:
    """Tokenise `records` (batched); each kept example gets "seq_id" = its index in `records`."""
    _check_max_length(max_length)
    bos, eos = _bos(tokenizer), _eos(tokenizer)
    prompts = _encode(tokenizer, [format_prompt(r) for r in records])
    responses = _encode(tokenizer, [r.response for r in records])
    examples: list[dict[str, Any]] = []
    for seq_id, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ex = _assemble(bos, p, r, eos, max_length)
        if ex is not None:
            examples.append({"seq_id": seq_id, **ex})
    return examples, TokenizeStats(num_kept=len(examples), num_too_long=len(records) - len(examples))


def check_some_record_fits(
    tokenizer: Any, records: Sequence[Record], max_length: int, what: str, chunk: int = 256
) -> None:
    """DataError when not one of `records` fits in `max_length` tokens (nothing to train or cache on),
    naming the shortest and longest lengths. Tokenises chunk by chunk and stops at the first that fits, so on
    usable data it costs one chunk."""
    _check_max_length(max_length)
    bos, eos = _bos(tokenizer), _eos(tokenizer)
    lengths: list[int] = []
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        prompts = _encode(tokenizer, [format_prompt(r) for r in part])
        responses = _encode(tokenizer, [r.response for r in part])
        for p, r in zip(prompts, responses, strict=True):
            if _assemble(bos, p, r, eos, max_length) is not None:
                return
            lengths.append(len(bos) + len(p) + len(r) + 1)  # the assembled sequence's length
    if not lengths:
        raise DataError(f"the {what} has no records. Fix: check data.path and the data's format.")
    raise DataError(
        f"every one of the {len(lengths)} records of the {what} is longer than data.max_length={max_length} "
        f"tokens (shortest {min(lengths)}, longest {max(lengths)}), so nothing could be trained on. Fix: "
        f"--set data.max_length={min(lengths)} or more (or use shorter records)."
    )


def _assemble(
    bos: list[int], prompt: list[int], response: list[int], eos: int, max_length: int
) -> dict[str, list[int]] | None:
    prefix = bos + prompt
    target = [*response, eos]
    if len(prefix) + len(target) > max_length:
        return None
    return {"input_ids": prefix + target, "response_mask": [0] * len(prefix) + [1] * len(target)}


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _bos(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_token_id] if uses_bos(tokenizer) else []


def _eos(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} has no eos token, so responses cannot be terminated. "
            "Fix: set tokenizer.eos_token (e.g. to the model's end-of-turn token) before tokenising."
        )
    return int(eos)


def _check_max_length(max_length: int) -> None:
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2 (a prompt token plus eos), got {max_length}.")
