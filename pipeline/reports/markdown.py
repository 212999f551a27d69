"""Writing a report's markdown table: one file under the report's output directory."""

from __future__ import annotations

from pathlib import Path


def write_markdown(text: str, out_dir: str | Path, name: str) -> Path:
    """`text` (plus a final newline) as out_dir/name, the directory created; returns the file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / name
    md.write_text(text + "\n")
    return md
