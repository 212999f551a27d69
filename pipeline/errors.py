"""Errors a user can act on: every message says what is wrong and how to fix it; and the one line that
names the cause of a failure behind Ray's wrappers (`root_cause`), for every stage and the command line."""

from __future__ import annotations

import re


class MoeDistillError(Exception):
    """Base class; the CLI prints these without a traceback."""


class ConfigError(MoeDistillError):
    """A config file is malformed, has unknown keys, wrong types or points at missing files."""


class DataError(MoeDistillError):
    """Input records are malformed or a data source cannot be read."""


class ModelError(MoeDistillError):
    """A model is unsupported, or teacher and student do not fit together."""


class CacheError(MoeDistillError):
    """A teacher cache is missing, incomplete, corrupted or does not fit the student."""


def root_cause(e: BaseException) -> str:
    """One line for the user: the remote exception behind Ray's wrappers ("RuntimeError: ...").

    A RayTaskError carries the remote exception as `.cause`; its text is a traceback followed by Ray Data's
    retry hints, so the last line is not the error (ray 2.60)."""
    seen: set[int] = set()
    while type(e).__module__.startswith("ray.") and id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if type(e).__module__.startswith("ray."):  # no remote exception object: find its line in the text
        errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*: ", ln)]
        text = errors[-1] if errors else (lines[-1] if lines else "")
    else:
        text = f"{type(e).__name__}: {' '.join(lines)}"
    return text[:500].rstrip(".")
