"""Benchmark on-policy distillation through the teacher service against offline KD, side by side in one run.

    python jobs/benchmarks/bench_online.py [--records 128] [--steps 5] [--batch-size 8] [--clients 4]

Builds the demo-sized teacher and student (jobs/configs/demo.yaml shapes) and a teacher cache in a temp dir,
then times one optimizer step of each, on the same cached batches and torch thread count:

  offline kd          DistillTask(kd): forward KL on the cached sparse teacher (no teacher at all)
  on-policy, local    OnPolicyTask(gkd-on-policy): the student samples its responses, a teacher in the same
                      process scores them (a co-resident teacher: what a pipeline without the service does)
  on-policy, service  the same step, the teacher a TeacherService actor (token ids travel, targets return)

and the teacher's share of each on-policy step (time inside the client's `score`). Then the service's
batching: `--clients` student threads send one sequence per request at once, against the same sequences
sent one request at a time; the service's counters give sequences per teacher batch and padding efficiency
(real tokens / computed tokens). Absolute times only mean something on the target hardware; the ratios are
the result.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable as a plain script from a checkout

import torch

from pipeline.cache import CacheRuntime, build_teacher_cache, open_cache
from pipeline.cache.stage import cache_spec_from_config
from pipeline.config import load_config, with_overrides
from pipeline.data.stage import load_tokenizer, prepare_data
from pipeline.distill.onpolicy_task import OnPolicyTask
from pipeline.distill.task import DistillTask
from pipeline.models.alignment import layer_pairs
from pipeline.models.stage import materialize_model
from pipeline.teacher_service import TeacherScorer, TeacherServiceConfig, start_teacher_service

REPO = Path(__file__).resolve().parents[2]


class TimedClient:
    """Wraps a teacher client (the service's, or an in-process scorer's) and sums the time spent scoring."""

    def __init__(self, score: Any) -> None:
        self._score = score
        self.seconds = 0.0

    def score(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        try:
            return self._score(examples)
        finally:
            self.seconds += time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=128, help="training sequences in the cache")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="student sample length")
    parser.add_argument("--clients", type=int, default=4, help="concurrent student threads (batching)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, student and teacher")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        config = with_overrides(
            load_config(REPO / "jobs" / "configs" / "demo.yaml"),
            {
                "output_dir": tmp,
                "cache.root": f"{tmp}/caches",
                "data.num_demo_records": args.records,
                "distill.method": "gkd-on-policy",
            },
        )
        prepared = prepare_data(config)
        tokenizer = load_tokenizer(prepared.tokenizer_path)
        teacher_dir = Path(tmp) / "teacher"
        materialize_model(config.teacher, tokenizer).float().save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
        spec = cache_spec_from_config(config, str(teacher_dir), prepared.tokenizer_path)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        info = build_teacher_cache(
            spec, prepared.splits.train, config.cache.root, CacheRuntime(rows_per_shard=64, progress=False)
        )
        cache = open_cache(info.path)
        pairs = layer_pairs(cache.manifest["teacher"]["num_layers"], config.student.build.num_layers)
        rows = [r for s in cache.shards for r in cache.read_shard(int(s["shard_id"]), {"logits"})]
        common = {
            "tokenizer_path": prepared.tokenizer_path,
            "pairs": pairs,
            "teacher_hidden_size": cache.hidden_size,
        }
        offline = DistillTask(with_overrides(config, {"distill.method": "kd"}), **common)
        batches = [
            offline.collate({k: [r[k] for r in rows[i : i + args.batch_size]] for k in rows[0]})
            for i in range(0, len(rows) - args.batch_size + 1, args.batch_size)
        ]

        scorer = TeacherScorer(spec, cache.width, 0.0, cpu_threads=args.threads)  # co-resident teacher
        local = TimedClient(lambda ex: scorer.score(ex)["results"])
        service = start_teacher_service(
            spec, cache.width, TeacherServiceConfig(num_cpus_per_actor=1, torch_threads=args.threads)
        )
        remote = TimedClient(service.client().score)

        def on_policy(client: TimedClient) -> OnPolicyTask:
            return OnPolicyTask(
                config, **common, client=client, total_steps=args.steps, max_new_tokens=args.max_new_tokens
            )

        variants = {
            "offline kd (cache)": (offline, None),
            "on-policy, local teacher": (on_policy(local), local),
            "on-policy, service": (on_policy(remote), remote),
        }
        timings = {
            name: _time_steps(task, client, batches, args.steps) for name, (task, client) in variants.items()
        }
        step_stats = service.stats()
        batching = _batching(service, rows, args.clients)
        service.shutdown()
        ray.shutdown()

    _report(args, timings, step_stats, batching)


def _time_steps(
    task: DistillTask, client: TimedClient | None, batches: list[dict], steps: int
) -> tuple[float, float]:
    """(median step seconds, share of the timed steps spent in the teacher client)."""
    torch.manual_seed(0)
    model = task.build_model()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, teacher = [], 0.0
    for i in range(steps + 1):  # 1 warm-up step
        batch = batches[i % len(batches)]
        before = client.seconds if client else 0.0
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = task.compute_loss(model, batch, i)
        loss.backward()
        optimizer.step()
        if i >= 1:
            times.append(time.perf_counter() - start)
            teacher += (client.seconds if client else 0.0) - before
    return statistics.median(times), teacher / sum(times)


def _batching(service: Any, rows: list[dict], clients: int) -> dict[str, dict[str, float]]:
    """The service's counters for the same single-sequence requests, sent one at a time vs concurrently."""
    import ray

    requests = [
        {
            "seq_id": int(r["seq_id"]),
            "input_ids": r["input_ids"].tolist(),
            "response_mask": r["response_mask"].tolist(),
        }
        for r in rows
    ]
    out = {}
    before = service.stats()
    start = time.perf_counter()
    client = service.client(max_pending=1)
    for req in requests:
        client.score([req])
    out["sequential"] = _delta(before, service.stats(), time.perf_counter() - start)

    def student(part: list[dict]) -> None:
        own = service.client(max_pending=4)
        ray.get([own.submit([req]) for req in part])

    before = service.stats()
    start = time.perf_counter()
    workers = [threading.Thread(target=student, args=(requests[i::clients],)) for i in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out[f"{clients} clients"] = _delta(before, service.stats(), time.perf_counter() - start)
    return out


def _delta(before: dict, after: dict, wall: float) -> dict[str, float]:
    d = {k: after[k] - before[k] for k in ("sequences", "batches", "input_tokens", "padded_tokens", "busy_s")}
    return {
        "sequences_per_batch": d["sequences"] / max(1, d["batches"]),
        "padding_efficiency": d["input_tokens"] / max(1, d["padded_tokens"]),
        "sequences_per_s": d["sequences"] / wall,
        "utilisation": d["busy_s"] / wall,
    }


def _report(args: Any, timings: dict, step_stats: dict, batching: dict) -> None:
    base = timings["offline kd (cache)"][0]
    print(
        f"\nbench_online: demo-sized teacher/student, batch {args.batch_size}, student samples of up to "
        f"{args.max_new_tokens} tokens, {args.steps} timed steps each, torch threads {args.threads}"
    )
    print(f"{'variant':<26} {'median step (ms)':>17} {'x offline kd':>13} {'teacher share':>14}")
    for name, (seconds, share) in timings.items():
        print(f"{name:<26} {seconds * 1e3:17.1f} {seconds / base:12.2f}x {share:13.0%}")
    service, local = timings["on-policy, service"][0], timings["on-policy, local teacher"][0]
    print(f"ratio service / co-resident teacher step: {service / local:.2f}x")
    print(
        f"service during the on-policy steps: {step_stats['sequences_per_batch']:.1f} sequences/batch, "
        f"padding efficiency {step_stats['padding_efficiency']:.0%}, {step_stats['retries']} retries"
    )
    print(
        f"\n{'service batching':<26} {'seq/batch':>10} {'padding eff.':>13} {'seq/s':>8} {'utilisation':>12}"
    )
    for name, s in batching.items():
        print(
            f"{name:<26} {s['sequences_per_batch']:10.1f} {s['padding_efficiency']:12.0%} "
            f"{s['sequences_per_s']:8.1f} {s['utilisation']:11.0%}"
        )
    names = list(batching)
    gain = batching[names[1]]["sequences_per_s"] / batching[names[0]]["sequences_per_s"]
    print(f"ratio concurrent / sequential throughput: {gain:.2f}x")


if __name__ == "__main__":
    main()
