"""Instruction records (Dolly format) and loading them from JSONL files or `datasets` sources.

A record is `{"instruction", "context", "response", "category"}`; `context` and `category` are optional.
Local .jsonl/.json files are parsed here, line by line, so a malformed record can be reported as
`file:line`; anything else (a hub name, a local dataset directory, a .parquet/.csv file, or a builder name
such as "json" plus `data_files=`) goes through `datasets.load_dataset`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DataError

REQUIRED_FIELDS = ("instruction", "response")
OPTIONAL_FIELDS = ("context", "category")
FIELDS = ("instruction", "context", "response", "category")

_JSON_SUFFIXES = (".jsonl", ".json")
# Other local files are handed to the matching `datasets` builder.
_BUILDER_BY_SUFFIX = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

_FIX = (
    "Each record must be a JSON object with non-empty string fields 'instruction' and 'response' and "
    "optional string fields 'context' and 'category'. Fix or delete the record, or load with strict=False "
    "to skip malformed records."
)


@dataclass(frozen=True)
class Record:
    instruction: str
    context: str
    response: str
    category: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass
class LoadStats:
    num_loaded: int = 0
    num_skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)


def load_records(
    source: str | os.PathLike[str],
    *,
    split: str = "train",
    strict: bool = False,
    **load_dataset_kwargs: Any,
) -> tuple[list[Record], LoadStats]:
    """Load Dolly-format records from `source`.

    `source` is a .jsonl/.json file (parsed here; `split` is ignored since a file is one split), another local
    data file (.parquet/.csv/.arrow), a local dataset directory, or anything `datasets.load_dataset` accepts
    (extra keyword arguments such as `data_files=` or `cache_dir=` are forwarded to it).
    strict=True raises DataError on the first malformed record; strict=False skips and counts them.
    """
    source_str = os.fspath(source)
    path = Path(source_str).expanduser()
    if path.suffix.lower() in _JSON_SUFFIXES and not load_dataset_kwargs:
        if not path.is_file():
            raise DataError(
                f"data file {source_str!r} does not exist. Fix: check the path (relative paths are resolved "
                f"against the current directory {os.getcwd()!r})."
            )
        rows = _read_json_rows(path, strict)
        where = str(path)
    else:
        rows = _read_dataset_rows(source_str, path, split, load_dataset_kwargs)
        where = source_str
    records, stats = _validate_rows(rows, strict)
    if stats.num_loaded == 0:
        raise DataError(
            f"no valid records in {where!r} ({stats.num_skipped} skipped: {stats.skipped_reasons}). "
            f"Fix: point the data source at a Dolly-format dataset. {_FIX}"
        )
    return records, stats


def write_jsonl(records: Iterable[Record], path: str | os.PathLike[str]) -> None:
    """Write records as JSONL (atomically: a reader never sees a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def records_fingerprint(records: Iterable[Record]) -> str:
    """sha256 over the records' content and order: the dataset part of a teacher-cache key."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.instruction, r.context, r.response, r.category], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


# --- internals -----------------------------------------------------------------------------------------
# A "row" is (location, parsed value or None, reason-if-unparseable): validation is shared by both readers.
_Row = tuple[str, Any, str | None]


def _read_json_rows(path: Path, strict: bool) -> Iterator[_Row]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {str(path)!r}: {e}. Fix: make it a readable UTF-8 JSONL file.") from e
    # A .json file is either one JSON array of records or (as often on the hub) JSON Lines.
    if path.suffix.lower() == ".json" and raw.lstrip().startswith(b"["):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(
                f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}). Fix: re-encode the file as "
                "UTF-8, or store one record per line (.jsonl): bad records are then skipped (strict=False)."
            ) from e
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: invalid JSON ({e.msg}). Fix: repair the file, or store one record per "
                "line as .jsonl so malformed records can be skipped with strict=False."
            ) from e
        for i, item in enumerate(items):
            yield f"{path}: record {i + 1}", item, None
        return
    # JSON Lines are decoded line by line: a bad byte costs its record (skipped and counted, or an error
    # naming the line with strict=True), never the whole file.
    for lineno, raw_line in enumerate(raw.split(b"\n"), start=1):
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield f"{path}:{lineno}", None, f"not_utf8 ({e.reason} at column {e.start + 1})"
            continue
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not records
        try:
            yield f"{path}:{lineno}", json.loads(line), None
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", None, f"invalid_json ({e.msg})"


def _read_dataset_rows(source: str, path: Path, split: str, kwargs: dict[str, Any]) -> Iterator[_Row]:
    import datasets  # heavy import, only needed for this path

    if path.is_file() and "data_files" not in kwargs:
        builder = _BUILDER_BY_SUFFIX.get(path.suffix.lower())
        if path.suffix.lower() in _JSON_SUFFIXES:
            builder = "json"
        if builder is None:
            raise DataError(
                f"unsupported data file {source!r}. Fix: use .jsonl, .json, .parquet, .csv or .arrow."
            )
        args, kwargs = (builder,), {**kwargs, "data_files": str(path)}
    elif path.suffix.lower() in (*_JSON_SUFFIXES, *_BUILDER_BY_SUFFIX) and not path.exists():
        raise DataError(f"data file {source!r} does not exist. Fix: check the path.")
    else:
        args = (source,)
    try:
        ds = datasets.load_dataset(*args, split=split, **kwargs)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, ConnectionError...)
        raise DataError(
            f"datasets.load_dataset({source!r}, split={split!r}) failed: {type(e).__name__}: {e}. "
            "Fix: pass a path to a Dolly-format .jsonl file, a local dataset directory, or a dataset already "
            "in the local Hugging Face cache (this pipeline never downloads), and check the split name."
        ) from e
    missing = [c for c in REQUIRED_FIELDS if c not in ds.column_names]
    if missing:
        raise DataError(
            f"dataset {source!r} (split {split!r}) has no column(s) {missing}; it has {ds.column_names}. "
            "Fix: rename the columns to the Dolly names instruction/context/response/category "
            "(e.g. Dataset.rename_column) and save it with Dataset.to_json(...)."
        )
    for i, row in enumerate(ds):
        yield f"{source} (split {split!r}): row {i + 1}", row, None


def _validate_rows(rows: Iterable[_Row], strict: bool) -> tuple[list[Record], LoadStats]:
    records: list[Record] = []
    reasons: Counter[str] = Counter()
    for where, value, reason in rows:
        if reason is None:
            record, reason = _to_record(value)
            if record is not None:
                records.append(record)
                continue
        assert reason is not None
        if strict:
            raise DataError(f"{where}: malformed record: {reason}. {_FIX}")
        reasons[reason.split(" ", 1)[0]] += 1  # count by kind; drop per-record detail
    stats = LoadStats(len(records), sum(reasons.values()), dict(sorted(reasons.items())))
    return records, stats


def _to_record(value: Any) -> tuple[Record | None, str | None]:
    if not isinstance(value, Mapping):
        return None, f"not_an_object (got {type(value).__name__})"
    fields: dict[str, str] = {}
    for name in FIELDS:
        v = value.get(name)
        if v is None:  # absent, or null (datasets fills absent columns with None)
            if name in REQUIRED_FIELDS:
                return None, f"missing_{name}"
            v = ""
        if not isinstance(v, str):
            return None, f"non_string_field ({name!r} is {type(v).__name__})"
        if name in REQUIRED_FIELDS and not v.strip():
            return None, f"empty_{name}"
        fields[name] = v
    return Record(**fields), None
