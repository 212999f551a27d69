"""What a training run *is*: the settings that decide its result, recorded beside the run.

A finished run is reused when it is asked for again, so its directory must never be reused for different
settings (a sweep over a field that is not in the readable run name, or a changed step count, would
otherwise silently pick up the old student). Runtime-only settings (placement, checkpoint cadence, retries,
logging) do not change what is trained and are left out (pipeline.config.RUNTIME_ONLY_TRAIN_FIELDS).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import stable_hash
from pipeline.errors import ConfigError

SETTINGS_FILE = "settings.json"


def settings_fingerprint(settings: dict[str, Any], length: int = 6) -> str:
    return stable_hash(settings, length=length)


def changed_settings(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as "key: old -> new"."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += changed_settings(a, b, prefix=f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def claim_run_dir(run_dir: Path, settings: dict[str, Any], *, what: str, fix: str) -> None:
    """Record `settings` as the identity of `run_dir`, or refuse when the run there was made with others.

    Compared through a JSON round trip, so tuples and lists (and int/float spellings) compare as stored.
    """
    settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
    path = Path(run_dir) / SETTINGS_FILE
    if path.exists():
        recorded = json.loads(path.read_text())
        changes = changed_settings(recorded, settings)
        if changes:
            shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
            raise ConfigError(f"{what} at {run_dir} was made with other settings ({shown}). Fix: {fix}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
    tmp.replace(path)
