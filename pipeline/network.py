"""Whether a network endpoint answers, probed by one short TCP connect, and Hugging Face Hub ids resolved
without the hub client's retries on an offline machine.

The hub client retries an unreachable endpoint five times with back-off (about 20 s per file, several files
per model) before it gives up with a message that names neither the setting nor the fix. So a hub id is
first looked up in the local Hugging Face cache, and only when it is not there is the endpoint probed: an
offline machine gets a clear error in seconds. Ray addresses are probed with the same connect
(`pipeline.ray_session`).
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import ModelError

PROBE_TIMEOUT_S = 3.0
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"


def tcp_answers(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether something accepts a TCP connection at host:port within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:  # refused, unreachable, timed out, or the name does not resolve
        return False


def hub_endpoint() -> str:
    """The hub the Hugging Face libraries talk to (HF_ENDPOINT, as they read it)."""
    return os.environ.get("HF_ENDPOINT", DEFAULT_HUB_ENDPOINT).rstrip("/")


@functools.lru_cache(maxsize=8)
def hub_answers(endpoint: str) -> bool:
    """Whether the hub at `endpoint` accepts connections; probed once per process and endpoint."""
    parts = urlsplit(endpoint)
    port = parts.port or (80 if parts.scheme == "http" else 443)
    return bool(parts.hostname) and tcp_answers(parts.hostname, port)


def _hub_offline() -> bool:
    from huggingface_hub import constants  # why here: keeps the hub client out of light base imports

    return bool(constants.HF_HUB_OFFLINE)


def _in_local_cache(repo_id: str) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, local_files_only=True)  # no network: the local cache only
        return True
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid repo id at all
        return False


def hub_load_kwargs(name_or_path: str, setting: str = "the model") -> dict[str, Any]:
    """The extra `from_pretrained` arguments for `name_or_path`, a local directory or a hub id.

    A local path: none. A hub id in the local Hugging Face cache: `local_files_only=True` when the hub does
    not answer, so the cached copy loads without retries. A hub id not cached: none when the hub answers (the
    libraries download it); otherwise a ModelError naming `setting` (the config key, e.g. "teacher.path")
    and the fixes, within PROBE_TIMEOUT_S.
    """
    path = Path(name_or_path).expanduser()
    if path.exists() or path.is_absolute() or name_or_path.startswith((".", "~")):
        return {}  # a local path (a missing one is the caller's error to word)
    cached = _in_local_cache(name_or_path)
    if _hub_offline():
        if cached:
            return {}  # the libraries read the cache themselves under HF_HUB_OFFLINE
        reason = "HF_HUB_OFFLINE is set"
    else:
        endpoint = hub_endpoint()
        if hub_answers(endpoint):
            return {}
        if cached:
            return {"local_files_only": True}
        reason = f"the hub ({endpoint}) does not answer (no connection within {PROBE_TIMEOUT_S:.0f} s)"
    raise ModelError(
        f"{setting} {name_or_path!r} is not a local directory, so it names a Hugging Face Hub model; "
        f"{reason} and it is not in the local Hugging Face cache. Fix: download it where there is internet "
        f"(`hf download {name_or_path}`) and point {setting} at that local directory, or put it into the "
        f"local Hugging Face cache (HF_HOME){'' if _hub_offline() else ' and set HF_HUB_OFFLINE=1'}."
    )
