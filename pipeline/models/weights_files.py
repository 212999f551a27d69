"""A cheap completeness check of a checkpoint's safetensors files, before any stage loads them: a file cut
short (an interrupted copy or export) is named with its sizes instead of failing inside a Ray task."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from pipeline.errors import ModelError


def truncated_weight_files(checkpoint: str | Path) -> list[tuple[Path, int, int]]:
    """(file, size on disk, size its header promises) for every *.safetensors file of `checkpoint` that is
    shorter than its own header says, or whose header cannot be read. Reads only the headers."""
    bad = []
    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with open(path, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                if header_len > size:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(header_len))
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
            want = 8 + header_len + max(ends, default=0)
        except (struct.error, ValueError, KeyError, TypeError, IndexError):
            want = -1  # not even a readable header
        if want < 0 or size < want:
            bad.append((path, size, want))
    return bad


def check_weight_files(checkpoint: str | Path, what: str) -> None:
    """ModelError naming `what` and the first truncated or unreadable safetensors file of `checkpoint`."""
    bad = truncated_weight_files(checkpoint)
    if not bad:
        return
    path, size, want = bad[0]
    state = f"{size} of {want} bytes" if want >= 0 else f"{size} bytes, no readable safetensors header"
    raise ModelError(
        f"{what}: weights file {path} is truncated or damaged ({state}). Fix: copy or export that checkpoint "
        "again, or leave that model out (--model NAME=PATH for the others)."
    )
