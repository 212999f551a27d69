"""Hugging Face checkpoints out: `save_pretrained` + tokenizer, committed atomically with a marker file.

The marker (EXPORT_MARKER, written last) is what every later stage checks to know an export is complete; it
records which stage wrote it. Light on purpose (no torch import): evaluation and the CLI check exports without
loading a model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

EXPORT_MARKER = "moedistill_export.json"  # written last: an export without it is incomplete


def export_hf_checkpoint(model, tokenizer, export_dir: str | Path, info: dict) -> None:
    """save_pretrained + tokenizer into a temporary folder, then rename: never a half-written export."""
    export_dir = Path(export_dir)
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / EXPORT_MARKER).write_text(json.dumps({**info, "time": time.time()}, indent=2))
    shutil.rmtree(export_dir, ignore_errors=True)
    tmp.rename(export_dir)


def export_is_complete(export_dir: str | Path) -> bool:
    return (Path(export_dir) / EXPORT_MARKER).exists()
