"""Measurements the benchmarks share: peak RSS of a process tree, and variants timed interleaved.

A shared machine's load drifts over seconds (two back-to-back bench_distill runs here once gave a B-Distill
/ SFT step ratio of 1.44x, then 1.02x), so variants timed one after the other compare different loads.
`interleaved` runs one trial of every variant per round, rotating their order, and ratios are taken within a
round (paired): a load change shifts both sides of a ratio alike.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil


class PeakMemory:
    """Samples the RSS of this process and all its descendants (a local Ray cluster's processes)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_total = 0
        self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        total = single = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            single = max(single, rss)
        self.peak_total = max(self.peak_total, total)
        self.peak_single = max(self.peak_single, single)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass
class Trials:
    """Seconds per trial of each variant (rounds in order) and each variant's peak RSS over its trials."""

    seconds: dict[str, list[float]]
    peak_rss: dict[str, int] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def spread(self, name: str) -> tuple[float, float]:
        return min(self.seconds[name]), max(self.seconds[name])

    def ratios(self, name: str, base: str) -> list[float]:
        """name / base within each round (paired)."""
        return [a / b for a, b in zip(self.seconds[name], self.seconds[base], strict=True)]

    def ratio_text(self, name: str, base: str) -> str:
        r = self.ratios(name, base)
        return f"{statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}]"

    def time_text(self, name: str, scale: float = 1.0, unit: str = "s") -> str:
        lo, hi = self.spread(name)
        return f"{self.median(name) * scale:.3g} {unit} [{lo * scale:.3g}-{hi * scale:.3g}]"


def interleaved(
    variants: dict[str, Callable[[], Any]], trials: int, warmup: int = 1, memory: bool = False
) -> Trials:
    """Time every variant `trials` times, one trial of each per round, the order rotated every round (so no
    variant always runs first, after a warm cache or a cold one). `warmup` untimed rounds first. With
    `memory`, each variant's peak RSS (this process and its children) over its timed trials."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, int] = dict.fromkeys(names, 0)
    for r in range(trials):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            with PeakMemory() if memory else _NoMemory() as mem:
                start = time.perf_counter()
                variants[name]()
                seconds[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], mem.peak_total)
    return Trials(seconds, peaks if memory else {})


class _NoMemory:
    peak_total = 0

    def __enter__(self) -> _NoMemory:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None
