"""Benchmark student distillation from the teacher cache, side by side in one run.

    python jobs/benchmarks/bench_distill.py [--records 256] [--steps 20] [--batch-size 16]

Builds the demo-sized teacher and student (jobs/configs/demo.yaml shapes) and a teacher cache in a temp dir,
then times, on identical micro-batches and the same torch thread count:

  sft           student forward + backward, cross-entropy only (plain SFT of the student)
  kd from cache the same plus forward KL on the cached sparse teacher logits (what reading targets costs)
  from cache    B-Distill step: student with all-expert outputs on paired layers + SFT + KL + MC + ERD,
                teacher targets read from the cache
  online        the same B-Distill step, but the teacher runs every step (forward + all experts + top-k +
                aggregation) as a pipeline without a cache must do

and prints the ratios from-cache / sft and online / from-cache, and what the per-shard checksums cost a read:
the whole cache read (the fields B-Distill trains on) with every file hashed at first open against the
same read with the files already verified in this process. Finally it runs a real Ray Train
distillation from the cache (1 worker) and reports the fraction of step time spent waiting for data: in
steady state, over the whole run, and in its first steps (Ray Data starting to stream the cache).
Absolute times only mean something on the target hardware; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable as a plain script from a checkout

import torch
from measure import Trials, interleaved

from pipeline.cache import CacheRuntime, build_teacher_cache, open_cache
from pipeline.cache.build.sparsify import topk_sparsify
from pipeline.cache.integrity.checks import files_for_fields, forget_verified
from pipeline.cache.stage import cache_spec_from_config
from pipeline.config import DistillConfig, load_config, with_overrides
from pipeline.data.collate import distill_positions, pad_batch
from pipeline.data.stage import load_tokenizer, prepare_data
from pipeline.distill.methods import get_method
from pipeline.distill.objective import distill_objective
from pipeline.distill.stage import run_distill
from pipeline.distill.student import DistillStudent
from pipeline.models.adapter import MoEAdapter
from pipeline.models.alignment import aggregate_expert_states, aggregate_gates, layer_pairs
from pipeline.models.stage import materialize_model

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=256, help="training sequences in the cache")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the in-process timings")
    parser.add_argument("--ray-steps", type=int, default=60, help="steps of the real Ray Train run")
    parser.add_argument("--read-repeats", type=int, default=5, help="timed full cache reads per setting")
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
                "data.val_fraction": 0.05,
                "data.test_fraction": 0.05,
                # step timings need no teacher-knows-more regime, which needs > 1000 records in demo.yaml
                "data.student_train_records": None,
            },
        )
        prepared = prepare_data(config)
        tokenizer = load_tokenizer(prepared.tokenizer_path)
        teacher = materialize_model(config.teacher, tokenizer).float().eval()
        teacher_dir = Path(tmp) / "teacher"
        teacher.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        spec = cache_spec_from_config(config, str(teacher_dir), prepared.tokenizer_path)
        info = build_teacher_cache(
            spec,
            prepared.splits.train,
            config.cache.root,
            CacheRuntime(rows_per_shard=64, batch_size=16, progress=False),
        )
        cache = open_cache(info.path)
        pairs = layer_pairs(cache.manifest["teacher"]["num_layers"], config.student.build.num_layers)
        teacher_layers = [t for _, t in pairs]
        num_experts = config.student.build.num_experts

        def read_all() -> list[dict]:  # every cached sequence with what B-Distill trains on
            rows = []
            for shard in cache.shards:
                rows += cache.read_shard(
                    int(shard["shard_id"]),
                    fields={"logits", "gates", "expert_states"},
                    num_student_experts=num_experts,
                    teacher_layers=teacher_layers,
                )
            return rows

        rows = read_all()
        read_on, read_off = _read_timings(read_all, args.read_repeats)
        batches = [
            _collate(rows[i : i + args.batch_size], tokenizer.pad_token_id)
            for i in range(0, len(rows) - args.batch_size + 1, args.batch_size)
        ]
        student = DistillStudent(
            materialize_model(config.student, tokenizer).float(), [s for s, _ in pairs], cache.hidden_size
        )
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        method, weights = get_method("b-distill"), DistillConfig()
        generator = torch.Generator().manual_seed(0)

        def sft_step(batch):
            mask = distill_positions(batch["response_mask"])
            out = student(batch["input_ids"], batch["attention_mask"], mask, with_experts=False)
            loss, _ = distill_objective(get_method("sft"), weights, out, batch, mask)
            return loss

        def kd_cache_step(batch):  # cached logits only: what reading targets costs, without MC/ERD compute
            mask = distill_positions(batch["response_mask"])
            out = student(batch["input_ids"], batch["attention_mask"], mask, with_experts=False)
            return distill_objective(get_method("kd"), weights, out, batch, mask)[0]

        def cache_step(batch):
            mask = distill_positions(batch["response_mask"])
            out = student(batch["input_ids"], batch["attention_mask"], mask)
            return distill_objective(method, weights, out, batch, mask, generator)[0]

        def online_step(batch):
            mask = distill_positions(batch["response_mask"])
            with torch.no_grad():
                t = MoEAdapter(teacher).forward_with_experts(
                    batch["input_ids"], batch["attention_mask"], teacher_layers, mask
                )
                idx, logp, tail = topk_sparsify(t.logits[mask].float(), config.cache.logits_k)
                online = dict(batch, logit_indices=idx, logit_values=logp, logit_tail_logmass=tail)
                online["gates"] = torch.stack(
                    [aggregate_gates(t.router_probs[x], num_experts) for x in teacher_layers], 1
                )
                online["expert_states"] = torch.stack(
                    [
                        aggregate_expert_states(t.router_probs[x], t.expert_outputs[x], num_experts)
                        for x in teacher_layers
                    ],
                    1,
                )
            return cache_step(online)

        variants = {
            "sft": sft_step,
            "kd from cache": kd_cache_step,
            "from cache": cache_step,
            "online teacher": online_step,
        }
        trials = _interleaved_steps(variants, batches, optimizer, args.steps)
        timings = {name: trials.median(name) for name in variants}

        data_wait = _ray_train_data_wait(config, info.path, args)
        ray.shutdown()

    read = {"logits", "gates", "expert_states"}
    cache_mb = sum(s["files"][f]["bytes"] for s in cache.shards for f in files_for_fields(s["files"], read))
    cache_mb /= 2**20
    tokens = statistics.mean(int(distill_positions(b["response_mask"]).sum()) for b in batches)
    print(
        f"\nbench_distill: {len(rows)} cached sequences, batch {args.batch_size} (~{tokens:.0f} distillation "
        f"tokens), {args.steps} timed steps each, torch threads {args.threads}"
    )
    print(f"{'variant':<16} {'median step [min-max] (ms)':>30} {'tokens/s':>10}")
    for name, seconds in timings.items():
        print(f"{name:<16} {trials.time_text(name, 1e3, 'ms'):>30} {tokens / seconds:10.0f}")
    print("steps interleaved (one of each variant per round, order rotated); ratios: median [min-max] of the")
    print("per-round ratios, so a load change on the machine moves both sides of a ratio alike")
    print(
        f"ratio from-cache / sft step:            {trials.ratio_text('from cache', 'sft')}  (target <= 1.1x)"
    )
    kd_over_sft = trials.ratio_text("kd from cache", "sft")
    print(f"  of which cached targets (kd / sft):   {kd_over_sft}; the rest is B-Distill's own compute")
    print(f"ratio online-teacher / from-cache step: {trials.ratio_text('online teacher', 'from cache')}")
    print(
        f"cache read of all {len(cache.shards)} shards ({cache_mb:.1f} MB of files it opens): "
        f"{read_on * 1e3:.0f} ms with the per-shard checksums (first open), {read_off * 1e3:.0f} ms with "
        f"them already verified (decode only): checksum on / off = {read_on / read_off:.2f}x"
    )
    print(
        f"Ray Train from cache, {args.ray_steps} steps: data wait = {data_wait.steady:.1%} of step time "
        f"in steady state (target < 5%); {data_wait.overall:.1%} over the whole run, "
        f"{data_wait.start_up:.0%} in the first 5 steps (Ray Data starting to stream)"
    )


def _collate(rows, pad_id: int) -> dict[str, torch.Tensor]:
    batch = pad_batch(rows, pad_id)
    for name in ("logit_indices", "logit_values", "logit_tail_logmass", "gates", "expert_states"):
        batch[name] = torch.cat([torch.as_tensor(r[name]) for r in rows], dim=0)
    return batch


def _read_timings(read_all, repeats: int) -> tuple[float, float]:
    """Median seconds of a full cache read with every file's sha256 checked at first open (the memo of
    verified files cleared first) and with the files already verified in this process (decode only). The
    two alternate, after the first read warmed the page cache, so both read the same cached bytes."""
    on, off = [], []
    for _ in range(repeats):
        forget_verified()
        start = time.perf_counter()
        read_all()
        on.append(time.perf_counter() - start)
        start = time.perf_counter()
        read_all()  # every file passed just now: no hashing
        off.append(time.perf_counter() - start)
    return statistics.median(on), statistics.median(off)


def _interleaved_steps(variants, batches, optimizer, steps: int) -> Trials:
    """`steps` timed training steps of every variant, one of each per round (3 warm-up rounds); every
    variant's i-th step sees the same batch."""

    def one_step(step, counter):
        def run():
            batch = batches[counter[0] % len(batches)]
            counter[0] += 1
            optimizer.zero_grad(set_to_none=True)
            step(batch).backward()
            optimizer.step()

        return run

    return interleaved({name: one_step(step, [0]) for name, step in variants.items()}, steps, warmup=3)


@dataclass(frozen=True)
class DataWait:
    """Fractions of step time spent waiting for the next batch, from the run's per-window metrics."""

    overall: float  # the whole run, pipeline start-up included
    start_up: float  # the first window: Ray Data starts streaming the cache
    steady: float  # median of the later windows (epoch restarts included)


def _ray_train_data_wait(config, cache_path: str, args) -> DataWait:
    window = 5
    run = with_overrides(
        config,
        {
            "distill.train.max_steps": args.ray_steps,
            "distill.train.log_every": window,
            "distill.train.batch_size": args.batch_size,
            "distill.train.checkpoint_every": 10_000,
        },
    )
    result = run_distill(run, cache_path=cache_path)
    metrics = Path(result.export_dir).parent / "metrics" / "metrics.jsonl"
    windows = [json.loads(line) for line in metrics.read_text().splitlines()]
    waits = [w["data_wait_frac"] * w["step_time_s"] for w in windows]
    overall = sum(waits) / sum(w["step_time_s"] for w in windows)
    later = [w["data_wait_frac"] for w in windows[1:]] or [windows[0]["data_wait_frac"]]
    return DataWait(overall, windows[0]["data_wait_frac"], statistics.median(later))


if __name__ == "__main__":
    main()
