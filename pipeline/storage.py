"""Filesystem access for every stage's outputs (cache stores, run directories, locks): local paths and any
fsspec URL (s3://, gs://, memory://, ...), the redaction of URL credentials in everything printed, and byte
counts as people read them (`human_bytes`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from pipeline.errors import CacheError

_LOCAL_PROTOCOLS = ("file", "local")
# fsspec protocol -> the moe-distill extra that installs its backend
_EXTRAS = {"s3": "s3"}
# scheme:// then the userinfo (credentials) before "@"
_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/@\s'\"]*)@")
_KNOWN_SECRETS: set[str] = set()  # credentials seen in this process's URLs (register_secrets)


def register_secrets(*texts: str) -> None:
    """Remember the credentials of the URLs in `texts` (command-line arguments, config values), so `redact`
    hides them wherever they reappear: a storage library's error may quote them without the URL's scheme
    (botocore: 'Invalid bucket name "KEY:SECRET@bucket"')."""
    for text in texts:
        for _, userinfo in _CREDENTIALS.findall(str(text)):
            if not userinfo:
                continue
            _KNOWN_SECRETS.add(userinfo)
            _KNOWN_SECRETS.update(part for part in userinfo.split(":")[1:] if len(part) >= 4)


def redact(text: str) -> str:
    """`text` with the credentials of URLs hidden: s3://KEY:SECRET@bucket/x -> s3://***@bucket/x (also inside
    longer messages), and every registered credential wherever it appears. Everything printed or stored goes
    through this."""
    text = _CREDENTIALS.sub(r"\1***@", text)
    for secret in sorted(_KNOWN_SECRETS, key=len, reverse=True):  # "KEY:SECRET" before "SECRET"
        text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URL credentials from every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or fsspec URL."""
    try:
        fs, path = url_to_fs(url)
    except ImportError as e:
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        extra = _EXTRAS.get(protocol)
        install = f"pip install 'moe-distill[{extra}]'" if extra else "install the fsspec backend it names"
        raise CacheError(
            f"cannot open {redact(url)}: the {protocol}:// filesystem backend is not installed ({e}). Fix: "
            f"{install}."
        ) from None
    if not is_local(fs):
        # Object-store clients cache directory listings per process; Ray tasks in other processes write
        # shards meanwhile, so a cached listing would hide their commits.
        fs.invalidate_cache()
    return fs, path.rstrip("/") if path not in ("/", "") else path


def relative_to(root: str, url: str) -> str:
    """`url` relative to `root` ('/'-separated) when it lies under it; else `url` unchanged."""
    base = root.rstrip("/") + "/"
    return url[len(base) :] if url.startswith(base) else url


def resolve_under(root: str, stored: str) -> str:
    """Inverse of relative_to: a stored relative path resolves under `root` (wherever the root is now)."""
    if "://" in stored or os.path.isabs(stored):
        return stored
    return join(root, stored)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in _LOCAL_PROTOCOLS for p in protocols)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_remote(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, fixed separators): the bytes we hash and checksum."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def pretty_json(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode()


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never a partial one.

    Local: write a temporary sibling, fsync, os.replace. Object stores: a single PUT is already atomic.
    """
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)


def list_files(local_dir: str) -> list[str]:
    """Relative paths ('/'-separated, sorted) of every file under a local directory."""
    out = []
    for root, _dirs, files in os.walk(local_dir):
        for name in files:
            out.append(os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/"))
    return sorted(out)


def human_bytes(n: float) -> str:
    """'512 B', '1.5 MB', '2.0 PB': decimal units, as `cache ls|verify` and the storage report print sizes."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
