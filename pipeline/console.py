"""The console a person reads: a command's own lines on the terminal, Ray's and the workers' logs in a file.

Ray streams every worker's stdout/stderr to the driver's console with a `(Actor pid=...)` prefix: execution
plans, core-worker warnings, tracebacks of failed tasks, a line per tqdm update. When the command line
has chosen a run log (`configure`, then `use_run_log` as it connects), the driver instead
* writes all of it, prefixed as Ray would, to `<output_dir>/logs/<command>-<UTC time>.log`, named once at the
  start;
* shows on the terminal only the project's own tagged lines (`[train] ...`, `[distill] ...`) and the progress
  bars workers report through `ray.experimental.tqdm_ray`, drawn on the driver without Ray's prefix;
* sends Ray's own driver-side log records there too (its token-authentication notice, Ray Data's plans).
`--verbose` keeps Ray's live console output as well. Without a run log (a library caller, a test) Ray's
defaults stay untouched.

The routing replaces the handler Ray registers on its worker-output dispatcher (`ray._private.worker`,
Ray 2.60); that is internal API, so every touch of it is guarded and falls back to Ray's own printing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

# The tags the project's own worker-side prints start with (training loop, stages, student init).
_OWN_LINE = re.compile(r"^\s*\[(train|finetune|cache|distill|evaluate|ablate|student-init|teacher-service)\]")
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")

_state: dict[str, Any] = {"command": None, "verbose": False, "path": None, "file": None}


def configure(command: str, *, verbose: bool = False) -> None:
    """The command line's choice: this process routes Ray's output to a run log of `command` (see
    `use_run_log`); `verbose` also keeps it live on the terminal."""
    _state.update(command=command, verbose=verbose)


def use_run_log(output_dir: str | Path) -> Path | None:
    """Choose `<output_dir>/logs/<command>-<UTC time>.log` as this process's run log and say where it is;
    None (Ray's defaults) unless `configure` was called. The first choice of a process stays."""
    if _state["command"] is None:
        return None
    if _state["path"] is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        _state["path"] = Path(output_dir) / "logs" / f"{_state['command']}-{stamp}.log"
        live = " (and here: --verbose)" if _state["verbose"] else ""
        print(f"moedistill: Ray and worker logs: {_state['path']}{live}", flush=True)
    return _state["path"]


def log_traceback(text: str) -> Path | None:
    """Append a (redacted) traceback to the run log; its path, or None when there is no run log."""
    log = run_log()
    if log is None:
        return None
    log.write(f"--- moedistill: the error's traceback ---\n{text.rstrip()}\n")
    log.flush()
    return _state["path"]


def run_log() -> TextIO | None:
    """The open run log (opened on first use, line-buffered, appended to), or None when none is chosen."""
    if _state["path"] is None:
        return None
    if _state["file"] is None:
        _state["path"].parent.mkdir(parents=True, exist_ok=True)
        _state["file"] = open(_state["path"], "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives on)
    return _state["file"]


@contextlib.contextmanager
def ray_startup_quietly() -> Iterator[None]:
    """Around `ray.init`: Ray's start-up notices (its token-authentication warning) go to the run log."""
    log = run_log()
    if log is None or _state["verbose"]:
        yield
        return
    _route_ray_loggers(log)  # `ray.init` sets the "ray" logger's level and format, never its handlers
    with contextlib.redirect_stderr(log):
        yield


def route_ray_output() -> None:
    """After `ray.init`: worker output and Ray's driver-side log records to the run log (see module doc)."""
    log = run_log()
    if log is None:
        return
    _route_ray_loggers(log)
    # Ray Data warns of its own deprecated ExecutionOptions fields from inside Ray (2.60); nothing a user
    # of this tool can change, so they stay off the terminal.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray layout: keep its own printing
        return
    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        return  # log_to_driver is off: nothing is streamed here
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", lambda data: _route_worker_lines(data, ray_worker, log))


def _route_ray_loggers(log: TextIO) -> None:
    """Ray's driver-side loggers write to the run log (and, with --verbose, still to the terminal)."""
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        if not _state["verbose"]:
            for handler in list(logger.handlers):
                if type(handler) is not logging.FileHandler and isinstance(handler, logging.StreamHandler):
                    logger.removeHandler(handler)
        if not any(getattr(h, "stream", None) is log for h in logger.handlers):
            handler = logging.StreamHandler(log)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
            logger.addHandler(handler)


def _route_worker_lines(data: dict[str, Any], ray_worker: Any, log: TextIO) -> None:
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    lines = data.get("lines", [])
    bars = [line for line in lines if RAY_TQDM_MAGIC in line]
    logged = [line for line in lines if RAY_TQDM_MAGIC not in line]
    if logged:
        _write_prefixed(data, logged, log)
    if _state["verbose"]:
        ray_worker.print_to_stdstream({**data, "lines": logged}, ignore_prefix=False)
    else:
        for line in logged:
            # Ray relays a line printed right after a worker's tqdm refresh twice (Ray 2.60): show it once.
            if _OWN_LINE.match(line) and (data.get("pid"), line) != _state.get("last_own"):
                _state["last_own"] = (data.get("pid"), line)
                _bars.write(line)
    for line in bars:
        _bars.draw(line)


def _write_prefixed(data: dict[str, Any], lines: list[str], log: TextIO) -> None:
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}) "
    log.write("".join(prefix + line + "\n" for line in lines))


class _WorkerBars:
    """The driver's drawing of the bars workers report through `ray.experimental.tqdm_ray` (one JSON state
    per line): plain tqdm bars without Ray's `(pid=...)` prefix, one per worker bar."""

    def __init__(self) -> None:
        self._open: dict[str, Any] = {}

    def draw(self, line: str) -> None:
        from tqdm import tqdm

        try:
            state = json.loads(line)
        except ValueError:
            return
        bar = self._open.get(state["uuid"])
        if bar is None:
            if state.get("closed"):
                return
            bar = tqdm(desc=state["desc"], total=state["total"], unit=state["unit"], dynamic_ncols=True)
            self._open[state["uuid"]] = bar
        if bar.desc != state["desc"]:
            bar.set_description_str(state["desc"], refresh=False)
        bar.update(state["x"] - bar.n)
        if state.get("closed"):
            bar.close()
            del self._open[state["uuid"]]

    def write(self, line: str) -> None:
        """A line above the open bars (tqdm clears and redraws them)."""
        from tqdm import tqdm

        tqdm.write(line.strip(), file=sys.stdout)
        sys.stdout.flush()


_bars = _WorkerBars()
