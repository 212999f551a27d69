"""Benchmark the expert-state codecs side by side, in one run, against exact fp32 teacher states.

    python jobs/benchmarks/bench_state_codecs.py [--records 192] [--threads 1] [--ranks 16,32,64]

Builds the demo-sized teacher of bench_cache.py (Qwen3-MoE, hidden 256, 4 layers, 4 experts; cached layers =
the pairs of a 2-layer student; randomly initialised: its spectrum is flatter than a trained teacher's, so
its low-rank errors are pessimistic) or takes a fine-tuned one (--teacher DIR --tokenizer DIR, e.g. the
demo's <output_dir>/teacher/final), runs it once over the records and keeps the exact fp32 W-width gates and
states. The first half of the tokens is the basis sample, the second half is held out;
every figure below is measured on the held-out half. Per codec x rank x token fraction:

  B/token      logical stored expert-state bytes per distillation token (payload + scales + row index)
  recon        relative squared reconstruction error ||h^ - h||^2 / ||h||^2 (kept tokens)
  MC rel err   |L^ - L| / L of the MC exploration loss summed over pairs (pipeline/reports/fidelity.py: K=3,
               alpha=0.2, fixed draws, a fixed random student near the teacher, s = h + 0.5x rms noise);
               with a token fraction f < 1, L^ averages over the kept tokens only (unbiased), L over all
  grad cos     cosine of dL^/ds with the exact dL/ds (all tokens; subsampled tokens get no gradient)
  enc / dec    encode (project + quantise) and decode (dequantise + expand) throughput, tokens/s (best of 3)
  shard x      compute_shard time (teacher forward + everything the cache stage does but the write; best of
               3) relative to the float16 build: the steady state, basis fitting excluded

Then the basis fit of the timed low-rank codec (what pipeline/cache/build/basis.py does before the first
shard: a teacher pass over the basis sample, the streaming Gram matrix, eigh), timed on the basis half, and
the whole cache stage's time relative to the float16 build with that fit included, for builds of several sizes
with the default 65,536-token sample (fewer when the build has fewer tokens: then the sample is the whole
build).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable as a plain script from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_cache import DEMO_TEACHER, MICRO_BATCH, ROWS_PER_SHARD, make_assets, shard_batches

from pipeline.cache.build.teacher import (
    TeacherOutputSpec,
    TeacherShardStage,
    compute_shard,
    input_device,
    teacher_targets,
)
from pipeline.cache.format.codecs import (
    ROW_CODECS,
    BasisAccumulator,
    StatesCodec,
    aggregate_coefficients,
    expand_group,
    fit_basis,
    group_basis,
    keep_rows,
)
from pipeline.data.collate import pad_batch
from pipeline.reports.fidelity import fixed_student, mc_loss_and_grad


def exact_targets(stage: TeacherShardStage, shards: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """fp32 gates [N, P, W] and states [N, P, W, D], seq ids and positions of every distillation token."""
    device = input_device(stage.adapter.model)
    gates, states, seq, counts = [], [], [], []
    for examples in shards:
        for s in range(0, len(examples), MICRO_BATCH):
            chunk = examples[s : s + MICRO_BATCH]
            batch = {k: v.to(device) for k, v in pad_batch(chunk, stage.pad_id).items()}
            t = teacher_targets(stage.adapter, batch, stage.out)
            gates.append(t["gates"])
            states.append(t["expert_states"])
            seq += [int(e["seq_id"]) for e in chunk]
            counts += [int(sum(e["response_mask"][1:])) for e in chunk]
    return {"gates": torch.cat(gates), "states": torch.cat(states), "seq_ids": seq, "counts": counts}


def mc_loss(gates: torch.Tensor, target: torch.Tensor, student: torch.Tensor, keep: torch.Tensor) -> Any:
    """MC loss over the kept tokens summed over pairs, and its gradient w.r.t. the student (all pairs)."""
    per_pair = [
        mc_loss_and_grad(gates[:, p], target[:, p], student[:, p], keep, seed=1000 + p)
        for p in range(gates.shape[1])
    ]
    return sum(loss for loss, _ in per_pair), torch.cat([grad for _, grad in per_pair])


def evaluate(
    codec: StatesCodec, fit: torch.Tensor, held: dict[str, Any], student: torch.Tensor
) -> dict[str, Any]:
    h, gates, keep = held["states"], held["gates"], held["keep"][codec.token_fraction]
    p, w, d = h.shape[1:]
    basis = fit_basis(fit, codec.rank) if codec.rank is not None else None
    gb = group_basis(basis, w) if basis is not None else None
    t_enc, enc = best_of(lambda: codec.encode(h[keep], basis))

    def decode() -> torch.Tensor:
        out = codec.decode(enc["expert_states"], enc.get("expert_state_scales"))
        return out if gb is None else expand_group(aggregate_coefficients(None, out, gb), gb)  # as the reader

    t_dec, decoded = best_of(decode)
    recon = float((decoded - h[keep]).pow(2).sum() / h[keep].pow(2).sum())
    target = torch.zeros_like(h)
    target[keep] = decoded
    exact_loss, exact_grad = held["exact_mc"]
    loss, grad = mc_loss(gates, target, student, keep)
    n = int(keep.sum())
    return {
        "codec": codec.codec,
        "rank": codec.rank or "-",
        "fraction": codec.token_fraction,
        "bytes": codec.stored_bytes_per_token(p, w, d),
        "recon": recon,
        "mc_rel": abs(loss - exact_loss) / exact_loss,
        "grad_cos": float(torch.nn.functional.cosine_similarity(grad, exact_grad, dim=0)),
        "enc": n / t_enc,
        "dec": n / t_dec,
    }


def best_of(fn: Any, repeats: int = 3) -> tuple[float, Any]:
    """(fastest wall time, result) of `repeats` calls: the first call pays one-off kernel warm-up."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def shard_time(
    stage: TeacherShardStage, shards: list[list[dict[str, Any]]], codec: StatesCodec, fit: torch.Tensor
) -> float:
    from dataclasses import replace

    out: TeacherOutputSpec = replace(stage.out, states=codec)
    basis = fit_basis(fit, codec.rank) if codec.rank is not None else None
    return best_of(
        lambda: [
            compute_shard(stage.adapter, ex, i, len(ex), out, MICRO_BATCH, stage.pad_id, basis)
            for i, ex in enumerate(shards)
        ]
    )[0]


def basis_fit_time(stage: TeacherShardStage, examples: list[dict[str, Any]], rank: int) -> float:
    """Seconds to fit a rank-`rank` basis on `examples` as the cache stage does (best of 3)."""
    device = input_device(stage.adapter.model)

    def fit() -> None:
        acc = BasisAccumulator()
        for s in range(0, len(examples), MICRO_BATCH):
            padded = pad_batch(examples[s : s + MICRO_BATCH], stage.pad_id)
            batch = {k: v.to(device) for k, v in padded.items()}
            acc.update(teacher_targets(stage.adapter, batch, stage.out)["expert_states"])
        acc.finish(rank)

    return best_of(fit)[0]


def whole_build_ratio(
    tokens: float, sample: int, fit_per_token: float, lossy_per_token: float, fp16_per_token: float
) -> float:
    """(basis fit on min(sample, tokens) tokens + lossy build) / float16 build, for a `tokens`-token build."""
    return (min(sample, tokens) * fit_per_token + tokens * lossy_per_token) / (tokens * fp16_per_token)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--records", type=int, default=192)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Ray actor's CPUs)")
    ap.add_argument("--ranks", default="16,32,64")
    ap.add_argument(
        "--fractions", default="0.5,0.25", help="token fractions tried with fp8 at the middle rank"
    )
    ap.add_argument("--teacher", default=None, help="a fine-tuned demo teacher (default: random init)")
    ap.add_argument("--tokenizer", default=None, help="its tokenizer (with --teacher)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ranks = [int(r) for r in args.ranks.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-codecs-") as tmp:
        assets = make_assets(Path(tmp), args.records)
        spec = assets["spec"]
        if args.teacher:
            from dataclasses import replace

            spec = replace(spec, teacher_path=args.teacher, tokenizer_path=args.tokenizer or args.teacher)
        shards = shard_batches(spec, assets["records"])
        stage = TeacherShardStage(spec, DEMO_TEACHER.num_experts, MICRO_BATCH, 0.0)  # W = E_T (width null)
        t0 = time.perf_counter()
        ex = exact_targets(stage, shards)
        t_teacher = time.perf_counter() - t0
        n = ex["states"].shape[0]
        half = n // 2
        fit = ex["states"][:half]
        held = {"states": ex["states"][half:], "gates": ex["gates"][half:]}
        keep_all = keep_rows(ex["seq_ids"], ex["counts"], 0, 1.0)
        held["keep"] = {1.0: torch.from_numpy(keep_all[half:])}
        for f in fractions:
            held["keep"][f] = torch.from_numpy(keep_rows(ex["seq_ids"], ex["counts"], 0, f)[half:])
        student = fixed_student(held["states"])  # the one `moedistill report states-fidelity` uses
        held["exact_mc"] = mc_loss(held["gates"], held["states"], student, held["keep"][1.0])

        grid = [StatesCodec(codec=c) for c in ROW_CODECS]
        grid += [StatesCodec(codec=c, rank=r) for c in ("fp8", "int8") for r in ranks]
        mid = ranks[len(ranks) // 2]
        grid += [StatesCodec(codec="fp8", rank=mid, token_fraction=f) for f in fractions]
        rows = [evaluate(c, fit, held, student) for c in grid]
        timed = [StatesCodec(), StatesCodec(codec="fp8"), StatesCodec(codec="fp8", rank=mid)]
        timed.append(StatesCodec(codec="fp8", rank=mid, token_fraction=fractions[0]))
        times = {(c.codec, c.rank or "-", c.token_fraction): shard_time(stage, shards, c, fit) for c in timed}
        base = times[("float16", "-", 1.0)]
        basis_examples = [e for shard in shards for e in shard][: len(ex["seq_ids"]) // 2]
        basis_tokens = sum(ex["counts"][: len(basis_examples)])  # exact_targets walks the same order
        t_fit = basis_fit_time(stage, basis_examples, mid)

        p, w, d = ex["states"].shape[1:]
        print(
            f"demo teacher: {p} cached pairs x W={w} x D={d}; {n} distillation tokens ({half} basis sample, "
            f"{n - half} held out), {len(shards)} shards of {ROWS_PER_SHARD}; exact fp32 teacher pass "
            f"{t_teacher:.1f} s; threads={args.threads}; teacher {args.teacher or 'random init'}"
        )
        head = (
            f"| {'codec':<8} | {'rank':>4} | {'frac':>4} | {'B/token':>8} | {'recon':>8} | "
            f"{'MC rel err':>10} | {'grad cos':>8} | {'enc tok/s':>9} | {'dec tok/s':>9} | {'shard x':>7} |"
        )
        print(head)
        print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
        for r in rows:
            t = times.get((r["codec"], r["rank"], r["fraction"]))
            print(
                f"| {r['codec']:<8} | {r['rank']!s:>4} | {r['fraction']:>4.2f} | {r['bytes']:>8.0f} | "
                f"{r['recon']:>8.2e} | {r['mc_rel']:>10.2e} | {r['grad_cos']:>8.4f} | {r['enc']:>9.0f} | "
                f"{r['dec']:>9.0f} | {(t / base if t else float('nan')):>7.2f} |"
            )
        fp16_pt, lossy_pt = base / n, times[("fp8", mid, 1.0)] / n
        fit_pt = t_fit / basis_tokens
        sample = StatesCodec().basis_tokens  # the cache stage's default basis sample
        print(
            f"\nbasis fit, fp8 r={mid}: {t_fit:.2f} s on {basis_tokens} sample tokens "
            f"({fit_pt / fp16_pt:.2f}x the float16 build's time per token); whole cache stage (basis fit "
            f"included, {sample:,}-token sample) vs the float16 build:"
        )
        label = f"fp8 r={mid} / float16"
        print(f"| {'tokens built':>12} | {'sample':>6} | {label:>{len(label)}} |")
        print(f"|{'-' * 14}|{'-' * 8}|{'-' * (len(label) + 2)}|")
        for tokens in (n, sample, 1e6, 1e8, 1e9):
            ratio = whole_build_ratio(tokens, sample, fit_pt, lossy_pt, fp16_pt)
            print(f"| {tokens:>12.3g} | {min(sample, int(tokens)):>6} | {ratio:>{len(label) - 1}.3f}x |")


if __name__ == "__main__":
    main()
