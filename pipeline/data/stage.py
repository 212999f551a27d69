"""Stage "data": the artefacts every later stage of one config shares -- the records, their deterministic
splits and the tokenizer.

Each stage (fine-tune, cache, distill, evaluate) may run as its own `ray job submit`, so each one calls
`prepare_data(config)`; the first call materialises the demo data and tokenizer, later calls reuse them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config
from pipeline.data.demo_dataset import generate_demo_records
from pipeline.data.demo_tokenizer import train_demo_tokenizer
from pipeline.data.records import LoadStats, Record, load_records, write_jsonl
from pipeline.data.split import Splits, regime_splits, split_records
from pipeline.data.template import format_prompt
from pipeline.errors import DataError
from pipeline.network import hub_load_kwargs
from pipeline.workspace import Paths, paths_for

log = logging.getLogger(__name__)

TOKENIZER_STAMP = "moedistill_tokenizer.json"  # the settings the demo tokenizer was trained with


@dataclass(frozen=True)
class PreparedData:
    splits: Splits[Record]  # `train` is the students' training split (data.student_train_records)
    teacher_train: list[Record]  # what the teacher fine-tunes on (data.teacher_train)
    tokenizer_path: str
    load_stats: LoadStats


def prepare_data(config: Config) -> PreparedData:
    """Load (or generate) the records, split them deterministically and make sure a tokenizer exists."""
    paths = paths_for(config)
    data_cfg = config.data
    if data_cfg.source == "demo":
        source = paths.data / f"demo-{data_cfg.num_demo_records}-seed{data_cfg.seed}.jsonl"
        if not source.exists():
            source.parent.mkdir(parents=True, exist_ok=True)
            tmp = source.with_suffix(".tmp")
            write_jsonl(generate_demo_records(data_cfg.num_demo_records, seed=data_cfg.seed), tmp)
            tmp.replace(source)  # atomic: a killed run never leaves a half-written data file behind
        records, stats = load_records(source, strict=data_cfg.strict)
    else:
        records, stats = load_records(data_cfg.source, split=data_cfg.split, strict=data_cfg.strict)
    if stats.num_skipped:
        log.warning("skipped %d malformed records: %s", stats.num_skipped, stats.skipped_reasons)
    if data_cfg.max_records is not None:
        records = records[: data_cfg.max_records]
    if not records:
        raise DataError(f"data source {data_cfg.source!r} yielded no usable records; check data.source")
    splits = split_records(records, data_cfg.val_fraction, data_cfg.test_fraction, seed=data_cfg.seed)
    # The tokenizer is trained on the whole training split, before the regime takes the students' share.
    tokenizer_path = _ensure_tokenizer(config, splits, paths)
    student_train, teacher_train = regime_splits(
        splits.train, data_cfg.student_train_records, data_cfg.teacher_train, data_cfg.seed
    )
    return PreparedData(
        splits=Splits(train=student_train, validation=splits.validation, test=splits.test),
        teacher_train=teacher_train,
        tokenizer_path=tokenizer_path,
        load_stats=stats,
    )


def _ensure_tokenizer(config: Config, splits: Splits[Record], paths: Paths) -> str:
    if config.tokenizer.path is not None:
        return config.tokenizer.path
    if config.teacher.path is not None and config.data.source != "demo":
        return config.teacher.path  # the teacher's own tokenizer
    stamp = paths.tokenizer / TOKENIZER_STAMP
    if not (paths.tokenizer / "tokenizer.json").exists():
        texts = [format_prompt(r) + r.response for r in splits.train]
        train_demo_tokenizer(texts, paths.tokenizer, vocab_size=config.tokenizer.vocab_size)
        stamp.write_text(json.dumps({"vocab_size": config.tokenizer.vocab_size}))
    elif stamp.is_file() and json.loads(stamp.read_text())["vocab_size"] != config.tokenizer.vocab_size:
        # An earlier run in this output_dir trained it for another size: reusing it would silently size
        # every model for the old vocabulary.
        raise DataError(
            f"the demo tokenizer at {paths.tokenizer} was trained for tokenizer.vocab_size="
            f"{json.loads(stamp.read_text())['vocab_size']}, this config asks for "
            f"{config.tokenizer.vocab_size}. Fix: give this config its own output_dir, or delete that "
            "tokenizer folder (and the runs built on it) to train a new one."
        )
    return str(paths.tokenizer)


_TOKENIZERS: dict[str, Any] = {}


def load_tokenizer(path: str) -> Any:  # a PreTrainedTokenizerBase
    """The tokenizer at `path`, loaded once per process (Ray workers tokenise many shards with it)."""
    if path in _TOKENIZERS:
        return _TOKENIZERS[path]
    from transformers import AutoTokenizer  # keeps transformers out of processes that never tokenise

    try:
        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path, **hub_load_kwargs(path, "the tokenizer"))
        return _TOKENIZERS[path]
    except (OSError, ValueError) as exc:
        raise DataError(
            f"cannot load tokenizer from {path!r}: {exc}. Fix: point tokenizer.path at a local directory "
            "with tokenizer files (this machine may be offline, so hub ids only work when cached)."
        ) from exc
