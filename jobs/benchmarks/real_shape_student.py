"""`bench_cache.py --shape NAME`: distillation steps of the real-shaped student (skipped with --no-student).

The student the shape's cache is built for (real_shapes.SHAPES names one of the configs below: a real
hidden size and vocabulary, 4 experts top-2, as many layers as the truncated teacher, random weights)
trains on one micro-batch of the teacher's targets as the cache stage computes them (teacher_targets, the
logits top-k sparsified to the cache's k), side by side with the same torch threads and AdamW, interleaved
over rounds (jobs/benchmarks/measure):

  sft         student forward + backward, cross-entropy only
  kd          the same plus forward KL on the cached sparse teacher logits
  b-distill   all-expert student forward on the paired layers + SFT + KL + MC + ERD (DistillConfig defaults)

It prints each step's median time, its ratio to sft and the peak RSS, the optimizer state included. What a
step costs at a real vocabulary is the output layer's: 151,936 x hidden logits per token, twice (forward and
backward), whatever the method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from measure import interleaved
from transformers import AutoModelForCausalLM, OlmoeConfig, PretrainedConfig, Qwen3MoeConfig

from pipeline.cache.build.sparsify import topk_sparsify
from pipeline.config import DistillConfig
from pipeline.data.collate import distill_positions
from pipeline.distill.methods import get_method
from pipeline.distill.objective import distill_objective
from pipeline.distill.student import DistillStudent
from pipeline.models.alignment import layer_pairs


def qwen3_06b_moe(layers: int, vocab: int) -> PretrainedConfig:
    """Qwen3-0.6B's attention and width (hidden 1024, 16 heads, 8 KV heads of 128), its FFN of 3072 as 4
    upcycled experts top-2."""
    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=3072, intermediate_size=3072, norm_topk_prob=True, tie_word_embeddings=True,
        max_position_embeddings=4096,
    )  # fmt: skip


def olmoe_small(layers: int, vocab: int) -> PretrainedConfig:
    """OLMoE's family at hidden 1024: 16 heads, 4 experts of width 1024 top-2."""
    return OlmoeConfig(
        vocab_size=vocab, hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=16, num_experts=4, num_experts_per_tok=2, intermediate_size=1024,
        norm_topk_prob=False, tie_word_embeddings=False, max_position_embeddings=4096,
    )  # fmt: skip


def teacher_batch(
    batch: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], logits_k: int
) -> dict[str, Any]:
    """`batch` with the teacher's targets (teacher_targets at states_mass 1) in the fields the cache reader
    gives: the logits top-k sparsified as the cache stage stores them."""
    idx, logp, tail = topk_sparsify(targets["logits"], logits_k)
    rest = {k: v for k, v in targets.items() if k != "logits"}
    return dict(batch, logit_indices=idx, logit_values=logp, logit_tail_logmass=tail, **rest)


def student_step_trials(
    make_config: Callable[[int, int], PretrainedConfig],
    teacher: dict[str, int],
    full: dict[str, Any],
    args: Any,
) -> tuple[Any, PretrainedConfig, float]:
    """(interleaved trials of sft / kd / b-distill steps, the student's config, its parameters in
    millions) on the batch `full` (teacher_batch); teacher: its num_layers, vocab_size, hidden_size."""
    mask = distill_positions(full["response_mask"])
    torch.manual_seed(0)
    config = make_config(teacher["num_layers"], teacher["vocab_size"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    pairs = layer_pairs(teacher["num_layers"], config.num_hidden_layers)
    student = DistillStudent(model, [s for s, _ in pairs], teacher["hidden_size"])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    weights, generator = DistillConfig(), torch.Generator().manual_seed(0)

    def step(method: str, with_experts: bool) -> Callable[[], None]:
        spec = get_method(method)

        def run() -> None:
            fwd = student(full["input_ids"], full["attention_mask"], mask, with_experts=with_experts)
            loss, _ = distill_objective(spec, weights, fwd, full, mask, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    variants = {"sft": step("sft", False), "kd": step("kd", False), "b-distill": step("b-distill", True)}
    trials = interleaved(variants, args.trials, warmup=1, memory=True)
    return trials, config, sum(p.numel() for p in model.parameters()) / 1e6


def print_student_steps(
    trials: Any, config: PretrainedConfig, params: float, tokens: int, rounds: int
) -> None:
    print(
        f"\nstudent {config.model_type} hidden {config.hidden_size}, vocab {config.vocab_size}, "
        f"{config.num_experts} experts top-{config.num_experts_per_tok}, {config.num_hidden_layers} layers "
        f"({params:.0f}M parameters), AdamW; one micro-batch of {tokens} distillation tokens"
    )
    print(f"{'step':<12}{'median [min-max] s':>28}{'vs sft':>22}{'tokens/s':>10}{'peak RSS GB':>13}")
    for name in trials.seconds:
        print(
            f"{name:<12}{trials.time_text(name):>28}{trials.ratio_text(name, 'sft'):>22}"
            f"{tokens / trials.median(name):>10.0f}{trials.peak_rss[name] / 2**30:>13.1f}"
        )
    print(
        f"({rounds} interleaved rounds after one warm-up round; the teacher freed first: peak RSS is the "
        "student's, its optimizer's and the targets')"
    )
