"""Teacher/student alignment maths shared by the teacher side (cache) and the student side (distill).

B-Distill pairs student MoE layers with teacher layers by the linear rule, maps teacher experts onto student
experts (Eq. 6) and folds teacher gates and expert states to the student's width (docs/method.md):

* ``layer_pairs``: (s, t) with t = ceil((s + 1) L_T / L_S) - 1, 0-based.
* ``expert_mapping``: pi(j) = floor(j E_S / E_T).
* ``aggregate_gates`` / ``aggregate_expert_states``: group sums of the full teacher softmax, and the
  gate-weighted group means of every teacher expert's output.
* ``check_reaggregation``: a cache stored at width W folds to E_S exactly when E_S divides W.

The public import path stays ``pipeline.distill.losses`` (outside code calls it there); this module is where
the code lives, so the cache stage never imports the distillation stage.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def _positive_int(value: object, name: str) -> int:
    # bool is an int subclass; a True here is always a caller bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def expert_mapping(num_teacher_experts: int, num_student_experts: int) -> torch.LongTensor:
    """pi(j) = floor(j * E_S / E_T) for teacher experts j = 0..E_T-1 (Eq. 6 in 0-based form).

    Any 1 <= E_S <= E_T is allowed; when E_S does not divide E_T the groups differ in size by at most one
    (e.g. 6 -> 4 gives [0, 0, 1, 2, 2, 3]). Every student expert receives at least one teacher expert.
    """
    e_t = _positive_int(num_teacher_experts, "num_teacher_experts")
    e_s = _positive_int(num_student_experts, "num_student_experts")
    if e_s > e_t:
        raise ValueError(
            f"the student has more experts per layer ({e_s}) than the teacher ({e_t}); B-Distill maps "
            "teacher experts onto student experts, so some student experts would get no teacher expert. "
            "Use num_student_experts <= num_teacher_experts."
        )
    return torch.div(torch.arange(e_t, dtype=torch.long) * e_s, e_t, rounding_mode="floor")


def layer_pairs(num_teacher_layers: int, num_student_layers: int) -> list[tuple[int, int]]:
    """(s, t) pairs, t = ceil((s + 1) * L_T / L_S) - 1, for every student MoE layer s = 0..L_S-1.

    In 1-based terms t is the smallest teacher layer whose linear-rule image floor(l_T * L_S / L_T) is l_S.
    Integer arithmetic only, so there is no float rounding for large layer counts.
    """
    l_t = _positive_int(num_teacher_layers, "num_teacher_layers")
    l_s = _positive_int(num_student_layers, "num_student_layers")
    if l_s > l_t:
        raise ValueError(
            f"the student has more MoE layers ({l_s}) than the teacher ({l_t}); the linear layer rule pairs "
            "each student layer with a distinct teacher layer. Use num_student_layers <= num_teacher_layers."
        )
    return [(s, -(-(s + 1) * l_t // l_s) - 1) for s in range(l_s)]


def check_reaggregation(cached_width: int, num_student_experts: int) -> None:
    """Raise ValueError unless a cache aggregated to ``cached_width`` experts can be folded to E_S.

    Folding W -> E_S equals folding E_T -> E_S directly exactly when E_S divides W
    (floor(floor(j W / E_T) / m) == floor(j E_S / E_T) for W = m * E_S).
    """
    w = _positive_int(cached_width, "cached_width")
    e_s = _positive_int(num_student_experts, "num_student_experts")
    if w % e_s != 0:
        divisors = [d for d in range(1, w + 1) if w % d == 0]
        raise ValueError(
            f"a cache stored at expert width {w} cannot be re-aggregated to {e_s} student experts: the "
            f"student expert count must divide the cached width (valid: {divisors}). "
            "Pick such a student expert count or rebuild the cache at a width it divides."
        )


def _mapping_matrix(num_teacher_experts: int, num_student_experts: int, like: Tensor) -> Tensor:
    """One-hot [E_T, E_S] matrix M with M[j, pi(j)] = 1, on ``like``'s device and dtype."""
    pi = expert_mapping(num_teacher_experts, num_student_experts).to(like.device)
    eye = torch.eye(num_student_experts, dtype=like.dtype, device=like.device)
    return eye[pi]


def aggregate_gates(p_teacher: Tensor, num_student_experts: int) -> Tensor:
    """p~_e = sum_{j: pi(j) = e} p_j over the last dim: [..., E_T] -> [..., E_S].

    ``p_teacher`` must be the full softmax over all teacher experts (not only the routed top-k).
    """
    if p_teacher.dim() < 1 or not p_teacher.is_floating_point():
        raise ValueError(
            f"p_teacher must be a floating tensor [..., E_T], got {tuple(p_teacher.shape)} {p_teacher.dtype}"
        )
    mapping = _mapping_matrix(p_teacher.shape[-1], num_student_experts, p_teacher)
    return p_teacher @ mapping


def aggregate_expert_states(p_teacher: Tensor, h_teacher: Tensor, num_student_experts: int) -> Tensor:
    """h~_e = sum_{j: pi(j) = e} (p_j / p~_e) h_j: [..., E_T], [..., E_T, D] -> [..., E_S, D].

    A group whose gate mass p~_e is exactly 0 (e.g. fp16 underflow of a very peaked router) gets the zero
    state: its weights are 0/0, and MC exploration never draws an expert with zero probability, so the value
    is never used. The division is guarded so neither the result nor its gradient is NaN.
    """
    if p_teacher.dim() < 1 or h_teacher.shape[:-1] != p_teacher.shape:
        raise ValueError(
            f"expected p_teacher [..., E_T] and h_teacher [..., E_T, D] with the same leading dims, got "
            f"{tuple(p_teacher.shape)} and {tuple(h_teacher.shape)}"
        )
    if not (p_teacher.is_floating_point() and h_teacher.is_floating_point()):
        raise ValueError(
            f"p_teacher and h_teacher must be floating tensors, got {p_teacher.dtype}, {h_teacher.dtype}"
        )
    dtype = torch.promote_types(p_teacher.dtype, h_teacher.dtype)
    # Weights in fp32 at least: p_j / p~_e in bf16 would lose most of its mantissa.
    wdtype = torch.promote_types(dtype, torch.float32)
    p = p_teacher.to(wdtype)
    mapping = _mapping_matrix(p.shape[-1], num_student_experts, p)  # [E_T, E_S]
    group_mass = p @ mapping  # [..., E_S]
    per_expert_mass = group_mass @ mapping.T  # [..., E_T]: p~_{pi(j)}
    positive = per_expert_mass > 0
    weights = torch.where(positive, p / torch.where(positive, per_expert_mass, torch.ones_like(p)), 0.0)
    # [..., E_S, E_T] @ [..., E_T, D]: a batched matmul, never materialising weights * h ([..., E_T, D]).
    combine = (weights.unsqueeze(-1) * mapping).transpose(-1, -2).to(dtype)
    return combine @ h_teacher.to(dtype)
