"""An advisory lock per output directory, for every stage that writes one: one build (or repair) writes a
cache at a time, and one process trains a run directory at a time (the teacher's fine-tune, the upcycled
student's dense pretraining, a student run: `RUN_LOCK_FILE`). A second command waits, then finds the work
finished and reuses it.

The lock is a small JSON file (ROOT/<key>/_BUILD.lock) naming its owner (host, pid) with a heartbeat that a
background thread refreshes. A second build waits for it (then usually finds the cache complete) and
refuses after `wait_s`; a lock whose heartbeat is older than `stale_s` belongs to a build that died and is
taken over. Only the holder clears staging directories, so no build deletes another's half-written shards.
Local files are created atomically (O_EXCL); object stores get a write-then-read-back check, which is
advisory only (two builds starting within the same second may both win there).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline import storage as cfs
from pipeline.errors import CacheError

log = logging.getLogger(__name__)

LOCK_FILE = "_BUILD.lock"  # a cache directory's
RUN_LOCK_FILE = "_RUN.lock"  # a training run directory's
STALE_ENV = "MOEDISTILL_CACHE_LOCK_STALE_S"
WAIT_ENV = "MOEDISTILL_CACHE_LOCK_WAIT_S"


def _holder_is_gone(held: dict[str, Any]) -> bool:
    """A holder on this host whose process no longer exists (killed with SIGKILL, say): its lock is stale
    now, not only once its heartbeat is old."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


class DirectoryLock:
    """`with DirectoryLock(url):` holds the lock of the directory `url` (a cache's build lock by default;
    `lock_file=RUN_LOCK_FILE` with `what`/`holder` for a training run)."""

    def __init__(
        self,
        url: str,
        wait_s: float | None = None,
        stale_s: float | None = None,
        what: str = "teacher cache",
        holder: str = "build",
        lock_file: str = LOCK_FILE,
    ) -> None:
        self.url, self.what, self.holder = url, what, holder
        self.wait_s = float(os.environ.get(WAIT_ENV, 3600)) if wait_s is None else wait_s
        self.stale_s = float(os.environ.get(STALE_ENV, 60)) if stale_s is None else stale_s
        self.fs, root = cfs.get_fs(url)
        self.path = cfs.join(root, lock_file)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the lock file ----------------------------------------------------------------------------------
    def _record(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time()}).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            return cfs.read_json(self.fs, self.path)
        except FileNotFoundError:
            return None
        except ValueError:  # a torn write of a dying holder: treat as stale
            return {"heartbeat": 0.0}

    def _try_create(self) -> bool:
        if cfs.is_local(self.fs):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
            return True
        if self.fs.exists(self.path):
            return False
        self.fs.pipe_file(self.path, self._record())
        time.sleep(0.2)
        held = self._read()
        return held is not None and held.get("token") == self.owner["token"]

    def _holder_text(self, held: dict[str, Any]) -> str:
        age = time.time() - float(held.get("heartbeat", 0.0))
        return f"{held.get('host', '?')} pid {held.get('pid', '?')}, last heartbeat {age:.0f} s ago"

    # --- acquire / release --------------------------------------------------------------------------------
    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        said = False
        while not self._try_create():
            held = self._read()
            if held is None:
                continue  # released between our attempt and the read
            if time.time() - float(held.get("heartbeat", 0.0)) > self.stale_s or _holder_is_gone(held):
                log.warning(
                    "taking over the lock of the %s %s: its holder (%s) stopped sending heartbeats",
                    self.what,
                    cfs.redact(self.url),
                    self._holder_text(held),
                )
                self.fs.rm(self.path)
                continue
            if time.monotonic() >= deadline:
                raise CacheError(
                    f"another {self.holder} is writing the {self.what} {cfs.redact(self.url)} "
                    f"({self._holder_text(held)}). Fix: wait for it to finish and rerun (its finished work "
                    f"is then reused); if that {self.holder} is gone, its lock expires {self.stale_s:.0f} s "
                    f"after its last heartbeat ({STALE_ENV}); waits give up after {self.wait_s:.0f} s "
                    f"({WAIT_ENV})."
                )
            if not said:
                log.warning(
                    "waiting for another %s of the %s %s to finish (%s)",
                    self.holder,
                    self.what,
                    cfs.redact(self.url),
                    self._holder_text(held),
                )
                said = True
            time.sleep(min(1.0, max(0.05, self.stale_s / 10)))
        self._thread = threading.Thread(target=self._beat, name="cache-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(0.05, self.stale_s / 4)):
            held = self._read()
            if held is None or held.get("token") != self.owner["token"]:
                log.warning("lost the lock of the %s %s to another process", self.what, cfs.redact(self.url))
                return
            cfs.write_atomic(self.fs, self.path, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held is not None and held.get("token") == self.owner["token"]:
            self.fs.rm(self.path)

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_lock(run_dir: str | Path, what: str) -> DirectoryLock:
    """The lock of a run's output directory (`what`: "teacher fine-tune", "student run", "evaluation
    outputs", ...): taken before any work; a second process waits, then finds the work finished and reuses
    it."""
    return DirectoryLock(str(run_dir), what=what, holder="run", lock_file=RUN_LOCK_FILE)
