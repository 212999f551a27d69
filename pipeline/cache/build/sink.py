"""The Ray Data Datasink that commits whole cache shards, and the driver-side progress bar it feeds.

Every input row of `write()` is one complete shard (the teacher stage emits one row per shard), so a write
task always owns whole shards: no two tasks ever write into the same zarr shard.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import ray
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from pipeline.cache.format.shard import ShardMeta, commit_shard, row_to_shard


@ray.remote(num_cpus=0)
class ProgressActor:
    """Counters the write tasks report to; the driver polls them for the bar. Also arbitrates failure
    injection (a global shard count, so the N-th commit fails whichever task performs it)."""

    def __init__(self) -> None:
        self.shards = 0
        self.records = 0
        self.sequences = 0
        self.tokens = 0
        self.commit_log: list[tuple[float, int]] = []  # (wall time, tokens) per commit: steady-state rate
        self.started = 0
        self.writers = 0

    def writer_started(self) -> int:
        self.writers += 1
        return self.writers

    def num_writers(self) -> int:
        return self.writers

    def reserve(self) -> int:
        """Number of shard commits started before this one."""
        n = self.started
        self.started += 1
        return n

    def add(self, records: int, sequences: int, tokens: int) -> None:
        self.shards += 1
        self.records += records
        self.sequences += sequences
        self.tokens += tokens
        self.commit_log.append((time.time(), tokens))

    def get(self) -> dict[str, int]:
        return {
            "shards": self.shards,
            "records": self.records,
            "sequences": self.sequences,
            "tokens": self.tokens,
        }

    def commits(self) -> list[tuple[float, int]]:
        return list(self.commit_log)


class TeacherCacheDatasink(Datasink[list[dict[str, Any]]]):
    def __init__(
        self,
        cache_url: str,
        meta: ShardMeta,
        progress: Any = None,
        fail_after_shards: int | None = None,
        write_barrier: int | None = None,
    ) -> None:
        self.cache_url = cache_url
        self.meta = meta
        self.progress = progress
        self.fail_after_shards = fail_after_shards
        self.write_barrier = write_barrier
        self.commits: list[dict[str, Any]] = []

    def _wait_for_barrier(self) -> None:
        """Test hook: hold this write task until `write_barrier` write tasks have started, so shards are
        provably written concurrently."""
        ray.get(self.progress.writer_started.remote())
        deadline = time.monotonic() + 120
        while ray.get(self.progress.num_writers.remote()) < self.write_barrier:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"write barrier: fewer than {self.write_barrier} write tasks ran at once within 120 s "
                    "(test hook). Fix: give the cluster CPUs for that many write tasks, or unset "
                    "write_barrier."
                )
            time.sleep(0.05)

    def write(self, blocks: Iterable[Block], ctx: Any) -> list[dict[str, Any]]:
        if self.write_barrier and self.progress is not None:
            self._wait_for_barrier()
        commits = []
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            for i in range(table.num_rows):
                data = row_to_shard(table, i)
                fail = False
                if self.fail_after_shards is not None and self.progress is not None:
                    fail = ray.get(self.progress.reserve.remote()) >= self.fail_after_shards
                t0 = time.perf_counter()
                commit = commit_shard(data, self.meta, self.cache_url, fail_before_commit=fail)
                write_s = time.perf_counter() - t0
                tok_s = data.total_tokens / data.teacher_seconds if data.teacher_seconds > 0 else float("nan")
                # print, not logging: Ray forwards a task's stdout to the driver (and the worker log files).
                print(
                    f"[cache] write task {ctx.task_idx} committed shard {data.shard_id}: {len(data.seq_ids)} "
                    f"seqs, {data.total_tokens} tokens, {commit['num_bytes'] / 1e6:.1f} MB; teacher "
                    f"{data.teacher_seconds:.2f} s ({tok_s:.0f} tokens/s), write {write_s:.2f} s",
                    flush=True,
                )
                if self.progress is not None:
                    self.progress.add.remote(data.num_records, len(data.seq_ids), data.total_tokens)
                commits.append({**commit, "write_task": ctx.task_idx})
        return commits

    def on_write_complete(self, write_result: WriteResult[list[dict[str, Any]]]) -> None:
        # Runs on the driver; the builder finalises the manifest from what is committed on storage (the truth,
        # also covering shards committed by earlier, interrupted runs).
        self.commits = [c for returns in write_result.write_returns for c in returns]

    def get_name(self) -> str:
        return "TeacherCache"


class ProgressBar:
    """tqdm on the driver, fed by polling the ProgressActor: records done, sequences/s and tokens/s."""

    def __init__(self, actor: Any, total_records: int, enabled: bool, interval_s: float = 0.5) -> None:
        self.actor = actor
        self.total = total_records
        self.enabled = enabled
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True, name="cache-progress")
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from tqdm.auto import tqdm

        with tqdm(total=self.total, unit="rec", desc="teacher cache", dynamic_ncols=True) as bar:
            done = 0
            while True:
                stopping = self._stop.wait(self.interval_s)
                try:
                    c = ray.get(self.actor.get.remote(), timeout=5)
                except Exception:  # the bar must never break the build
                    c = None
                if c is not None:
                    elapsed = max(time.perf_counter() - self._t0, 1e-9)
                    bar.update(c["records"] - done)
                    done = c["records"]
                    bar.set_postfix_str(
                        f"shards={c['shards']} seq/s={c['sequences'] / elapsed:.1f} "
                        f"tok/s={c['tokens'] / elapsed:.0f}"
                    )
                if stopping:
                    break
