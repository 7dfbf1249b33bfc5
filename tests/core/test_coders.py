"""Batched sparse coders: faithfulness to the reference MP, agreement with scikit-learn's OMP, invariants."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp_gram

from pipeline.core.coders import encode, gram
from pipeline.core.codes import Codes


def _problem(n=200, d=24, K=64, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(K, d, generator=g, dtype=dtype)
    D = D / D.norm(dim=1, keepdim=True)
    Y = torch.randn(n, d, generator=g, dtype=dtype)
    return Y, D


def _reference_mp(y, D, k, nonnegative, rtol, max_iter):
    """Per-sample matching pursuit written as KSVD.jl's matching_pursuit_ reads (with the <= k cap)."""
    r, x, ny = y.clone(), {}, float(y.norm())
    for _ in range(max_iter):
        if float(r.norm()) <= rtol * ny or ny == 0:
            break
        c = D @ r
        if nonnegative:
            j = int(c.argmax())
            if float(c[j]) <= 0:
                break
        else:
            j = int(c.abs().argmax())
        a = float(c[j])
        r = r - a * D[j]
        x[j] = x.get(j, 0.0) + a
        if len(x) > k:
            del x[min(x, key=lambda i: abs(x[i]))]
            break
    out = torch.zeros(D.shape[0], dtype=y.dtype)
    for j, v in x.items():
        out[j] = v
    return out


#: MP's two greedy loops: the batched tensor ops and the compiled per-sample loop (CPU).
KERNELS = ["torch", "numba"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("rtol", [0.0, 0.3])
def test_mp_equals_per_sample_reference(nonnegative, rtol, kernel):
    Y, D = _problem(n=60)
    k = 5
    codes = encode(Y, D, k, method="mp", nonnegative=nonnegative, rtol=rtol, kernel=kernel)
    X = codes.to_dense(D.shape[0])
    for i in range(Y.shape[0]):
        ref = _reference_mp(Y[i], D, k, nonnegative, rtol, 4 * k)
        torch.testing.assert_close(X[i], ref, atol=1e-9, rtol=1e-9)


def test_signed_omp_agrees_with_scikit_learn():
    Y, D = _problem(n=150, d=32, K=96)
    k = 6
    codes = encode(Y, D, k, method="omp", nonnegative=False, rtol=0.0)
    ours = codes.to_dense(D.shape[0]).numpy()
    theirs = orthogonal_mp_gram((D @ D.T).numpy(), (D @ Y.T).numpy(), n_nonzero_coefs=k).T
    np.testing.assert_allclose(ours, theirs, atol=1e-9)


@pytest.mark.parametrize("method", ["mp", "omp"])
@pytest.mark.parametrize("nonnegative", [True, False])
def test_at_most_k_atoms_and_sign(method, nonnegative):
    Y, D = _problem(dtype=torch.float32)
    for k in (1, 3, 8):
        codes = encode(Y, D, k, method=method, nonnegative=nonnegative, rtol=0.0)
        assert codes.indices.shape == (Y.shape[0], k)
        X = codes.to_dense(D.shape[0])
        assert int((X != 0).sum(dim=1).max()) <= k
        if nonnegative:
            assert float(codes.values.min()) >= 0


def test_mp_residual_energy_never_increases():
    Y, D = _problem(dtype=torch.float64)
    prev = None
    for steps in range(1, 25):
        codes = encode(Y, D, 24, method="mp", nonnegative=False, rtol=0.0, max_iter=steps)  # k = d: no drop
        err = (Y - codes.decode(D)).pow(2).sum(dim=1)
        if prev is not None:
            assert bool((err <= prev + 1e-10).all())
        prev = err


def test_rtol_stops_early():
    Y, D = _problem(dtype=torch.float64)
    full = encode(Y, D, 12, rtol=0.0, nonnegative=False)
    early = encode(Y, D, 12, rtol=0.6, nonnegative=False)
    assert float(early.l0().float().mean()) < float(full.l0().float().mean())
    rel = (Y - early.decode(D)).norm(dim=1) / Y.norm(dim=1)
    stopped_by_rtol = early.l0() < 12
    assert bool((rel[stopped_by_rtol] <= 0.6 + 1e-9).all())


@pytest.mark.parametrize("method", ["mp", "omp"])
def test_refit_is_least_squares_on_the_support(method):
    Y, D = _problem(dtype=torch.float64)
    codes = encode(Y, D, 5, method=method, nonnegative=False, rtol=0.0, refit=True)
    for i in range(20):
        sup = codes.indices[i][codes.values[i] != 0]
        ls = torch.linalg.lstsq(D[sup].T, Y[i]).solution
        torch.testing.assert_close(codes.values[i][codes.values[i] != 0], ls, atol=1e-6, rtol=1e-6)


def test_nonnegative_refit_stays_nonnegative_and_improves():
    Y, D = _problem(dtype=torch.float32)
    plain = encode(Y, D, 6, rtol=0.0)
    refit = encode(Y, D, 6, rtol=0.0, refit=True)
    assert float(refit.values.min()) >= 0
    assert float((Y - refit.decode(D)).pow(2).sum()) <= float((Y - plain.decode(D)).pow(2).sum()) * (1 + 1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_chunking_does_not_change_codes(kernel):
    Y, D = _problem(dtype=torch.float32)
    a = encode(Y, D, 6, rtol=0.0, kernel=kernel).to_dense(D.shape[0])
    b = encode(Y, D, 6, rtol=0.0, chunk_size=7, kernel=kernel).to_dense(D.shape[0])
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize(
    "reference_rules, rtol, max_iter", [(False, 0.0, None), (False, 0.3, None), (True, 0.2, None), (True, 0.0, 9)]
)
def test_compiled_mp_equals_the_torch_loop(dtype, nonnegative, reference_rules, rtol, max_iter):
    """Both loops make the same picks (ties included: duplicated and negated atoms give exactly equal |c|) and
    the same coefficients up to the rounding of a multiply-add."""
    Y, D = _problem(n=700, d=24, K=96, seed=3, dtype=dtype)
    D = torch.cat([D[:80], D[:8], -D[8:16]])  # exact ties: j and 80 + j equal, 8 + j and 88 + j opposite
    kw = dict(nonnegative=nonnegative, rtol=rtol, max_iter=max_iter, reference_rules=reference_rules)
    a = encode(Y, D, 6, kernel="torch", **kw)
    b = encode(Y, D, 6, kernel="numba", **kw)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    C = Y @ D.T  # the data must exercise the tie rules at the first pick
    top = (C if nonnegative else C.abs()).max(dim=1, keepdim=True).values
    assert int(((C if nonnegative else C.abs()) == top).sum(dim=1).gt(1).sum()) >= 20


def test_compiled_mp_threads_do_not_change_codes():
    Y, D = _problem(n=500, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = encode(Y, D, 6, kernel="numba")
        torch.set_num_threads(3)
        three = encode(Y, D, 6, kernel="numba")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.indices, three.indices) and torch.equal(one.values, three.values)


def test_kernel_choice_is_checked():
    Y, D = _problem(dtype=torch.float32)
    with pytest.raises(ValueError, match="kernel must be one of"):
        encode(Y, D, 4, kernel="fast")
    with pytest.raises(ValueError, match="candidates=32"):
        encode(Y, D, 4, kernel="numba", candidates=32)
    auto = encode(Y, D, 4, candidates=32)  # auto: the torch loop, the one with candidate lists
    assert auto.indices.shape == (Y.shape[0], 4)


def test_candidate_restriction_stays_close_to_full_mp():
    Y, D = _problem(n=300, d=32, K=512, dtype=torch.float32)
    full = encode(Y, D, 8, rtol=0.0)
    fast = encode(Y, D, 8, rtol=0.0, candidates=256)
    e_full = float((Y - full.decode(D)).norm() / Y.norm())
    e_fast = float((Y - fast.decode(D)).norm() / Y.norm())
    assert abs(e_fast - e_full) / e_full < 0.02


def test_bf16_correlations_keep_reconstruction_close():
    Y, D = _problem(n=300, d=32, K=256, dtype=torch.float32)
    e = [float((Y - encode(Y, D, 8, rtol=0.0, precision=p).decode(D)).norm() / Y.norm()) for p in ("fp32", "bf16")]
    assert abs(e[1] - e[0]) / e[0] < 0.01


def test_codes_decode_matches_dense_product():
    Y, D = _problem(dtype=torch.float32)
    codes = encode(Y, D, 4)
    torch.testing.assert_close(codes.decode(D), codes.to_dense(D.shape[0]) @ D)
    joined = Codes.cat([codes[:3], codes[3:]])
    assert isinstance(joined, Codes) and torch.equal(joined.indices, codes.indices)
    assert torch.equal(joined.values, codes.values)


def test_zero_rows_get_empty_codes():
    Y, D = _problem(dtype=torch.float32)
    Y[0] = 0
    for method in ("mp", "omp"):
        assert int(encode(Y, D, 4, method=method).l0()[0]) == 0


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda Y, D: (Y.clone().fill_(float("nan")), D, 3), "NaN or Inf"),
        (lambda Y, D: (Y[0], D, 3), "must be 2-D"),
        (lambda Y, D: (Y[:, :-1], D, 3), "d = 23"),
        (lambda Y, D: (Y, D, 0), "at least 1"),
        (lambda Y, D: (Y, D, 25), "exceeds the dimension"),
        (lambda Y, D: (Y, D[:2], 3), "smaller than k"),
        (lambda Y, D: (Y, 2 * D, 3), "not unit norm"),
    ],
)
def test_bad_input_raises_clear_errors(bad, message):
    Y, D = _problem(dtype=torch.float32)
    args = bad(Y, D)
    with pytest.raises(ValueError, match=message):
        encode(*args)


_CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)


@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize(
    "precision, atol",
    [
        ("fp32", 1e-6),  # fp32 products and sums of unit vectors: a few ulps
        # "tf32" and "bf16" build the Gram on tf32 tensor cores (gram's docstring): 10 mantissa bits, so each entry
        # is off by < 2^-10 relative (even truncated), each product by < 2^-9, and for unit atoms
        # |error| < 2^-9 · Σ|a_i b_i| <= 2^-9 (Cauchy-Schwarz)
        ("tf32", 2.0**-9),
        ("bf16", 2.0**-9),
    ],
)
def test_gram_matches_a_float64_reference(device, precision, atol):
    _, D = _problem(K=256, d=64, dtype=torch.float32)
    reference = D.double().numpy() @ D.double().numpy().T  # independent: numpy, float64
    G = gram(D.to(device), precision)
    assert G.dtype == torch.float32 and G.shape == (256, 256)
    assert torch.equal(G.diagonal().cpu(), torch.ones(256))  # set exactly: a picked atom's correlation drops to 0
    np.testing.assert_allclose(G.cpu().double().numpy(), reference, rtol=0, atol=atol)
    if precision == "fp32" or device == "cpu":  # CPU matmuls have no tf32: every precision is fp32 there
        np.testing.assert_allclose(G.cpu().double().numpy(), reference, rtol=0, atol=1e-6)
