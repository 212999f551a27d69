"""Seed statistics of sweep tables on synthetic numbers, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from pipeline.errors import DataError
from pipeline.evaluate.stats import (
    format_seed_table,
    interval_excludes_zero,
    mean_std,
    paired_difference,
    seed_summaries,
    seed_table_markdown,
    t_cdf,
    t_quantile,
    values_by_seed,
)

# Two-sided 95% (0.975) and 99% (0.995) quantiles of Student's t, from standard tables.
T_TABLE = {1: (12.7062, 63.6567), 2: (4.3027, 9.9248), 4: (2.7764, 4.6041), 9: (2.2622, 3.2498),
           30: (2.0423, 2.7500)}  # fmt: skip


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantiles_match_tables(df: int) -> None:
    q975, q995 = T_TABLE[df]
    assert t_quantile(0.975, df) == pytest.approx(q975, abs=1e-4)
    assert t_quantile(0.995, df) == pytest.approx(q995, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-q975, abs=1e-4)
    assert t_cdf(q975, df) == pytest.approx(0.975, abs=1e-5)


def test_t_quantile_limits() -> None:
    assert t_cdf(0.0, 3) == 0.5
    assert t_quantile(0.975, 10_000) == pytest.approx(1.95996, abs=1e-3)  # -> the normal quantile
    for bad in ((0.0, 3), (1.0, 3), (0.5, 0), (0.5, 2.0)):
        with pytest.raises(ValueError):
            t_quantile(*bad)


def test_paired_difference_by_hand() -> None:
    method = {0: 1.30, 1: 1.35, 2: 1.40, 7: 9.0}  # seed 7 has no kd run: not paired
    kd = {0: 1.20, 1: 1.28, 2: 1.29}
    d = paired_difference(method, kd)
    # d = (0.10, 0.07, 0.11): mean 0.09333, sd = sqrt(((1/150)^2 + (7/300)^2 + (1/60)^2) / 2) = 0.020817
    half = 4.302653 * 0.0208167 / math.sqrt(3)
    assert (d.n, d.confidence) == (3, 0.95)
    assert d.mean == pytest.approx(0.093333, abs=1e-6)
    assert (d.low, d.high) == (
        pytest.approx(0.093333 - half, abs=1e-5),
        pytest.approx(0.093333 + half, abs=1e-5),
    )
    assert d.low == pytest.approx(0.04162, abs=1e-4) and d.excludes_zero and interval_excludes_zero(d)


def test_paired_difference_within_noise_includes_zero() -> None:
    d = paired_difference({0: 1.1, 1: 0.95, 2: 1.02}, {0: 1.0, 1: 1.0, 2: 1.0})
    # d = (0.10, -0.05, 0.02): mean 0.02333, sd 0.075056, half-width 4.3027 * 0.075056 / sqrt(3) = 0.18645
    assert d.mean == pytest.approx(0.023333, abs=1e-6)
    assert d.low == pytest.approx(-0.16312, abs=1e-4) and d.high == pytest.approx(0.20979, abs=1e-4)
    assert not d.excludes_zero
    # the same differences in an unpaired reading would not matter: a constant shift of both cancels
    shifted = paired_difference({s: v + 5 for s, v in {0: 1.1, 1: 0.95, 2: 1.02}.items()}, {0: 6, 1: 6, 2: 6})
    assert shifted.mean == pytest.approx(d.mean) and shifted.high == pytest.approx(d.high)


def test_paired_difference_needs_two_shared_seeds() -> None:
    with pytest.raises(DataError, match=r"distill\.train\.seed"):
        paired_difference({0: 1.0, 1: 2.0}, {1: 1.5, 2: 1.0})


def test_mean_std() -> None:
    assert mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(math.sqrt(7 / 3)))
    mean, std = mean_std([3.0])
    assert mean == 3.0 and math.isnan(std)


def _rows() -> list[dict]:
    rows = [{"model": "teacher", "method": "teacher", "test_set": ts, "rouge_l_mean": 50.0} for ts in "ab"]
    val = {"kd": [1.20, 1.28, 1.29], "b-distill": [1.30, 1.35, 1.40], "sft": [1.25, 1.24, 1.31]}
    for method, losses in val.items():
        for seed, loss in enumerate(losses):
            for ts, rouge in (("a", 20.0 + seed), ("b", 30.0 + seed)):
                rows.append({"model": f"{method}-s{seed}", "method": method, "setting": None, "seed": seed,
                             "test_set": ts, "rouge_l_mean": rouge, "val_loss": loss})  # fmt: skip
    rows.append({"model": "kd-e2", "method": "kd", "setting": "num_experts=2", "seed": 0, "test_set": "a",
                 "rouge_l_mean": 10.0, "val_loss": 2.0})  # fmt: skip
    return rows


def test_values_by_seed_from_results_rows() -> None:
    val = values_by_seed(_rows(), "val_loss")
    assert ("teacher", None) not in val
    assert val["kd", None] == {0: 1.20, 1: 1.28, 2: 1.29}  # one value per run, not per test set
    rouge = values_by_seed(_rows(), "rouge_l_mean")
    assert rouge["sft", None] == {0: 25.0, 1: 26.0, 2: 27.0}  # mean over the run's test sets
    assert values_by_seed(_rows(), "rouge_l_mean", test_set="b")["sft", None] == {0: 30.0, 1: 31.0, 2: 32.0}


def test_seed_summaries_and_table() -> None:
    summaries = {s.label: s for s in seed_summaries(values_by_seed(_rows(), "val_loss"))}
    kd, bd, sft = summaries["kd"], summaries["b-distill"], summaries["sft"]
    assert kd.vs_baseline is None and kd.mean == pytest.approx((1.20 + 1.28 + 1.29) / 3)
    assert bd.vs_baseline is not None and bd.vs_baseline.mean == pytest.approx(0.093333, abs=1e-6)
    assert sft.vs_baseline is not None and not sft.vs_baseline.excludes_zero  # d = (0.05, -0.04, 0.02)
    # a one-seed kd at that setting is its own baseline row, never compared
    assert summaries["kd (num_experts=2)"].vs_baseline is None
    table = format_seed_table(list(summaries.values()), "val loss")
    assert "difference to kd (paired, 95% CI)" in table
    assert "| b-distill | 1.350 ± 0.050 (n=3) | **+0.093 [+0.042, +0.145]** |" in table
    sft_line = next(line for line in table.splitlines() if line.startswith("| sft |"))
    assert "**" not in sft_line
    assert "| kd (num_experts=2) | 2.000 ± – (n=1) | – |" in table
    assert seed_table_markdown(_rows(), "val_loss", "val loss") == table
    # kd at a setting with the seeds of plain kd (e.g. from a knowledge-augmented cache): against plain kd
    ka_losses = enumerate((1.19, 1.26, 1.30))
    rows = _rows() + [{"model": f"kd-ka-s{s}", "method": "kd", "setting": "ka", "seed": s, "test_set": "a",
                       "rouge_l_mean": 1.0, "val_loss": v} for s, v in ka_losses]  # fmt: skip
    ka = {s.label: s for s in seed_summaries(values_by_seed(rows, "val_loss"))}["kd (ka)"].vs_baseline
    assert ka is not None and ka.mean == pytest.approx((-0.01 - 0.02 + 0.01) / 3)


def test_differences_to_the_same_method_at_a_reference_setting() -> None:
    """A codec sweep: each setting's student against the same method's student from the reference cache."""
    rows = []
    val = {
        ("kd", "codec=fp16"): [1.20, 1.28, 1.29],
        ("kd", "codec=fp8"): [1.22, 1.29, 1.32],
        ("b-distill", "codec=fp16"): [1.30, 1.35, 1.40],
        ("b-distill", "codec=fp8"): [1.40, 1.46, 1.48],
    }
    for (method, setting), losses in val.items():
        for seed, loss in enumerate(losses):
            rows.append({"model": f"{method}-{setting}-s{seed}", "method": method, "setting": setting,
                         "seed": seed, "test_set": "a", "val_loss": loss})  # fmt: skip
    summaries = {
        s.label: s for s in seed_summaries(values_by_seed(rows, "val_loss"), reference_setting="codec=fp16")
    }
    assert summaries["kd (codec=fp16)"].vs_baseline is None
    assert summaries["b-distill (codec=fp16)"].vs_baseline is None  # the reference is no kd here
    kd8, bd8 = summaries["kd (codec=fp8)"].vs_baseline, summaries["b-distill (codec=fp8)"].vs_baseline
    assert kd8 is not None and kd8.mean == pytest.approx((0.02 + 0.01 + 0.03) / 3)
    assert bd8 is not None and bd8.mean == pytest.approx((0.10 + 0.11 + 0.08) / 3)  # to b-distill, not kd
    table = seed_table_markdown(rows, "val_loss", "val loss", reference_setting="codec=fp16")
    assert "difference to the same method at codec=fp16 (paired, 95% CI)" in table
