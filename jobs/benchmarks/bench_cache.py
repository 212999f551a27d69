"""Benchmark the teacher-cache stage against the bare teacher on the same batches, in one run.

    python jobs/benchmarks/bench_cache.py [--records 256] [--num-actors 1] [--threads 1] [--num-gpus 0]
    python jobs/benchmarks/bench_cache.py --shape qwen3-30b-a3b,olmoe-1b-7b [--trials 3] [--seqs 2]
        [--sharpness 0.9 | --match-experts 0.9:F] [--no-student]
    python jobs/benchmarks/bench_cache.py --config jobs/configs/demo-16-experts.yaml --seqs 32 [--trials 3]

--shape: a real MoE's width, vocabulary and expert count at truncated depth (jobs/benchmarks/real_shapes.py);
its default run (2 sequences x 64 tokens, 2 layers, 3 interleaved rounds) fits a 2-core, 24 GiB machine;
then sft / kd / b-distill steps of the real-shaped student on the same batch (real_shape_student.py; skip
them with --no-student).
--config: the same timings and m sweep for a config's fine-tuned teacher (a trained router) on the first
--seqs of its cache's sequences, its cached layers and cache.width (real_shapes.run_trained).
Without it:

Builds the demo-sized teacher (jobs/configs/demo.yaml: Qwen3-MoE, hidden 256, 4 layers, 4 experts; demo
tokenizer; cached layers = the pairs of a 2-layer student) in a temp dir, then measures side by side:

  1. throughput (distillation tokens/s) on identical micro-batches, every step at the same torch thread count
     (a Ray actor runs with OMP_NUM_THREADS = its CPUs):
       plain forward            model(input_ids) only
       forward + all experts    MoEAdapter.forward_with_experts: the irreducible teacher work of the cache
       shard compute            + top-k sparsify, aggregation to W, fp16 encode (compute_shard)
       local build              + zarr/Parquet write, checksums, commit (executor="local", no Ray)
       ray build (N, 4N)        the Ray Data pipeline end to end, incl. Ray Data and actor start-up
       ray build, steady state  4N run, tokens committed after the first shard / first-to-last commit time
     and every ratio to "forward + all experts";
  2. stored bytes per distillation token by field (and the uncompressed size);
  3. peak memory (RSS of the driver and all its Ray processes, and of the largest one) at N and 4N records:
     a streaming stage should stay flat.

--num-gpus G places every teacher as the cache stage does (pipeline.cache.build.teacher, teacher_placement):
0 = CPU, <= 1 = one GPU, > 1 = one teacher split over G GPUs with device_map="auto".

Absolute numbers are only meaningful on the target hardware; the ratios are the result.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable as a plain script from a checkout

import numpy as np
import torch
from measure import PeakMemory, interleaved
from real_shapes import SHAPES, run_shape, run_trained

from pipeline.cache import (
    CacheRuntime,
    CacheSpec,
    build_teacher_cache,
    bytes_per_token_by_field,
    open_cache,
)
from pipeline.cache.build.teacher import (
    TeacherOutputSpec,
    compute_shard,
    input_device,
    load_teacher,
    tokenize_shard,
)
from pipeline.cache.format.shard import open_arrays
from pipeline.data.collate import distill_positions, pad_batch
from pipeline.data.demo_dataset import generate_demo_records
from pipeline.data.demo_tokenizer import record_texts, train_demo_tokenizer
from pipeline.data.stage import load_tokenizer
from pipeline.data.template import TEMPLATE_SPEC
from pipeline.models.adapter import MoEAdapter
from pipeline.models.alignment import layer_pairs
from pipeline.models.build import TinyMoEConfig, build_tiny_moe
from pipeline.placement import teacher_placement, visible_gpu_memory

DEMO_TEACHER = TinyMoEConfig(
    hidden_size=256,
    num_layers=4,
    num_experts=4,
    top_k=2,
    moe_intermediate_size=256,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    max_position_embeddings=256,
)
STUDENT_LAYERS = 2
MAX_LENGTH = 128
ROWS_PER_SHARD = 64
MICRO_BATCH = 32
LOGITS_K = 32


def make_assets(workdir: Path, num_records: int) -> dict[str, Any]:
    records = generate_demo_records(num_records, seed=0)
    tok = train_demo_tokenizer(record_texts(records), workdir / "tokenizer", vocab_size=1024)
    model = build_tiny_moe(
        DEMO_TEACHER, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, seed=0
    )
    model.save_pretrained(workdir / "teacher")
    layers = tuple(t for _, t in layer_pairs(DEMO_TEACHER.num_layers, STUDENT_LAYERS))
    spec = CacheSpec(
        teacher_path=str(workdir / "teacher"),
        tokenizer_path=str(workdir / "tokenizer"),
        cached_layers=layers,
        width=None,
        logits_mode="topk",
        logits_k=LOGITS_K,
        states_dtype="float16",
        max_length=MAX_LENGTH,
        prompt_template=TEMPLATE_SPEC,
    )
    return {"records": records, "spec": spec}


def shard_batches(spec: CacheSpec, records: list[Any]) -> list[list[dict[str, Any]]]:
    """The tokenised shards exactly as the cache stage forms them."""
    tok = load_tokenizer(spec.tokenizer_path)
    return [
        tokenize_shard(tok, records[i : i + ROWS_PER_SHARD], i, spec.max_length)
        for i in range(0, len(records), ROWS_PER_SHARD)
    ]


def micro_batches(examples: list[dict[str, Any]], pad_id: int) -> list[dict[str, torch.Tensor]]:
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))  # as compute_shard
    return [
        pad_batch([examples[i] for i in order[s : s + MICRO_BATCH]], pad_id)
        for s in range(0, len(order), MICRO_BATCH)
    ]


@torch.no_grad()
def time_bare(
    adapter: MoEAdapter,
    shards: list[list[dict[str, Any]]],
    layers: tuple[int, ...],
    pad_id: int,
    experts: bool,
) -> float:
    device = input_device(adapter.model)
    batches = [{k: v.to(device) for k, v in b.items()} for ex in shards for b in micro_batches(ex, pad_id)]
    t0 = time.perf_counter()
    for b in batches:
        if experts:
            adapter.forward_with_experts(
                b["input_ids"], b["attention_mask"], layers, distill_positions(b["response_mask"])
            )
        else:
            adapter.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a GPU forward returns before it finishes
    return time.perf_counter() - t0


def time_compute(
    adapter: MoEAdapter, shards: list[list[dict[str, Any]]], out: TeacherOutputSpec, pad_id: int
) -> float:
    t0 = time.perf_counter()
    for i, ex in enumerate(shards):
        compute_shard(adapter, ex, i, len(ex), out, MICRO_BATCH, pad_id)
    return time.perf_counter() - t0


def timed_build(
    spec: CacheSpec, records: list[Any], root: str, runtime: CacheRuntime
) -> tuple[float, Any, PeakMemory]:
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        info = build_teacher_cache(spec, records, root, runtime)
        dt = time.perf_counter() - t0
    assert info.status == "built", info
    return dt, info, mem


def raw_bytes_per_token(path: str) -> dict[str, float]:
    """Uncompressed bytes per token of each stored array (dtype size x trailing shape)."""
    cache = open_cache(path)
    group = open_arrays(cache.shard_url(0))
    return {
        name: float(np.dtype(str(arr.dtype)).itemsize * np.prod(arr.shape[1:], dtype=np.int64))
        for name, arr in group.arrays()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--records", type=int, default=256, help="N; the memory comparison also runs 4N")
    ap.add_argument("--num-actors", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per teacher (= CPUs per actor)")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per teacher (cache.num_gpus_per_actor)")
    ap.add_argument("--workdir", default=None, help="default: a temp dir, removed afterwards")
    ap.add_argument("--trials", type=int, default=3, help="interleaved rounds of the in-process variants")
    ap.add_argument("--shape", default=None, help=f"comma-separated real shapes: {', '.join(SHAPES)}")
    ap.add_argument("--config", default=None, help="a config whose fine-tuned teacher is timed (see above)")
    ap.add_argument("--layers", type=int, default=2, help="--shape: teacher depth (truncated)")
    ap.add_argument("--seqs", type=int, default=2, help="--shape, --config: sequences (one micro-batch)")
    ap.add_argument("--seq-len", type=int, default=64, help="--shape: tokens per sequence")
    ap.add_argument("--sharpness", type=float, default=0.9, help="--shape: mean top-k router mass")
    ap.add_argument(
        "--match-experts",
        default=None,
        metavar="M:F",
        help="--shape, instead of --sharpness: routers sharpened until the experts carrying M of a token's "
        "router mass are the fraction F of all experts (F from `moedistill report router-sharpness`)",
    )
    ap.add_argument("--masses", default="1.0,0.99", help="--shape, --config: states_mass values timed")
    ap.add_argument(
        "--sweep", default="0.9,0.95,0.99,1.0", help="--shape, --config: states_mass values for fidelity"
    )
    ap.add_argument("--logits-k", type=int, default=64, help="--shape: cached top-k logits")
    ap.add_argument("--no-student", action="store_true", help="--shape: skip the student's steps")
    args = ap.parse_args()
    if args.shape or args.config:
        torch.set_num_threads(args.threads)
        args.masses = [float(m) for m in args.masses.split(",")]
        args.sweep = [float(m) for m in args.sweep.split(",")]
        if args.config:
            run_trained(args.config, args)
        for name in args.shape.split(",") if args.shape else []:
            run_shape(name, args)
        return
    logging.basicConfig(level=logging.WARNING)

    import ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = Path(args.workdir or tmp)
        n = args.records
        assets = make_assets(work, 4 * n)
        spec, records = assets["spec"], assets["records"]
        small, large = records[:n], records

        # 1. in-process, same thread count as one actor
        torch.set_num_threads(args.threads)
        placement = teacher_placement(args.num_gpus, visible_gpu_memory())
        model = load_teacher(spec.teacher_path, spec.compute_dtype, placement)
        adapter = MoEAdapter(model)
        pad_id = int(model.config.pad_token_id)
        shards = shard_batches(spec, small)
        tokens = sum(sum(e["response_mask"][1:]) for ex in shards for e in ex)
        out = TeacherOutputSpec.from_spec(spec, adapter.num_experts)
        layers = spec.cached_layers
        trials = interleaved(
            {
                "plain forward": lambda: time_bare(adapter, shards, layers, pad_id, experts=False),
                "forward + all experts": lambda: time_bare(adapter, shards, layers, pad_id, experts=True),
                "shard compute": lambda: time_compute(adapter, shards, out, pad_id),
            },
            args.trials,
        )
        t_plain, t_bare, t_compute = (trials.median(n) for n in trials.seconds)
        rt_local = CacheRuntime(
            batch_size=MICRO_BATCH,
            rows_per_shard=ROWS_PER_SHARD,
            executor="local",
            num_cpus_per_actor=args.threads,
            num_gpus_per_actor=args.num_gpus,
            progress=False,
        )
        t_local, info_local, _ = timed_build(spec, small, str(work / "local"), rt_local)
        assert info_local.num_tokens == tokens

        # 2. the Ray pipeline at N and 4N records
        rt_ray = CacheRuntime(
            num_actors=args.num_actors,
            batch_size=MICRO_BATCH,
            rows_per_shard=ROWS_PER_SHARD,
            num_cpus_per_actor=args.threads,
            num_gpus_per_actor=args.num_gpus,
            progress=False,
        )
        t_ray_n, info_n, mem_n = timed_build(spec, small, str(work / "ray"), rt_ray)
        t_ray_4n, info_4n, mem_4n = timed_build(spec, large, str(work / "ray"), rt_ray)
        steady = info_4n.stats.get("steady_tokens_per_s", float("nan"))

        base = tokens / t_bare
        rows = [
            ("plain forward (no experts)", tokens / t_plain),
            ("forward + all experts  [baseline]", base),
            ("shard compute (+sparsify, aggregate, encode)", tokens / t_compute),
            ("local build (+zarr/parquet write, checksums)", tokens / t_local),
            (f"ray build, N={n}, end to end", info_n.num_tokens / t_ray_n),
            (f"ray build, 4N={4 * n}, end to end", info_4n.num_tokens / t_ray_4n),
            ("ray build, 4N, steady state (start-up excluded)", steady),
        ]
        d = DEMO_TEACHER
        print(
            f"\n== teacher cache benchmark: demo teacher (H={d.hidden_size}, L={d.num_layers}, "
            f"E={d.num_experts}), cached layers {list(spec.cached_layers)}, top-{LOGITS_K}, fp16 states, "
            f"{args.num_actors} actor(s) x {args.threads} thread(s) x {args.num_gpus:g} GPU(s) "
            f"({placement.kind}), micro-batch {MICRO_BATCH}, "
            f"{ROWS_PER_SHARD} rows/shard =="
        )
        print(f"N={n} records -> {tokens} distillation tokens\n")
        print(f"{'step':<48}{'tokens/s':>12}{'vs baseline':>13}")
        for name, tps in rows:
            print(f"{name:<48}{tps:>12.0f}{tps / base:>12.2f}x")
        print(f"in process: medians of {args.trials} interleaved rounds; seconds [min-max], paired ratios:")
        for name in trials.seconds:
            ratio = trials.ratio_text(name, "forward + all experts")
            print(f"  {name:<24}{trials.time_text(name):>26}  {ratio}")

        bpt = bytes_per_token_by_field(info_4n.path)
        raw = raw_bytes_per_token(info_4n.path)
        size = f"{info_4n.num_tokens} tokens, {info_4n.num_bytes / 1e6:.2f} MB"
        print(f"\nstored bytes per distillation token ({size})")
        print(f"{'field':<22}{'stored B/tok':>14}{'raw B/tok':>12}{'ratio':>8}")
        for name in ("logit_indices", "logit_values", "logit_tail_logmass", "gates", "expert_states"):
            r = raw.get(name, float("nan"))
            print(f"{name:<22}{bpt.get(name, 0.0):>14.1f}{r:>12.1f}{bpt.get(name, 0.0) / r:>8.2f}")
        for name in ("logits", "index", "metadata", "total"):
            print(f"{name:<22}{bpt.get(name, 0.0):>14.1f}")

        print("\npeak memory (RSS; driver + local Ray processes)")
        print(f"{'records':<10}{'tokens':>9}{'total MB':>11}{'largest process MB':>20}")
        for label, info, mem in ((n, info_n, mem_n), (4 * n, info_4n, mem_4n)):
            print(
                f"{label:<10}{info.num_tokens:>9}{mem.peak_total / 1e6:>11.0f}{mem.peak_single / 1e6:>20.0f}"
            )
        print(
            f"ratio 4N/N: total {mem_4n.peak_total / mem_n.peak_total:.2f}x, largest process "
            f"{mem_4n.peak_single / mem_n.peak_single:.2f}x (data grew 4x)"
        )


if __name__ == "__main__":
    main()
