"""Expert-state codecs (pipeline.cache.format.codecs): row codec bounds, low-rank bases, re-aggregation in
coefficient space, the subspace MC distance and deterministic token subsampling. Pure torch/numpy, fast."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.cache.format import codecs as C
from pipeline.models.alignment import aggregate_expert_states

P, W, D = 2, 4, 24


def _rows(seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes, incl. an all-zero row and a row of tiny values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, P, W, D, generator=g) * torch.logspace(-3, 2, 64).view(64, 1, 1, 1)
    x[0, 0, 0] = 0.0
    x[1, 0, 0] = 1e-6 * torch.randn(D, generator=g)
    x[2, 1, 3, :5] = 0.0  # exact zeros inside a row
    return x


@pytest.fixture(scope="module")
def low_rank_states() -> torch.Tensor:
    """States with a steep spectrum (like real expert states): a rank-6 affine part plus small noise."""
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(P, W, D, 6, generator=g)
    coef = torch.randn(512, P, W, 6, generator=g) * torch.tensor([8.0, 4, 2, 1, 0.5, 0.25])
    mean = torch.randn(P, W, D, generator=g)
    return torch.einsum("npwr,pwdr->npwd", coef, basis) + mean + 0.01 * torch.randn(512, P, W, D, generator=g)


@pytest.fixture(scope="module")
def gates() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(3 * torch.randn(512, P, W, generator=g), dim=-1)
    p[0, 0, :2] = 0.0  # a group with zero gate mass (fp16 underflow of a peaked router)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-12)


@pytest.mark.parametrize("codec", C.ROW_CODECS)
def test_row_codec_round_trip_within_its_bound(codec: str) -> None:
    x = _rows()
    payload, scales = C.encode_rows(x, codec)
    assert payload.dtype == C.payload_dtype(codec) and payload.shape == x.shape
    if codec in C.SCALED_CODECS:
        assert scales is not None and scales.dtype == np.float16 and scales.shape == x.shape[:-1]
        qmax = 448.0 if codec == "fp8" else 127.0
        s = torch.from_numpy(scales).float()
        assert bool((x.abs().amax(-1) <= qmax * s).all())  # rounded up: nothing saturates
    else:
        assert scales is None
    y = C.decode_rows(payload, scales, codec)
    assert y.dtype == torch.float32
    err = (x - y).abs()
    assert bool((err <= C.error_bound(x, codec, scales)).all())
    assert bool((y[0, 0, 0] == 0).all()) and bool((y[2, 1, 3, :5] == 0).all())
    # The bound is tight enough to mean something: the relative squared error of each codec is small.
    rel = float((x - y).pow(2).sum() / x.pow(2).sum())
    assert rel < {"float16": 1e-6, "bfloat16": 2e-5, "fp8": 2e-3, "int8": 2e-4}[codec]


def test_scaled_codecs_store_one_byte_per_value_and_fp8_is_e4m3() -> None:
    x = torch.tensor([[448.0, -1.0, 0.5, 3.0]])
    payload, scales = C.encode_rows(x, "fp8")
    assert payload.dtype == np.uint8 and float(scales[0]) == 1.0
    assert np.array_equal(
        payload[0], torch.tensor([448.0, -1.0, 0.5, 3.0]).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    )
    assert C.bytes_per_value("fp8") == C.bytes_per_value("int8") == 1 and C.scale_bytes_per_row("fp8") == 2


def test_non_finite_states_and_unknown_codecs_are_refused() -> None:
    with pytest.raises(ValueError, match="NaN or inf"):
        C.encode_rows(torch.tensor([[1.0, float("nan")]]), "fp8")
    with pytest.raises(ValueError, match=r"cache\.states_codec"):
        C.encode_rows(torch.ones(1, 2), "fp4")


def test_basis_is_orthonormal_deterministic_and_exact_at_full_rank(low_rank_states: torch.Tensor) -> None:
    basis = C.fit_basis(low_rank_states[:200], D)
    again = C.fit_basis(low_rank_states[:200].clone(), D)
    assert torch.equal(basis.u, again.u) and torch.equal(basis.mean, again.mean)
    eye = torch.einsum("pwdr,pwds->pwrs", basis.u, basis.u)
    assert torch.allclose(eye, torch.eye(D).expand_as(eye), atol=1e-5)
    h = low_rank_states[200:]  # held out: exactness at r = D does not depend on the sample
    assert torch.allclose(C.reconstruct(C.project(h, basis), basis), h, atol=1e-4)


def test_low_rank_captures_a_steep_spectrum(low_rank_states: torch.Tensor) -> None:
    basis = C.fit_basis(low_rank_states[:256], 6)
    h = low_rank_states[256:]
    rel = float((C.reconstruct(C.project(h, basis), basis) - h).pow(2).sum() / (h - basis.mean).pow(2).sum())
    assert rel < 1e-3
    worse = C.fit_basis(low_rank_states[:256], 3)
    rel3 = float((C.reconstruct(C.project(h, worse), worse) - h).pow(2).sum() / (h - worse.mean).pow(2).sum())
    assert rel3 > 10 * rel  # dropping real directions shows up


def test_streamed_basis_equals_the_one_batch_fit(low_rank_states: torch.Tensor) -> None:
    acc = C.BasisAccumulator()
    for start in range(0, 256, 64):
        acc.update(low_rank_states[start : start + 64])
    streamed, whole = acc.finish(6), C.fit_basis(low_rank_states[:256], 6)
    assert torch.allclose(streamed.u, whole.u, atol=1e-5) and torch.allclose(
        streamed.mean, whole.mean, atol=1e-5
    )


def test_basis_rank_may_exceed_the_sample_size() -> None:
    sample = torch.randn(5, 1, 1, D)
    basis = C.fit_basis(sample, D)
    h = torch.randn(3, 1, 1, D)
    assert torch.allclose(C.reconstruct(C.project(h, basis), basis), h, atol=1e-4)


@pytest.mark.parametrize("codec", C.ROW_CODECS)
@pytest.mark.parametrize("rank", [5, D])
@pytest.mark.parametrize("e_s", [1, 2, 4])
def test_reaggregation_of_coefficients_commutes_with_aggregate_expert_states(
    codec: str, rank: int, e_s: int, low_rank_states: torch.Tensor, gates: torch.Tensor
) -> None:
    basis = C.fit_basis(low_rank_states[:128], rank)
    payload, scales = C.encode_rows(C.project(low_rank_states, basis), codec)
    c_hat = C.decode_rows(payload, scales, codec)
    states = C.reconstruct(c_hat, basis).double()
    # At E_S = W a reader does not aggregate (every slot keeps its state, zero-gate slots too).
    full = aggregate_expert_states(gates.double(), states, e_s) if e_s != W else states
    gb = C.group_basis(basis, e_s)
    assert gb.dim == min(D, (W // e_s) * (rank + 1))
    c_tilde = C.aggregate_coefficients(gates, c_hat, gb)
    assert c_tilde.shape == (low_rank_states.shape[0], P, e_s, gb.dim)
    via_coeffs = C.expand_group(c_tilde, gb)
    scale = full.abs().amax()
    assert torch.allclose(via_coeffs.double(), full, atol=2e-5 * float(scale))
    if e_s == 2:  # slots 0 and 1 of token 0, pair 0 have zero gate mass: their group gets the zero state
        assert bool((via_coeffs[0, 0, 0] == 0).all())
    if e_s == W:  # nothing to aggregate: the gates are not needed
        no_gates = C.expand_group(C.aggregate_coefficients(None, c_hat, gb), gb)
        assert torch.equal(no_gates, via_coeffs)


def test_subspace_distance_equals_full_space_distance(
    low_rank_states: torch.Tensor, gates: torch.Tensor
) -> None:
    basis = C.fit_basis(low_rank_states[:128], 5)
    c_hat = C.decode_rows(*C.encode_rows(C.project(low_rank_states, basis), "fp8"), "fp8")
    gb = C.group_basis(basis, 2)
    c_tilde = C.aggregate_coefficients(gates, c_hat, gb)  # [N, P, E, q]
    target = C.expand_group(c_tilde, gb)  # [N, P, E, D]
    student = torch.randn(target.shape, generator=torch.Generator().manual_seed(3)) * 2
    full = (student.double() - target.double()).pow(2).mean(-1)
    sub = C.subspace_sq_distance(student, gb.v, c_tilde)  # v [P, E, D, q] broadcasts over tokens
    assert sub.shape == full.shape
    assert torch.allclose(sub.double(), full, rtol=1e-4, atol=1e-5)
    # A student inside the subspace: the out-of-subspace term vanishes, the distance is the coefficient one.
    # fp32 cancellation in ||s||^2 - ||V^T s||^2 is relative to ||s||^2 / D, so that is the tolerance.
    inside = C.expand_group(c_tilde + 0.1, gb)
    d_in = C.subspace_sq_distance(inside, gb.v, c_tilde)
    tol = 1e-5 * float(inside.pow(2).mean())
    assert torch.allclose(d_in, torch.full_like(d_in, 0.01 * gb.dim / D), atol=tol)


def test_splitmix64_matches_the_reference_sequence() -> None:
    # First output of the reference splitmix64 generator seeded with 0 (Vigna).
    assert int(C._splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF
    # Pinned: a change of the hash would silently re-select tokens of existing caches.
    h = C.token_hash(np.array([0, 1, 12345]), np.array([0, 7, 3]), 0)
    assert [int(v) for v in h] == [0x238275BC38FCBE91, 0x7A099DAD0DD482F0, 0xFCB69E84FFB8955A]


def test_token_subsampling_is_deterministic_and_keeps_its_fraction() -> None:
    seq = np.repeat(np.arange(400), 50)
    pos = np.tile(np.arange(50), 400)
    a = C.keep_tokens(seq, pos, seed=7, fraction=0.25)
    assert np.array_equal(a, C.keep_tokens(seq.copy(), pos.copy(), seed=7, fraction=0.25))
    assert abs(a.mean() - 0.25) < 0.02  # 20,000 tokens: 4.6 standard deviations
    assert (a != C.keep_tokens(seq, pos, seed=8, fraction=0.25)).mean() > 0.2
    assert C.keep_tokens(seq, pos, 7, 1.0).all()
    assert (a <= C.keep_tokens(seq, pos, 7, 0.5)).all()  # nested: a larger fraction keeps a superset
    # keep_rows (a shard's row order) agrees with the per-token function, whatever the shard grouping.
    counts = [50] * 400
    assert np.array_equal(C.keep_rows(list(range(400)), counts, 7, 0.25), a)
    assert np.array_equal(C.keep_rows(list(range(200, 400)), counts[200:], 7, 0.25), a[200 * 50 :])
    with pytest.raises(ValueError, match="states_token_fraction"):
        C.keep_tokens(seq, pos, 7, 0.0)


def test_token_hash_is_the_same_in_another_process() -> None:
    code = (
        "import numpy as np; from pipeline.cache.format.codecs import keep_tokens; "
        "print(''.join('1' if k else '0' for k in keep_tokens(np.arange(64), np.arange(64) % 5, 3, 0.5)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = "".join("1" if k else "0" for k in C.keep_tokens(np.arange(64), np.arange(64) % 5, 3, 0.5))
    assert out.strip() == here


def test_codecs_import_without_zarr_ray_or_datasets() -> None:
    code = (
        "import sys\n"
        "for m in ('zarr', 'ray', 'datasets'):\n"
        "    sys.modules[m] = None\n"
        "import pipeline.cache.format.codecs as c\n"
        "import torch\n"
        "c.decode_rows(*c.encode_rows(torch.ones(2, 3), 'int8'), 'int8')\n"
        "c.group_basis(c.fit_basis(torch.randn(8, 1, 2, 4), 2), 1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
