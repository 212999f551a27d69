"""The teacher service: a pool of teacher actors behind one dispatcher that batches every student's requests.

    student workers --TeacherClient.submit(token ids)--> ServiceDispatcher (async actor, no CPU)
      --plan_batches (by length)--> TeacherScorer actors (cache.resources, cache.num_gpus_per_actor)

Flow control, end to end:
* a client holds at most `max_pending` unanswered requests; `submit` blocks past that (a slow teacher slows
  its students instead of queueing without bound);
* the dispatcher admits at most `max_in_flight` requests at once (all clients together); the rest wait for
  admission, so at most clients x max_pending requests are ever held anywhere;
* at most `max_batches_per_actor` batches per teacher actor are outstanding; further sequences stay queued
  and join later, fuller batches.
Failures: teacher actors run with Ray's `max_restarts` / `max_task_retries`, so a killed actor is restarted
and its batch re-run there; a failure that still surfaces is retried by the dispatcher (`max_retries`,
on the least-loaded actor). Counters: `ServiceCounters`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.cache.format.spec import CacheSpec
from pipeline.config import CacheConfig, TrainConfig
from pipeline.errors import ConfigError, MoeDistillError
from pipeline.placement import check_placement, check_separate_gpus
from pipeline.teacher_service.batching import plan_batches
from pipeline.teacher_service.counters import ServiceCounters
from pipeline.teacher_service.scorer import TeacherScorer

TEACHER_FAIL_AT_BATCH_ENV = "MOEDISTILL_TEACHER_FAIL_AT_BATCH"  # read by start_teacher_service


@dataclass(frozen=True)
class TeacherServiceConfig:
    """How the service runs (never what it computes: that is the CacheSpec it is started with)."""

    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)  # e.g. {"teacher_node": 1}
    torch_threads: int | None = None  # None: Ray's OMP_NUM_THREADS (floor of num_cpus_per_actor)
    max_batch_sequences: int = 8  # sequences per teacher forward
    max_batch_tokens: int = 8192  # padded tokens (batch x longest) per teacher forward
    max_wait_s: float = 0.005  # how long a lone request waits for others to fill its batch
    max_in_flight: int = 16  # requests admitted at once, all clients together
    max_batches_per_actor: int = 2  # outstanding batches per teacher actor (one computing, one queued)
    max_restarts: int = 3  # Ray restarts of one teacher actor
    max_task_retries: int = 3  # Ray re-runs of a batch on the restarted actor
    max_retries: int = 2  # dispatcher re-sends when a failure still surfaces
    # failure injection for tests: actor 0 dies on its N-th batch, once (or TEACHER_FAIL_AT_BATCH_ENV)
    fail_at_batch: int | None = None

    def __post_init__(self) -> None:
        ints = ("num_actors", "max_batch_sequences", "max_batch_tokens", "max_in_flight")
        problems = [f"{n}={getattr(self, n)} must be >= 1" for n in ints if getattr(self, n) < 1]
        if self.max_batches_per_actor < 1:
            problems.append(f"max_batches_per_actor={self.max_batches_per_actor} must be >= 1")
        if self.num_gpus_per_actor < 0 or self.num_cpus_per_actor <= 0 or self.max_wait_s < 0:
            problems.append("num_gpus_per_actor >= 0, num_cpus_per_actor > 0 and max_wait_s >= 0 are needed")
        if problems:
            raise ConfigError("invalid teacher service settings: " + "; ".join(problems) + ".")

    @classmethod
    def from_cache(cls, cache: CacheConfig, **overrides: Any) -> TeacherServiceConfig:
        """The cache stage's teacher-side placement (cache.num_actors, num_gpus_per_actor, resources)."""
        base = {
            "num_actors": cache.num_actors,
            "num_gpus_per_actor": cache.num_gpus_per_actor,
            "resources": dict(cache.resources),
            "max_batch_sequences": cache.batch_size,
        }
        return cls(**{**base, **overrides})


class ServiceDispatcher:
    """Async Ray actor: admits requests, buckets their sequences by length, spreads batches over the pool."""

    def __init__(
        self, scorers: list[Any], config: TeacherServiceConfig, incarnations: Sequence[str] | None = None
    ) -> None:
        """`incarnations`: each actor's id at the start, so a restart before its first batch counts too."""
        self.scorers = list(scorers)
        self.config = config
        self.counters = ServiceCounters(num_actors=len(self.scorers))
        self.queue: list[tuple[dict[str, Any], asyncio.Future]] = []
        self.outstanding = [0] * len(self.scorers)
        self.incarnations: list[str | None] = list(incarnations or [None] * len(self.scorers))
        # Python >= 3.10: asyncio primitives bind to the running loop on first use, not at creation
        self.admission = asyncio.Semaphore(config.max_in_flight)
        self.slots = asyncio.Semaphore(config.max_batches_per_actor * len(self.scorers))
        self.wake = asyncio.Event()
        self.loop_task: asyncio.Task | None = None
        self.tasks: set[asyncio.Task] = set()

    async def score(self, examples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Sparse targets of each example (see TeacherScorer.score), in order."""
        if self.loop_task is None:
            self.loop_task = asyncio.get_running_loop().create_task(self._dispatch_forever())
        if not examples:
            return []
        self.counters.admit_wait()
        async with self.admission:
            self.counters.admitted()
            try:
                loop = asyncio.get_running_loop()
                futures = [loop.create_future() for _ in examples]
                self.queue.extend(zip(examples, futures, strict=True))
                self.wake.set()
                return list(await asyncio.gather(*futures))
            finally:
                self.counters.answered()

    def stats(self) -> dict[str, Any]:
        return self.counters.summary(queued_sequences=len(self.queue))

    async def router_step(
        self,
        examples: Sequence[dict[str, Any]],
        student_rows: Sequence[dict[str, Any]],
        loss_fn: Callable[..., Any],
        lr: float,
    ) -> list[float]:
        """SAR: the same router update on every teacher actor, so the replicas stay identical (call it between
        student steps, with no scoring in flight). Each actor's loss before its step."""
        calls = [s.router_step.remote(list(examples), list(student_rows), loss_fn, lr) for s in self.scorers]
        return list(await asyncio.gather(*calls))

    def teacher_actors(self) -> list[Any]:
        return list(self.scorers)

    async def _dispatch_forever(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            deadline = loop.time() + cfg.max_wait_s
            while len(self.queue) < cfg.max_batch_sequences and loop.time() < deadline:
                await asyncio.sleep(min(0.001, cfg.max_wait_s))
            items, self.queue = self.queue, []
            self.wake.clear()
            lengths = [len(ex["input_ids"]) for ex, _ in items]
            for group in plan_batches(lengths, cfg.max_batch_sequences, cfg.max_batch_tokens):
                await self.slots.acquire()  # released by _run_batch: bounds batches at the teacher
                task = loop.create_task(self._run_batch([items[i] for i in group]))
                self.tasks.add(task)  # the loop keeps only weak references to tasks
                task.add_done_callback(self.tasks.discard)

    async def _run_batch(self, items: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError

        examples = [ex for ex, _ in items]
        try:
            for attempt in range(self.config.max_retries + 1):
                i = min(range(len(self.scorers)), key=lambda j: self.outstanding[j])
                self.outstanding[i] += 1
                try:
                    reply = await self.scorers[i].score.remote(examples)
                    break
                except (RayActorError, ActorUnavailableError) as exc:
                    if attempt == self.config.max_retries:
                        raise MoeDistillError(
                            f"teacher actor {i} failed {attempt + 1} times on one batch: {exc}. Fix: "
                            "check the teacher actors' logs (`ray logs`); raise the teacher service's "
                            "max_restarts / max_retries if the failures are transient."
                        ) from exc
                    self.counters.retries += 1
                    await asyncio.sleep(0.1 * (attempt + 1))
                finally:
                    self.outstanding[i] -= 1
            self._note_incarnation(i, reply["incarnation"])
            results = reply["results"]
            scored = sum(len(r["logit_tail_logmass"]) for r in results)
            self.counters.record_batch(
                len(examples), reply["input_tokens"], reply["padded_tokens"], scored, reply["busy_s"]
            )
            for (_, fut), result in zip(items, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
        except Exception as exc:  # every waiting request learns why, instead of hanging
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(exc)
        finally:
            self.slots.release()

    def _note_incarnation(self, i: int, incarnation: str) -> None:
        if self.incarnations[i] is not None and self.incarnations[i] != incarnation:
            self.counters.actor_restarts += 1
        self.incarnations[i] = incarnation


class TeacherClient:
    """What a student worker holds (picklable: ship it to Ray Train workers). `submit` returns an ObjectRef
    and blocks while `max_pending` of this client's requests are unanswered."""

    def __init__(self, dispatcher: Any, max_pending: int = 2) -> None:
        if max_pending < 1:
            raise ConfigError(f"max_pending={max_pending} must be >= 1")
        self.dispatcher = dispatcher
        self.max_pending = max_pending
        self.pending: deque[Any] = deque()

    def __getstate__(self) -> dict[str, Any]:
        return {"dispatcher": self.dispatcher, "max_pending": self.max_pending}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["dispatcher"], state["max_pending"])

    def submit(self, examples: Sequence[dict[str, Any]]) -> Any:
        import ray

        while len(self.pending) >= self.max_pending:
            ray.wait([self.pending[0]], num_returns=1)  # oldest first: requests finish roughly in order
            self.pending = deque(r for r in self.pending if not ray.wait([r], timeout=0)[0])
        ref = self.dispatcher.score.remote(list(examples))
        self.pending.append(ref)
        return ref

    def score(self, examples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        import ray

        return ray.get(self.submit(examples))

    def router_step(
        self,
        examples: Sequence[dict[str, Any]],
        student_rows: Sequence[dict[str, Any]],
        loss_fn: Callable[..., Any],
        lr: float = 1e-3,
    ) -> list[float]:
        """SAR router update on every teacher actor (ServiceDispatcher.router_step); each actor's loss before
        its step. Call it with none of this client's requests unanswered."""
        import ray

        return ray.get(self.dispatcher.router_step.remote(list(examples), list(student_rows), loss_fn, lr))


@dataclass
class TeacherService:
    """The driver's handle: clients for students, counters, the actors (tests kill one), shutdown."""

    dispatcher: Any
    scorers: list[Any]
    config: TeacherServiceConfig

    def client(self, max_pending: int = 2) -> TeacherClient:
        return TeacherClient(self.dispatcher, max_pending)

    def stats(self) -> dict[str, Any]:
        import ray

        return ray.get(self.dispatcher.stats.remote())

    def router_step(
        self,
        examples: Sequence[dict[str, Any]],
        student_rows: Sequence[dict[str, Any]],
        loss_fn: Callable[..., Any],
        lr: float = 1e-3,
    ) -> list[float]:
        """SAR router update on every teacher actor (pipeline.teacher_service.sar); a restarted actor comes
        back with the original routers."""
        return self.client().router_step(examples, student_rows, loss_fn, lr)

    def shutdown(self) -> None:
        import ray

        for actor in [self.dispatcher, *self.scorers]:
            ray.kill(actor, no_restart=True)


def start_teacher_service(
    spec: CacheSpec, width: int, config: TeacherServiceConfig, train: TrainConfig | None = None
) -> TeacherService:
    """Start the pool (waits until every teacher is loaded). `spec` and `width` decide the served format,
    exactly as they decide a cache's; `train` (the students' placement) is checked against the teacher's so
    the two never share a GPU."""
    import ray

    if not ray.is_initialized():
        raise MoeDistillError(
            "the teacher service needs Ray. Fix: call ray.init() (or run under `ray job submit`)."
        )
    check_placement(config.resources, "teacher service actors")
    if train is not None:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        check_separate_gpus(config.num_gpus_per_actor, config.resources, train, nodes)
    threads = config.torch_threads or max(1, int(config.num_cpus_per_actor))
    scorer_cls = ray.remote(TeacherScorer).options(
        num_cpus=config.num_cpus_per_actor,
        num_gpus=config.num_gpus_per_actor,
        resources=dict(config.resources) or None,
        max_restarts=config.max_restarts,
        max_task_retries=config.max_task_retries,
    )
    fail_at = config.fail_at_batch or int(os.environ.get(TEACHER_FAIL_AT_BATCH_ENV) or 0) or None
    scorers = [
        scorer_cls.remote(spec, width, config.num_gpus_per_actor, threads, fail_at if i == 0 else None)
        for i in range(config.num_actors)
    ]
    incarnations = ray.get([s.ping.remote() for s in scorers])  # fail here, with the load error
    dispatcher = (
        ray.remote(ServiceDispatcher)
        .options(num_cpus=0, max_concurrency=max(1000, 4 * config.max_in_flight))
        .remote(scorers, config, incarnations)
    )
    return TeacherService(dispatcher, scorers, dataclasses.replace(config))
