"""The GPU path in one command: the CUDA tests, then realistic-size throughput; <= 6 minutes on one H200.

    python3 jobs/benchmarks/gpu_check.py --out "$OUT"                   # a GPU machine, from the repo root
    python jobs/benchmarks/gpu_check.py --device cpu --tiny --out DIR     # CPU smoke run, < 1 minute

Writes `summary.json` (everything) and `summary.md` (the tables) into --out:

1. cuda_tests: `pytest -m cuda tests/training/test_cuda.py` in a subprocess; passed / failed / skipped counts.
2. teacher: a Qwen3-4B-MoE-shaped teacher as jobs/configs/qwen3-4b-moe-to-0.6b-moe.yaml upcycles it (hidden
   2560, 4 experts top-2 of FFN width 9728, vocab 151,936; bf16; random weights from the config, no download)
   over one shard of synthetic sequences, side by side: plain forward, forward + all experts of the cached
   layers, and the cache's shard computation (compute_shard: + top-64 sparsify, aggregation, bf16 encode to
   host memory). Distillation tokens/s, ratio to the plain forward, peak memory. The layer count (at most the
   real 36) is chosen to fit the time budget from two timed probes (1 and 2 layers): t(L) = a + b L.
3. student: a Qwen3-0.6B-MoE-shaped student (hidden 1024, 28 layers, 4 experts top-2) doing one training step
   as a GPU worker does (fp32 weights, bf16 autocast, AdamW, clipping) on synthetic cached targets shaped like
   the cache's (28 pairs with a 36-layer teacher, W = 4, D = 2560, top-64): SFT vs KD vs B-Distill.
4. codecs: encode / decode throughput of pipeline.cache.format.codecs' row codecs on cache-sized expert states
   (skipped when that module is absent).

Needs torch, transformers, numpy and pytest only (no Ray, zarr or datasets). A section that fails is recorded
with its error and the others still run; the exit code is 1 when a section or a CUDA test failed. On one H200
the full run should take 4-5 minutes (CUDA tests <= 150 s, teacher <= 120 s): give it a 420 s limit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a plain script: the GPU image has no install

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

from pipeline.cache.build.teacher import TeacherOutputSpec, compute_shard
from pipeline.config import DistillConfig, TrainConfig
from pipeline.data.collate import distill_positions, pad_batch
from pipeline.distill.methods import get_method
from pipeline.distill.objective import distill_objective
from pipeline.distill.student import DistillStudent
from pipeline.models.adapter import MoEAdapter
from pipeline.models.alignment import layer_pairs
from pipeline.models.build import TinyMoEConfig, count_parameters, tiny_moe_hf_config
from pipeline.training.optim import build_optimizer
from pipeline.training.parallel import clip_gradients

REPO = Path(__file__).resolve().parents[2]
GB = 1e9


@dataclass(frozen=True)
class Profile:
    """Sizes and time budgets of one run: FULL (the Qwen preset's shapes) or TINY (the CPU smoke run)."""

    teacher: TinyMoEConfig  # num_layers = the most the teacher benchmark may use
    student: TinyMoEConfig
    vocab: int
    seq_len: tuple[int, int]  # sequence lengths drawn uniformly in [lo, hi]; the first third is the prompt
    shard_sequences: int
    micro_batch: int  # sequences per teacher forward (cache.batch_size)
    student_batch: int  # sequences per training micro-step (distill.train.batch_size)
    logits_k: int
    codec_tokens: int
    teacher_budget_s: float  # probes, build and timed passes of the teacher section together
    student_steps: int  # timed steps per method (after one warm-up step)
    tests_timeout_s: float


FULL = Profile(
    teacher=TinyMoEConfig(
        hidden_size=2560,
        num_layers=36,
        num_experts=4,
        top_k=2,
        moe_intermediate_size=9728,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=4096,
        rope_theta=1e6,
    ),
    student=TinyMoEConfig(
        hidden_size=1024,
        num_layers=28,
        num_experts=4,
        top_k=2,
        moe_intermediate_size=3072,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=4096,
        rope_theta=1e6,
    ),
    vocab=151936,
    seq_len=(256, 512),  # the preset's max_length is 512
    shard_sequences=32,
    micro_batch=16,
    student_batch=8,
    logits_k=64,
    codec_tokens=512,
    teacher_budget_s=120.0,
    student_steps=5,
    tests_timeout_s=150.0,
)
TINY = Profile(
    teacher=TinyMoEConfig(hidden_size=64, num_layers=4, num_experts=4, top_k=2, moe_intermediate_size=64),
    student=TinyMoEConfig(hidden_size=32, num_layers=2, num_experts=4, top_k=2, moe_intermediate_size=32),
    vocab=512,
    seq_len=(16, 32),
    shard_sequences=8,
    micro_batch=4,
    student_batch=4,
    logits_k=16,
    codec_tokens=64,
    teacher_budget_s=6.0,
    student_steps=2,
    tests_timeout_s=120.0,
)
STATES_DTYPE = "bfloat16"  # the presets' cache.states_dtype (their stored states codec is fp8 at rank 48)


# --- helpers ------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a GPU call returns before it finishes


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak memory since reset_peak: allocated GPU memory, or None on the CPU (see process_peak_rss_gb)."""
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_model(cfg: TinyMoEConfig, vocab: int, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """Random weights from the config, created directly on `device` (a 12B teacher never passes the CPU)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(tiny_moe_hf_config(cfg, vocab, 0, 1, 2), dtype=dtype)
    return model.to(device)  # a no-op for the weights; moves any buffer created outside the device context


def make_examples(profile: Profile, n: int, seed: int) -> list[dict[str, Any]]:
    """Synthetic tokenised examples (prompt = the first third, the rest the response)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = profile.seq_len
    out = []
    for i in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        prompt = length // 3
        ids = torch.randint(3, profile.vocab, (length,), generator=g).tolist()
        out.append({"seq_id": i, "input_ids": ids, "response_mask": [0] * prompt + [1] * (length - prompt)})
    return out


def distill_tokens(examples: list[dict[str, Any]]) -> int:
    return sum(sum(e["response_mask"][1:]) for e in examples)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# --- 1. the CUDA tests --------------------------------------------------------------------------------------
def cuda_tests(profile: Profile, out_dir: Path) -> dict[str, Any]:
    xml = out_dir / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(
            [*cmd, "tests/training/test_cuda.py"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=profile.tests_timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"pytest did not finish within {profile.tests_timeout_s:.0f} s"}
    if not xml.exists():
        return {"error": f"pytest wrote no report (rc {proc.returncode})", "output": proc.stdout[-3000:]}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    problems = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            for node in case.findall(kind):
                problems.append(f"{case.get('name')}: {kind}: {(node.get('message') or '').splitlines()[:1]}")
    skip_reasons = sorted({(n.get("message") or "") for n in suite.iter("skipped")})
    return {
        "rc": proc.returncode,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "problems": problems,
        "skip_reasons": skip_reasons,
        "tail": proc.stdout[-1500:],
    }


# --- 2. the teacher: plain forward vs all experts vs the shard computation ----------------------------------
def teacher_pass(
    adapter: MoEAdapter, examples: list[dict[str, Any]], out: TeacherOutputSpec, profile: Profile
):
    """Per phase: (seconds, peak memory) over the shard's micro-batches (formed as compute_shard does)."""
    device = adapter.model.get_input_embeddings().weight.device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    batches = [
        {
            k: v.to(device)
            for k, v in pad_batch([examples[i] for i in order[s : s + profile.micro_batch]], 0).items()
        }
        for s in range(0, len(order), profile.micro_batch)
    ]

    @torch.no_grad()
    def plain() -> None:
        for b in batches:
            adapter.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    @torch.no_grad()
    def experts() -> None:
        for b in batches:
            mask = distill_positions(b["response_mask"])
            adapter.forward_with_experts(b["input_ids"], b["attention_mask"], out.cached_layers, mask)

    def shard() -> None:
        compute_shard(adapter, examples, 0, len(examples), out, profile.micro_batch, pad_id=0)

    result = {}
    for name, fn in (("plain_forward", plain), ("forward_all_experts", experts), ("shard_compute", shard)):
        reset_peak(device)
        result[name] = (timed(fn, device), peak_gb(device))
    return result


def teacher_output(profile: Profile, layers: int) -> TeacherOutputSpec:
    """The cached layers of an L-layer teacher: paired with a student of the preset's depth ratio, 28/36."""
    ratio = profile.student.num_layers / profile.teacher.num_layers
    student_layers = max(1, min(layers, round(layers * ratio)))
    return TeacherOutputSpec(
        cached_layers=tuple(t for _, t in layer_pairs(layers, student_layers)),
        width=profile.student.num_experts,
        logits_mode="topk",
        logits_k=profile.logits_k,
        states_dtype=STATES_DTYPE,
        store_expert_states=True,
        teacher_responses="none",
        max_new_tokens=0,
    )


def run_teacher(profile: Profile, layers: int, device: torch.device, examples, reps: int) -> dict[str, Any]:
    """Build an L-layer teacher, warm up with one shard computation, time `reps` passes of every phase."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build_model(replace(profile.teacher, num_layers=layers), profile.vocab, device, dtype).eval()
    adapter = MoEAdapter(model)
    build_s = time.perf_counter() - t0
    out = teacher_output(profile, layers)
    compute_shard(adapter, examples, 0, len(examples), out, profile.micro_batch, pad_id=0)  # warm-up
    passes = [teacher_pass(adapter, examples, out, profile) for _ in range(reps)]
    params = count_parameters(model)
    del model, adapter
    free_memory()
    best = {k: min(p[k][0] for p in passes) for k in passes[0]}
    return {
        "layers": layers,
        "cached_layers": list(out.cached_layers),
        "parameters": params,
        "dtype": str(dtype).removeprefix("torch."),
        "build_s": build_s,
        "pass_s": sum(best.values()),
        "seconds": best,
        "peak_gb": {k: max((p[k][1] or 0.0) for p in passes) or None for k in passes[0]},
    }


def choose_layers(
    profile: Profile, probes: list[dict[str, Any]], device: torch.device, reps: int, left_s: float
):
    """The most layers whose build + warm-up + timed passes fit the time left (and half the GPU memory)."""
    (p1, p2) = probes
    # t(L) = a + b L; b at least half the 2-layer average, so a noisy probe cannot promise too many layers
    per_layer = max(p2["pass_s"] - p1["pass_s"], 0.25 * p2["pass_s"])
    fixed = max(p1["pass_s"] - per_layer, 0.0)
    build_per_layer = max(p2["build_s"], p1["build_s"]) / 2

    # per final run: build, one warm-up (about one shard pass), then `reps` passes of all three phases
    def cost(n: int) -> float:
        return build_per_layer * n + (fixed + per_layer * n) * (1 + reps) * 1.2

    by_time = max(n for n in range(1, profile.teacher.num_layers + 1) if n == 1 or cost(n) <= left_s)
    by_memory = profile.teacher.num_layers
    if device.type == "cuda":
        layer_bytes = (p2["parameters"] - p1["parameters"]) * 2
        activations = max(v or 0.0 for v in p2["peak_gb"].values()) * GB - p2["parameters"] * 2
        free = torch.cuda.mem_get_info(device)[0]
        by_memory = max(1, int((0.5 * free - p1["parameters"] * 2 - activations) // layer_bytes) + 1)
    chosen = max(2, min(by_time, by_memory))
    rule = {
        "per_layer_s": per_layer,
        "fixed_s": fixed,
        "left_s": left_s,
        "by_time": by_time,
        "by_memory": by_memory,
    }
    return chosen, rule


def teacher_section(profile: Profile, device: torch.device) -> dict[str, Any]:
    start = time.perf_counter()
    examples = make_examples(profile, profile.shard_sequences, seed=0)
    tokens = distill_tokens(examples)
    reps = 2
    probes = [run_teacher(profile, n, device, examples, reps=1) for n in (1, 2)]
    left = profile.teacher_budget_s - (time.perf_counter() - start)
    layers, rule = choose_layers(profile, probes, device, reps, left)
    final = probes[1]
    if layers > 2:
        try:
            final = run_teacher(profile, layers, device, examples, reps)
        except torch.OutOfMemoryError:  # the memory rule was too optimistic: report the 2-layer probe instead
            free_memory()
            rule["out_of_memory_at"], layers = layers, 2
    base = tokens / final["seconds"]["plain_forward"]
    phases = {
        name: {
            "tokens_per_s": tokens / s,
            "vs_plain_forward": (tokens / s) / base,
            "peak_gb": final["peak_gb"][name],
        }
        for name, s in final["seconds"].items()
    }
    return {
        "shape": {**asdict(replace(profile.teacher, num_layers=layers)), "vocab_size": profile.vocab},
        "max_layers": profile.teacher.num_layers,
        "layers": layers,
        "layer_choice": {
            **rule,
            "budget_s": profile.teacher_budget_s,
            "probes": [p["pass_s"] for p in probes],
        },
        "cached_layers": final["cached_layers"],
        "parameters": final["parameters"],
        "dtype": final["dtype"],
        "sequences": len(examples),
        "sequence_tokens": sum(len(e["input_ids"]) for e in examples),
        "distill_tokens": tokens,
        "micro_batch": profile.micro_batch,
        "logits_k": profile.logits_k,
        "states_dtype": STATES_DTYPE,
        "build_s": final["build_s"],
        "phases": phases,
    }


# --- 3. the student: SFT vs KD vs B-Distill steps from cached targets ---------------------------------------
def synthetic_targets(n: int, pairs: int, profile: Profile, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-token teacher targets as the cache reader delivers them (float32, distinct top-k ids)."""
    g = torch.Generator(device=device).manual_seed(0)
    k, width, hidden = profile.logits_k, profile.student.num_experts, profile.teacher.hidden_size
    probs = torch.softmax(2 * torch.randn(n, k + 1, device=device, generator=g), -1).sort(
        -1, descending=True
    )[0]
    first = torch.randint(0, profile.vocab, (n, 1), device=device, generator=g)
    stride = profile.vocab // k  # k distinct ids per row: first + i * stride (mod V), i < k
    return {
        "logit_indices": (first + torch.arange(k, device=device) * stride) % profile.vocab,
        "logit_values": probs[:, :k].log(),
        "logit_tail_logmass": probs[:, k].log(),
        "gates": torch.softmax(torch.randn(n, pairs, width, device=device, generator=g), -1),
        "expert_states": 0.1 * torch.randn(n, pairs, width, hidden, device=device, generator=g),
    }


def student_section(profile: Profile, device: torch.device) -> dict[str, Any]:
    pairs = layer_pairs(profile.teacher.num_layers, profile.student.num_layers)
    student = build_model(profile.student, profile.vocab, device, torch.float32).train()
    model = DistillStudent(student, [s for s, _ in pairs], profile.teacher.hidden_size).to(device)
    optimizer = build_optimizer(model, TrainConfig())
    examples = make_examples(profile, profile.student_batch, seed=1)
    batch = {k: v.to(device) for k, v in pad_batch(examples, 0).items()}
    mask = distill_positions(batch["response_mask"])
    tokens = int(mask.sum())
    batch.update(synthetic_targets(tokens, len(pairs), profile, device))
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    weights = DistillConfig()

    def step(method_name: str, seed: int) -> None:
        method = get_method(method_name)
        gen = torch.Generator(device=device).manual_seed(seed) if method.uses_mc else None
        optimizer.zero_grad(set_to_none=True)
        with autocast:  # as pipeline.training.loop: forward, loss and backward under autocast
            forward = model(batch["input_ids"], batch["attention_mask"], mask, with_experts=method.uses_mc)
            loss, _ = distill_objective(method, weights, forward, batch, mask, gen)
            loss.backward()
        clip_gradients(model, 1.0)
        optimizer.step()

    steps = {}
    for name in ("sft", "kd", "b-distill"):
        step(name, 0)  # warm-up: kernels, allocator, optimizer state
        reset_peak(device)
        seconds = [timed(lambda n=name, i=i: step(n, i + 1), device) for i in range(profile.student_steps)]
        steps[name] = {"step_s": min(seconds), "peak_gb": peak_gb(device)}
    base = steps["sft"]["step_s"]
    for entry in steps.values():
        entry["tokens_per_s"] = tokens / entry["step_s"]
        entry["vs_sft"] = entry["step_s"] / base
    return {
        "shape": {**asdict(profile.student), "vocab_size": profile.vocab},
        "parameters": count_parameters(model),
        "pairs": len(pairs),
        "teacher_hidden_size": profile.teacher.hidden_size,
        "sequences": len(examples),
        "distill_tokens": tokens,
        "precision": "fp32 weights, bf16 autocast" if device.type == "cuda" else "fp32",
        "timed_steps": profile.student_steps,
        "steps": steps,
    }


# --- 4. the expert-state codecs -----------------------------------------------------------------------------
def codecs_section(profile: Profile, device: torch.device) -> dict[str, Any]:
    try:  # why: a checkout without the cache code skips this section, not the whole run
        from pipeline.cache.format import codecs
    except ImportError as e:
        return {"skipped": f"pipeline.cache.format.codecs is not importable ({e})"}
    pairs = len(layer_pairs(profile.teacher.num_layers, profile.student.num_layers))
    shape = (profile.codec_tokens, pairs, profile.student.num_experts, profile.teacher.hidden_size)
    states = 0.1 * torch.randn(shape, device=device, generator=torch.Generator(device=device).manual_seed(0))
    host = states.cpu()
    raw_gb = states.numel() * 4 / GB
    rows = {}
    for codec in codecs.ROW_CODECS:
        codecs.encode_rows(states[:1], codec)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        payload, scales = codecs.encode_rows(states, codec)  # returns host arrays: includes the copy back
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        decoded = codecs.decode_rows(payload, scales, codec)
        t_dec = time.perf_counter() - t0
        bound = codecs.error_bound(host, codec, scales)
        rows[codec] = {
            "bytes_per_value": codecs.bytes_per_value(codec),
            "encode_gb_per_s": raw_gb / t_enc,  # fp32 input, device -> host payload included
            "decode_gb_per_s": raw_gb / t_dec,  # host payload -> host fp32
            "within_error_bound": bool(((decoded - host).abs() <= bound).all()),
        }
    return {"states_shape": list(shape), "input_device": device.type, "codecs": rows}


# --- the run ------------------------------------------------------------------------------------------------
def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=props.total_memory / GB, cuda=torch.version.cuda)
    return info


def section(summary: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        summary[name] = fn()
    except Exception as e:  # record and go on: one run should report every section it can
        summary[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    summary[name]["wall_s"] = time.perf_counter() - t0
    free_memory()
    print(f"[gpu_check] {name}: {summary[name]['wall_s']:.1f} s", flush=True)


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(s: dict[str, Any]) -> str:
    d = s["device_info"]
    where = d.get("gpu") or f"CPU ({d['cpu_count']} cores, {d['torch_threads']} torch threads)"
    lines = [
        f"# GPU check: {where}, {'tiny' if s['tiny'] else 'full'} sizes",
        "",
        f"torch {d['torch']}, transformers {d['transformers']}, python {d['python']}; "
        f"wall {s['wall_s']:.0f} s; process peak RSS {s['process_peak_rss_gb']:.1f} GB.",
        "",
    ]
    t = s["cuda_tests"]
    lines += ["## CUDA tests (`pytest -m cuda tests/training/test_cuda.py`)", ""]
    if "error" in t:
        lines += [f"error: {t['error']}", ""]
    else:
        lines += [
            f"passed {t['passed']}, failed {t['failed']}, errors {t['errors']}, skipped {t['skipped']}",
            "",
        ]
        lines += [f"- {p}" for p in t["problems"]] + [f"- skipped: {r}" for r in t["skip_reasons"]] + [""]
    th = s["teacher"]
    lines += ["## Teacher: Qwen3-4B-MoE shape", ""]
    if "error" in th:
        lines += [f"error: {th['error']}", ""]
    else:
        sh, rule = th["shape"], th["layer_choice"]
        lines += [
            f"hidden {sh['hidden_size']}, {th['layers']} of {th['max_layers']} layers (chosen for the time "
            f"budget), {sh['num_experts']} experts top-{sh['top_k']}, FFN {sh['moe_intermediate_size']}, "
            f"vocab {sh['vocab_size']:,}; {th['parameters'] / 1e9:.2f}B parameters in {th['dtype']}; "
            f"cached layers {len(th['cached_layers'])}, top-{th['logits_k']}, {th['states_dtype']} states; "
            f"{th['sequences']} sequences ({th['distill_tokens']:,} distillation tokens), micro-batch "
            f"{th['micro_batch']}. Layer rule: a pass costs {rule['fixed_s']:.2f} s + "
            f"{rule['per_layer_s']:.2f} s per layer; {rule['by_time']} layers fit the "
            f"{rule['left_s']:.0f} s left, {rule['by_memory']} fit memory.",
            "",
            "| phase | distill tokens/s | vs plain forward | peak memory (GB) |",
            "|---|---:|---:|---:|",
        ]
        for name, p in th["phases"].items():
            ratio, peak = p["vs_plain_forward"], fmt(p["peak_gb"], 1)
            lines.append(f"| {name} | {fmt(p['tokens_per_s'])} | {ratio:.2f} | {peak} |")
        lines.append("")
    st = s["student"]
    lines += ["## Student: Qwen3-0.6B-MoE shape, one training step from cached targets", ""]
    if "error" in st:
        lines += [f"error: {st['error']}", ""]
    else:
        sh = st["shape"]
        lines += [
            f"hidden {sh['hidden_size']}, {sh['num_layers']} layers, {sh['num_experts']} experts "
            f"top-{sh['top_k']}; {st['parameters'] / 1e9:.2f}B parameters; {st['precision']}; "
            f"{st['sequences']} sequences ({st['distill_tokens']:,} distillation tokens) per step, "
            f"{st['pairs']} layer pairs; best of {st['timed_steps']} steps.",
            "",
            "| method | step (ms) | distill tokens/s | step time vs SFT | peak memory (GB) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, p in st["steps"].items():
            lines.append(
                f"| {name} | {p['step_s'] * 1e3:,.1f} | {fmt(p['tokens_per_s'])} | {p['vs_sft']:.2f} "
                f"| {fmt(p['peak_gb'], 1)} |"
            )
        lines.append("")
    c = s["codecs"]
    lines += ["## Expert-state codecs (pipeline.cache.format.codecs)", ""]
    if "error" in c or "skipped" in c:
        lines += [c.get("error") or c["skipped"], ""]
    else:
        lines += [
            f"states {c['states_shape']} fp32 on {c['input_device']}; GB/s of fp32 values.",
            "",
            "| codec | bytes/value | encode GB/s | decode GB/s | within error bound |",
            "|---|---:|---:|---:|---|",
        ]
        for name, p in c["codecs"].items():
            enc, dec = p["encode_gb_per_s"], p["decode_gb_per_s"]
            lines.append(
                f"| {name} | {p['bytes_per_value']} | {enc:.3g} | {dec:.3g} | {p['within_error_bound']} |"
            )
        lines.append("")
    return "\n".join(lines)


def failed(summary: dict[str, Any]) -> bool:
    tests = summary["cuda_tests"]
    broken = any("error" in summary[k] for k in ("cuda_tests", "teacher", "student", "codecs"))
    bound = all(r["within_error_bound"] for r in summary["codecs"].get("codecs", {}).values())
    return broken or tests.get("failed", 0) > 0 or tests.get("errors", 0) > 0 or not bound


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", required=True, help="folder for summary.json and summary.md (created)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and budgets (the CPU smoke run)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible. Fix: run on a GPU machine, or pass --device cpu --tiny.")
        return 2
    transformers.logging.set_verbosity_error()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = TINY if args.tiny else FULL
    device = torch.device(args.device)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {
        "tiny": args.tiny,
        "profile": asdict(profile),
        "device_info": device_info(device),
    }
    section(summary, "cuda_tests", lambda: cuda_tests(profile, out_dir))
    section(summary, "teacher", lambda: teacher_section(profile, device))
    section(summary, "student", lambda: student_section(profile, device))
    section(summary, "codecs", lambda: codecs_section(profile, device))
    summary["wall_s"] = time.perf_counter() - t0
    summary["process_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    summary["ok"] = not failed(summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out_dir / "summary.md").write_text(markdown(summary) + "\n")
    print(markdown(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
