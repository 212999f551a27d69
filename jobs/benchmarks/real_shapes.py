"""`bench_cache.py --shape NAME`: the cache stage at a real MoE's width, vocabulary and expert count.

The teacher is the named model's shape at truncated depth (2 layers by default), random weights, its routers
scaled so that a stated share of each token's router mass falls on its own top-k experts (`--sharpness`: a
random router is almost flat, and nothing could be skipped), or so that the experts carrying M of a token's
router mass are on average the fraction F of all experts (`--match-experts M:F`, F as measured on a trained
router of another expert count by `moedistill report router-sharpness`: the fraction, unlike a top-k mass at
a fixed k, carries over between expert counts; see pipeline/reports/router_sharpness.py). Its cache
aggregates to the student's 4 experts (cache.width = 4), the width mass truncation works on. Token ids are
random (no tokenizer: the shapes' vocabularies are the real ones). Side by side, interleaved over `--trials`
rounds (jobs/benchmarks/measure):

  plain forward            the model's own forward (its top-k experts only)
  forward + all experts    MoEAdapter.forward_with_experts: every expert on every cached token
  cache stage, m = X       compute_shard (forward, top-k sparsify, aggregation, fp16 encode) + the shard's
                           zarr/Parquet write with checksums, at cache.states_mass X

then bytes per token by field against `report storage --config`'s projection for the same shape, and the m
sweep: experts computed per token and layer, router mass kept, MC-loss relative error and gradient cosine
against exact states (pipeline.reports.fidelity.pair_fidelity).
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from measure import interleaved
from real_shape_student import (
    olmoe_small,
    print_student_steps,
    qwen3_06b_moe,
    student_step_trials,
    teacher_batch,
)
from transformers import AutoModelForCausalLM, OlmoeConfig, PretrainedConfig, Qwen3MoeConfig

from pipeline.cache.build.teacher import KEPT_MASS, TeacherOutputSpec, compute_shard, teacher_targets
from pipeline.cache.format.codecs import StatesCodec
from pipeline.cache.format.shard import ShardMeta, write_shard_files
from pipeline.cache.read.listing import bytes_by_field
from pipeline.config import load_config, with_overrides
from pipeline.data.collate import distill_positions, pad_batch
from pipeline.models.adapter import MoEAdapter
from pipeline.models.truncation import mass_selection
from pipeline.reports.fidelity import pair_fidelity
from pipeline.reports.router_sharpness import experts_for_mass
from pipeline.reports.storage_projection import project_from_config

REPO = Path(__file__).resolve().parents[2]
WIDTH = 4  # the student's experts: cache.width


def _qwen3_30b_a3b(layers: int) -> PretrainedConfig:
    return Qwen3MoeConfig(
        vocab_size=151_936, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, intermediate_size=6144, norm_topk_prob=True, tie_word_embeddings=False,
        max_position_embeddings=4096,
    )  # fmt: skip


def _olmoe_1b_7b(layers: int) -> PretrainedConfig:
    return OlmoeConfig(
        vocab_size=50_304, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, intermediate_size=1024,
        norm_topk_prob=False, tie_word_embeddings=False, max_position_embeddings=4096,
    )  # fmt: skip


@dataclass(frozen=True)
class Shape:
    teacher: Callable[[int], PretrainedConfig]
    student: str  # what the cache is built for (its E_S = WIDTH)
    student_config: Callable[[int, int], PretrainedConfig]  # (layers, vocab) -> the student's config


SHAPES = {
    "qwen3-30b-a3b": Shape(
        _qwen3_30b_a3b, "Qwen3-0.6B-MoE-shaped (hidden 1024, vocab 151,936, 4 experts)", qwen3_06b_moe
    ),
    "olmoe-1b-7b": Shape(_olmoe_1b_7b, "OLMoE-shaped (hidden 1024, vocab 50,304, 4 experts)", olmoe_small),
}


def topk_mass(logits: torch.Tensor, k: int, scale: float) -> float:
    """Mean router mass on each token's top-k experts at logits x scale."""
    return float(torch.softmax(logits.float() * scale, -1).topk(k, -1).values.sum(-1).mean())


def experts_fraction(logits: torch.Tensor, mass: float, scale: float) -> float:
    """Mean fraction of the experts a token needs for `mass` of its router mass at logits x scale."""
    probs = torch.softmax(logits.float() * scale, -1)
    return float(experts_for_mass(probs, mass).mean()) / probs.shape[-1]


def router_target(args: Any, top_k: int) -> tuple[Callable[[torch.Tensor, float], float], float, str]:
    """(statistic of logits x scale that rises with the scale, its target, a description) from --sharpness
    or --match-experts M:F (the fraction falls as the router sharpens: its negative rises)."""
    if args.match_experts:
        mass, frac = (float(x) for x in args.match_experts.split(":"))
        text = f"{frac} of the experts carrying {mass} of a token's router mass (--match-experts)"
        return (lambda logits, scale: -experts_fraction(logits, mass, scale)), -frac, text
    text = f"a top-{top_k} router mass of {args.sharpness}"
    return (lambda logits, scale: topk_mass(logits, top_k, scale)), args.sharpness, text


@torch.no_grad()
def sharpen_routers(
    adapter: MoEAdapter,
    batch: dict[str, torch.Tensor],
    target: float,
    stat: Callable[[torch.Tensor, float], float] | None = None,
) -> list[float]:
    """Scale each MoE layer's router weight (layer by layer, on the MoE inputs the layers below give) so
    stat(logits, scale) -- default the mean top-k router mass -- is `target`; returns the scales. A linear
    router's logits scale with its weight; stat must rise with the scale."""
    stat = stat or (lambda logits, scale: topk_mass(logits, adapter.top_k, scale))
    mask = distill_positions(batch["response_mask"])
    scales = []
    for layer in range(adapter.num_layers):
        fwd = adapter.forward_with_experts(
            batch["input_ids"], batch["attention_mask"], [layer], mask, compute_experts=False
        )
        logits = fwd.router_logits[layer]
        lo, hi = 1e-2, 1e4  # bisection in log space
        for _ in range(60):
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if stat(logits, mid) < target else (lo, mid)
        adapter.block_view(layer).router_weight.mul_(hi)
        scales.append(hi)
    return scales


def random_examples(num_seqs: int, seq_len: int, vocab: int, prompt: int = 8) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "seq_id": i,
            "input_ids": torch.randint(3, vocab, (seq_len,), generator=g).tolist(),
            "response_mask": [0] * prompt + [1] * (seq_len - prompt),
        }
        for i in range(num_seqs)
    ]


def projected(shape: str, teacher_dir: Path, seq_len: int, logits_k: int) -> dict[str, float]:
    """`moedistill report storage --config`'s bytes per token by field for this cache."""
    config = with_overrides(
        load_config(REPO / "jobs" / "configs" / "demo.yaml"),
        {
            "teacher.build": None,
            "teacher.path": str(teacher_dir),
            "cache.layers": "all",
            "cache.width": WIDTH,
            "cache.logits_k": logits_k,
            "data.max_length": seq_len,
        },
    )
    report = project_from_config(config, source=f"{shape} at truncated depth")
    return {f.name: f.logical_per_token for f in report.fields}


def measured(shard_dir: Path, arrays: dict[str, Any], tokens: int) -> dict[str, tuple[float, float]]:
    """(raw, on disk) bytes per token by field of one written shard."""
    groups = {
        "logits": ("logit_indices", "logit_values", "logit_tail_logmass"),
        "gates": ("gates",),
        "expert_states": ("expert_states",),
    }
    commit_files = {
        rel: {"bytes": p.stat().st_size}
        for p in shard_dir.rglob("*")
        if p.is_file() and (rel := str(p.relative_to(shard_dir))) != "_SHARD.json"
    }
    disk = bytes_by_field({"shards": [{"files": commit_files}]})
    out = {
        name: (sum(arrays[a].nbytes for a in names) / tokens, sum(disk.get(a, 0) for a in names) / tokens)
        for name, names in groups.items()
    }
    out["index"] = (float("nan"), disk.get("index", 0) / tokens)
    return out


def cache_stage_trials(
    adapter: MoEAdapter, examples: list[dict[str, Any]], out: TeacherOutputSpec, pad_id: int, args: Any
) -> tuple[Any, dict[float, Any], Path]:
    """Interleaved rounds (one warm-up) of the plain forward, the all-expert forward and the cache stage at
    each of args.masses, on `examples` as one micro-batch; returns (trials, the shard data by m, the work dir
    holding the written shards: the caller removes it)."""
    batch = pad_batch(examples, pad_id)
    mask = distill_positions(batch["response_mask"])
    outs = {m: dataclasses.replace(out, states_mass=m) for m in args.masses}
    work = Path(tempfile.mkdtemp(prefix="bench-shape-"))
    meta = ShardMeta(out.cached_layers, out.width, adapter.hidden_size, adapter.vocab_size, "topk",
                     out.logits_k, "float16", True, False, StatesCodec())  # fmt: skip
    written: dict[float, Any] = {}

    def cache_stage(m: float) -> Callable[[], None]:
        def run() -> None:
            data = compute_shard(adapter, examples, 0, len(examples), outs[m], len(examples), pad_id)
            target = work / f"m{m}"
            shutil.rmtree(target, ignore_errors=True)
            write_shard_files(data, meta, str(target))
            written[m] = data

        return run

    ids, attn = batch["input_ids"], batch["attention_mask"]
    model = adapter.model
    variants: dict[str, Callable[[], Any]] = {
        "plain forward": lambda: model(input_ids=ids, attention_mask=attn, use_cache=False),
        "forward + all experts": lambda: adapter.forward_with_experts(ids, attn, out.cached_layers, mask),
        **{f"cache stage, m = {m:g}": cache_stage(m) for m in args.masses},
    }
    with torch.no_grad():
        trials = interleaved(variants, args.trials, warmup=1, memory=True)
    return trials, written, work


def run_shape(name: str, args: Any) -> None:
    shape = SHAPES[name]
    torch.manual_seed(0)
    config = shape.teacher(args.layers)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    adapter = MoEAdapter(model)
    examples = random_examples(args.seqs, args.seq_len, adapter.vocab_size)
    batch = pad_batch(examples, 0)
    tokens = int(distill_positions(batch["response_mask"]).sum())
    stat, target, target_text = router_target(args, adapter.top_k)
    scales = sharpen_routers(adapter, batch, target, stat)
    layers = tuple(range(adapter.num_layers))
    base_out = TeacherOutputSpec(layers, WIDTH, "topk", args.logits_k, "float16", True, "none", 1)
    trials, written, work = cache_stage_trials(adapter, examples, base_out, 0, args)

    # bytes per token: measured on the m = 1 shard (truncation changes values, never sizes)
    teacher_dir = work / "teacher-config"
    config.save_pretrained(teacher_dir)
    proj = projected(name, teacher_dir, args.seq_len, args.logits_k)
    exact_m = max(args.masses)
    meas = measured(work / f"m{exact_m}", written[exact_m].arrays, tokens)
    exact = teacher_targets(adapter, batch, base_out)  # the m sweep's reference and the student's targets
    sweep = mass_sweep(adapter, batch, base_out, args.sweep, exact)
    shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n== {name}: teacher {config.model_type} hidden {config.hidden_size}, {adapter.num_experts} "
        f"experts top-{adapter.top_k}, expert width {adapter.expert_intermediate_size}, vocab "
        f"{adapter.vocab_size}, {adapter.num_layers} layers (truncated depth), random weights; student "
        f"{shape.student} =="
    )
    logits_after = _router_logits(adapter, batch, layers).values()
    after = [f"{topk_mass(r, adapter.top_k, 1.0):.3f}" for r in logits_after]
    frac = [f"{experts_fraction(r, 0.9, 1.0):.3f}" for r in logits_after]
    print(
        f"routers scaled x{', x'.join(f'{s:.3g}' for s in scales)} to {target_text} (measured after: "
        f"top-{adapter.top_k} mass {', '.join(after)}; fraction of experts for 0.9 of the mass "
        f"{', '.join(frac)}); {args.seqs} sequences x {args.seq_len} "
        f"tokens = {tokens} distillation tokens; torch threads {torch.get_num_threads()}; experts "
        f"implementation {getattr(config, '_experts_implementation', '?')}"
    )
    print_times(trials, args.trials)
    print_bytes(meas, proj)
    print_sweep(sweep, adapter.num_experts, adapter.top_k)
    if not args.no_student:  # the teacher freed first: it and the student never share memory, as in the
        full = teacher_batch(batch, exact, base_out.logits_k)  # pipeline
        dims = {"num_layers": adapter.num_layers, "vocab_size": adapter.vocab_size,
                "hidden_size": adapter.hidden_size}  # fmt: skip
        del model, adapter
        gc.collect()
        trials = student_step_trials(shape.student_config, dims, full, args)
        print_student_steps(*trials, tokens, args.trials)


def run_trained(config_path: str, args: Any) -> None:
    """--config C: the config's fine-tuned teacher, untouched (its routers are trained), on the first
    args.seqs of the sequences its cache is built from as one micro-batch, its cached layers and width."""
    from pipeline.cache.build.teacher import tokenize_shard
    from pipeline.cache.stage import cached_layers_for, teacher_checkpoint
    from pipeline.data.stage import load_tokenizer, prepare_data
    from pipeline.models.build import load_causal_lm

    config = load_config(config_path)
    prepared = prepare_data(config)
    tok = load_tokenizer(prepared.tokenizer_path)
    examples = tokenize_shard(tok, prepared.splits.train[: args.seqs], 0, config.data.max_length)
    path = teacher_checkpoint(config)
    adapter = MoEAdapter(load_causal_lm(path, torch_dtype="float32", setting="teacher"))
    layers = cached_layers_for(config, adapter.num_layers)
    width = config.cache.width or adapter.num_experts
    base_out = TeacherOutputSpec(layers, width, "topk", config.cache.logits_k, "float16", True, "none", 1)
    pad_id = int(tok.pad_token_id)
    trials, _, work = cache_stage_trials(adapter, examples, base_out, pad_id, args)
    shutil.rmtree(work, ignore_errors=True)
    batch = pad_batch(examples, pad_id)
    tokens = int(distill_positions(batch["response_mask"]).sum())
    sweep = mass_sweep(adapter, batch, base_out, args.sweep, teacher_targets(adapter, batch, base_out))
    print(
        f"\n== {config.name}: fine-tuned teacher {path}: {adapter.num_experts} experts top-{adapter.top_k}, "
        f"expert width {adapter.expert_intermediate_size}, hidden {adapter.hidden_size}, "
        f"{adapter.num_layers} layers, cached layers {list(layers)} at width {width}; {len(examples)} of its "
        f"cache's sequences = {tokens} distillation tokens (one micro-batch); torch threads "
        f"{torch.get_num_threads()} =="
    )
    print_times(trials, args.trials)
    print_sweep(sweep, adapter.num_experts, adapter.top_k)


def print_times(trials: Any, rounds: int) -> None:
    base = "plain forward"
    print(f"\n{'variant':<26}{'median [min-max] s':>28}{'vs plain forward':>24}{'peak RSS GB':>13}")
    for v in trials.seconds:
        ratio = trials.ratio_text(v, base)
        print(f"{v:<26}{trials.time_text(v):>28}{ratio:>24}{trials.peak_rss[v] / 2**30:>13.1f}")
    print(f"({rounds} interleaved rounds after one warm-up round; ratios paired within a round)")


def print_bytes(meas: dict[str, tuple[float, float]], proj: dict[str, float]) -> None:
    print(f"\n{'field':<15}{'measured B/tok':>16}{'projected B/tok':>17}{'diff':>8}{'on disk B/tok':>15}")
    for field in ("logits", "gates", "expert_states", "index"):
        raw, disk = meas[field]
        want = proj.get(field, float("nan"))
        diff = f"{raw / want - 1:+.1%}" if raw == raw else "n/a"
        print(f"{field:<15}{raw:>16.1f}{want:>17.1f}{diff:>8}{disk:>15.1f}")
    print(
        "(measured: stored dtype x shape per token; on disk: the blosc-compressed zarr files, padded to "
        "the 256-token chunk; the index projection assumes max_length sequences half response)"
    )


def print_sweep(sweep: list[dict[str, float]], num_experts: int, top_k: int) -> None:
    print(f"\n{'m':>6}{'experts/token-layer':>21}{'kept mass':>11}{'MC-loss rel err':>17}{'grad cos':>10}")
    for row in sweep:
        print(
            f"{row['m']:>6g}{row['experts']:>21.1f}{row['kept']:>11.4f}{row['mc_rel']:>17.2e}"
            f"{row['grad_cos']:>10.5f}"
        )
    print(f"(all experts: {num_experts} per token-layer; the model's own forward: {top_k})")


@torch.no_grad()
def _router_logits(
    adapter: MoEAdapter, batch: dict[str, torch.Tensor], layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    mask = distill_positions(batch["response_mask"])
    fwd = adapter.forward_with_experts(
        batch["input_ids"], batch["attention_mask"], layers, mask, compute_experts=False
    )
    return fwd.router_logits


def mass_sweep(
    adapter: MoEAdapter,
    batch: dict[str, torch.Tensor],
    out: TeacherOutputSpec,
    masses: list[float],
    exact: dict[str, torch.Tensor],
) -> list[dict[str, float]]:
    """Per m: experts computed per (token, layer), router mass kept, worst-pair MC-loss relative error and
    gradient cosine against `exact` (teacher_targets of the same batch at states_mass 1)."""
    logits = _router_logits(adapter, batch, out.cached_layers)
    keep = torch.ones(len(exact["gates"]), dtype=torch.bool)
    rows = []
    for m in masses:
        t = teacher_targets(adapter, batch, dataclasses.replace(out, states_mass=m))
        g, h = exact["gates"], exact["expert_states"]
        pairs = [
            pair_fidelity(g[:, p], h[:, p], t["expert_states"][:, p], keep, p)
            for p in range(len(out.cached_layers))
        ]
        probs = {i: adapter.block_view(i).probs_from_logits(v) for i, v in logits.items()}
        experts = statistics.mean(float(mass_selection(p, out.width, m).sum(-1).float().mean()) for p in
                                  probs.values())  # fmt: skip
        rows.append({
            "m": m, "experts": experts, "kept": float(t.get(KEPT_MASS, torch.ones(1)).mean()),
            "mc_rel": max(x["mc_rel"] for x in pairs), "grad_cos": min(x["grad_cos"] for x in pairs),
        })  # fmt: skip
    return rows
