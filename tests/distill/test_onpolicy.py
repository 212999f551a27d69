"""pipeline.distill.onpolicy: each on-policy loss against a hand-computed example, and the sampling rules."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from pipeline.distill.onpolicy import (
    AdaptiveSGOSchedule,
    ReplayBuffer,
    SparseTargets,
    bin_logprobs,
    choose_dataset_rows,
    distillm2_loss,
    distillm_batch_source,
    distillm_loss,
    generated_examples,
    gkd_loss,
    gkd_use_student_data,
    imitkd_dataset_prob,
    imitkd_loss,
    length_normalized_returns,
    minillm_loss,
    mix_rows,
    mixed_sampling_weights,
    whitened_returns,
)
from pipeline.errors import ConfigError

# One position, V = 3, teacher fully kept (k = V, no tail): the losses are their full-vocabulary versions.
P = [0.5, 0.3, 0.2]
Z = [1.0, 0.0, -1.0]  # student logits


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(x) for x in z]
    return [x / sum(e) for x in e]


def _full(p_rows: list[list[float]]) -> SparseTargets:
    n, v = len(p_rows), len(p_rows[0])
    return SparseTargets(
        torch.arange(v).repeat(n, 1),
        torch.tensor([[math.log(x) for x in row] for row in p_rows], dtype=torch.float64),
        torch.full((n,), float("-inf"), dtype=torch.float64),
    )


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


Q = _softmax(Z)


def test_imitkd_schedule_mixture_and_forward_kl() -> None:
    assert [imitkd_dataset_prob(s, 10) for s in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    assert choose_dataset_rows(5, 1.0, random.Random(0)) == [True] * 5
    assert choose_dataset_rows(5, 0.0, random.Random(0)) == [False] * 5
    share = np.mean(choose_dataset_rows(20000, 0.3, random.Random(1)))
    assert abs(share - 0.3) < 0.015
    assert mix_rows(["d0", "d1", "d2"], ["g0", "g1", "g2"], [True, False, True]) == ["d0", "g1", "d2"]
    loss = imitkd_loss(_full([P]), torch.tensor([Z], dtype=torch.float64))
    assert float(loss) == pytest.approx(_kl(P, Q), rel=1e-9)


def test_gkd_student_fraction_and_generalized_jsd() -> None:
    assert not gkd_use_student_data(0.0, random.Random(0)) and gkd_use_student_data(1.0, random.Random(0))
    rng = random.Random(2)
    assert abs(np.mean([gkd_use_student_data(0.25, rng) for _ in range(20000)]) - 0.25) < 0.015
    beta = 0.3
    m = [beta * p + (1 - beta) * q for p, q in zip(P, Q, strict=True)]
    expected = beta * _kl(P, m) + (1 - beta) * _kl(Q, m)
    assert float(gkd_loss(_full([P]), torch.tensor([Z], dtype=torch.float64), beta=beta)) == pytest.approx(
        expected, rel=1e-9
    )
    with pytest.raises(ConfigError, match="lambda"):
        gkd_use_student_data(1.5, rng)


def test_bin_logprobs_uses_the_tail_bin_outside_the_top_k() -> None:
    # k = 1: token 0 kept with p = 0.5, tail 0.5; student q = softmax(Z)
    targets = SparseTargets(
        torch.tensor([[0], [0]]), torch.tensor([[math.log(0.5)]] * 2), torch.tensor([math.log(0.5)] * 2)
    )
    t, s = bin_logprobs(targets, torch.tensor([Z, Z]), torch.tensor([0, 2]))
    assert t.tolist() == pytest.approx([math.log(0.5)] * 2)
    assert s.tolist() == pytest.approx([math.log(Q[0]), math.log(Q[1] + Q[2])])


def test_length_normalized_returns_and_mixed_sampling_weights() -> None:
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert length_normalized_returns(r, [3, 2]).tolist() == [2.5, 3.0, 0.0, 5.0, 0.0]
    q, p = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert mixed_sampling_weights(q, p, 0.0).tolist() == [1.0]
    assert float(mixed_sampling_weights(q, p, 0.2)) == pytest.approx(0.5 / (0.2 * 0.25 + 0.8 * 0.5))


def test_minillm_loss_value_and_gradient_by_hand() -> None:
    # One sequence of two positions, V = 2, teacher fully kept; sampled tokens y = (0, 1).
    p_rows = [[0.7, 0.3], [0.4, 0.6]]
    z = torch.tensor([[0.2, -0.1], [0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1])
    loss = minillm_loss(_full(p_rows), z, y, lengths=[2])
    q_rows = [_softmax(row) for row in z.tolist()]
    r = [math.log(p_rows[t][y[t]]) - math.log(q_rows[t][y[t]]) for t in range(2)]
    big_r = [r[1], 0.0]  # mean of the later rewards; none after the last position
    expected = sum(_kl(q_rows[t], p_rows[t]) - big_r[t] * math.log(q_rows[t][y[t]]) for t in range(2)) / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9)
    # gradient: the returns are constants (policy gradient), the reverse KL is differentiated exactly
    loss.backward()
    zz = z.detach().clone().requires_grad_(True)
    logq = torch.log_softmax(zz, dim=-1)
    logp = torch.tensor(p_rows, dtype=torch.float64).log()
    rkl = (logq.exp() * (logq - logp)).sum(dim=-1)
    ref = (rkl - torch.tensor(big_r) * logq[torch.arange(2), y]).mean()
    ref.backward()
    torch.testing.assert_close(z.grad, zz.grad)
    # with teacher-mixed sampling each position is reweighted by q / (alpha p + (1 - alpha) q)
    mixed = minillm_loss(_full(p_rows), z.detach(), y, lengths=[2], mix_alpha=0.5)
    w = [q_rows[t][y[t]] / (0.5 * p_rows[t][y[t]] + 0.5 * q_rows[t][y[t]]) for t in range(2)]
    terms = [_kl(q_rows[t], p_rows[t]) - big_r[t] * math.log(q_rows[t][y[t]]) for t in range(2)]
    assert float(mixed) == pytest.approx(sum(a * b for a, b in zip(w, terms, strict=True)) / 2, rel=1e-9)


def test_minillm_whitens_future_returns_over_the_batch() -> None:
    # returns of two sequences (3 and 2 positions); the last position of each has no future and stays 0
    returns = torch.tensor([2.5, 3.0, 0.0, 5.0, 0.0])
    std = math.sqrt((1.0**2 + 0.5**2 + 1.5**2) / 2)  # of (2.5, 3.0, 5.0), mean 3.5, unbiased
    expected = [-1.0 / std, -0.5 / std, 0.0, 1.5 / std, 0.0]
    assert whitened_returns(returns, [3, 2]).tolist() == pytest.approx(expected, rel=1e-6)
    assert whitened_returns(torch.tensor([1.0, 0.0]), [2]).tolist() == [1.0, 0.0]  # one value: unchanged
    # the loss uses the whitened returns: one sequence of three positions, V = 2, teacher fully kept
    p_rows = [[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]]
    z = torch.tensor([[0.2, -0.1], [0.5, 0.5], [-0.3, 0.4]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    q_rows = [_softmax(row) for row in z.tolist()]
    r = [math.log(p_rows[t][y[t]]) - math.log(q_rows[t][y[t]]) for t in range(3)]
    raw = [(r[1] + r[2]) / 2, r[2], 0.0]
    mean = (raw[0] + raw[1]) / 2
    sd = math.sqrt(((raw[0] - mean) ** 2 + (raw[1] - mean) ** 2) / 1)
    big_a = [(raw[0] - mean) / sd, (raw[1] - mean) / sd, 0.0]
    terms = [_kl(q_rows[t], p_rows[t]) - big_a[t] * math.log(q_rows[t][y[t]]) for t in range(3)]
    loss = minillm_loss(_full(p_rows), z, y, lengths=[3])
    assert float(loss) == pytest.approx(sum(terms) / 3, abs=1e-6)  # fp32 teacher targets
    plain = minillm_loss(_full(p_rows), z, y, lengths=[3], whiten=False)
    terms = [_kl(q_rows[t], p_rows[t]) - raw[t] * math.log(q_rows[t][y[t]]) for t in range(3)]
    assert float(plain) == pytest.approx(sum(terms) / 3, rel=1e-9)


def test_distillm_schedule_replay_buffer_and_skew_losses() -> None:
    sched = AdaptiveSGOSchedule(max_prob=0.25, step=0.1)
    probs = [sched.update(v) for v in (1.0, 0.9, 1.1, 1.2, 1.0, 1.3)]
    assert probs == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.2, 0.25])
    buf = ReplayBuffer(capacity=3, seed=0)
    buf.add(["a", "b", "c", "d"])  # FIFO: "a" evicted
    drawn = buf.sample(3)
    assert sorted(drawn) == ["b", "c", "d"]
    rng = random.Random(0)
    assert distillm_batch_source(0.0, 1.0, buf, 2, rng) == "dataset"
    assert distillm_batch_source(1.0, 1.0, buf, 2, rng) == "replay"
    assert distillm_batch_source(1.0, 1.0, ReplayBuffer(4), 2, rng) == "generate"  # empty buffer
    assert distillm_batch_source(1.0, 0.0, buf, 2, rng) == "generate"
    a = 0.1
    mix_t = [a * p + (1 - a) * q for p, q in zip(P, Q, strict=True)]
    mix_s = [a * q + (1 - a) * p for p, q in zip(P, Q, strict=True)]
    targets, z = _full([P]), torch.tensor([Z], dtype=torch.float64)
    assert float(distillm_loss(targets, z, "skl", alpha=a)) == pytest.approx(_kl(P, mix_t), rel=1e-9)
    assert float(distillm_loss(targets, z, "srkl", alpha=a)) == pytest.approx(_kl(Q, mix_s), rel=1e-9)
    with pytest.raises(ConfigError, match="skl"):
        distillm_loss(targets, z, "kl")  # type: ignore[arg-type]


def test_distillm2_pulls_up_teacher_responses_and_pushes_down_student_ones() -> None:
    a = 0.2
    p2, z2 = [0.1, 0.6, 0.3], [0.0, 2.0, 0.5]
    q2 = _softmax(z2)
    teacher_side = (_full([P]), torch.tensor([Z], dtype=torch.float64))
    student_side = (_full([p2]), torch.tensor([z2], dtype=torch.float64))
    expected = _kl(P, [a * p + (1 - a) * q for p, q in zip(P, Q, strict=True)]) + _kl(
        q2, [a * q + (1 - a) * p for p, q in zip(p2, q2, strict=True)]
    )
    assert float(distillm2_loss(teacher_side, student_side, alpha=a)) == pytest.approx(expected, rel=1e-9)


def test_sparse_targets_from_service_rows() -> None:
    rows = [
        {
            "logit_indices": np.array([[1, 0]], np.int32),
            "logit_values": np.array([[-0.5, -1.5]], np.float16),
            "logit_tail_logmass": np.array([-2.0], np.float32),
        },
        {
            "logit_indices": np.array([[2, 1], [0, 1]], np.int32),
            "logit_values": np.array([[-0.1, -3.0], [-0.7, -0.9]], np.float16),
            "logit_tail_logmass": np.array([-4.0, -2.5], np.float32),
        },
    ]
    t = SparseTargets.from_rows(rows)
    assert t.indices.dtype == torch.long and t.logprobs.dtype == torch.float32
    assert t.indices.tolist() == [[1, 0], [2, 1], [0, 1]] and t.tail.tolist() == [-2.0, -4.0, -2.5]


def test_generated_examples_cut_at_eos_and_drop_empty() -> None:
    eos, pad = 2, 0
    out = generated_examples([[5, 6], [7], [8]], [[9, 2, 0, 0], [4, 4, 0], [0, 0]], [10, 11, 12], eos, pad)
    assert out == [
        {"seq_id": 10, "input_ids": [5, 6, 9, 2], "response_mask": [0, 0, 1, 1]},
        {"seq_id": 11, "input_ids": [7, 4, 4], "response_mask": [0, 1, 1]},
    ]


def test_on_policy_presets_name_their_loss_source_and_simplifications() -> None:
    from pipeline.distill import onpolicy
    from pipeline.distill.methods import ON_POLICY_METHODS, get_method, method_names

    names = {"imitkd", "gkd-on-policy", "minillm", "distillm-sgo", "distillm-2", "sar"}
    assert set(ON_POLICY_METHODS) == names
    for name, spec in ON_POLICY_METHODS.items():
        assert spec.name == name and spec.source and spec.deviation and spec.data
        assert callable(getattr(onpolicy, spec.loss))
        assert name not in method_names()  # the offline distill stage cannot run them
        with pytest.raises(ConfigError, match="on-policy method"):
            get_method(name)
    targets, z = _full([P]), torch.tensor([Z], dtype=torch.float64)
    kl = onpolicy.gkd_loss(targets, z, **ON_POLICY_METHODS["gkd-on-policy"].loss_kwargs)
    assert float(kl) == pytest.approx(float(gkd_loss(targets, z, beta=0.5)))
