"""Exact rank-1 refits (block solvers "direct" and "gram"): pinned to torch.linalg.svd, to a brute-force non-negative
solve, and to naive sequential / Jacobi K-SVD sweeps written here independently of the library."""

import logging
import math

import pytest
import torch

from pipeline.core.atom_update import objective, support_blocks, update_atoms
from pipeline.core.coders import encode
from pipeline.core.codes import Codes
from pipeline.core.rank1 import refit_block
from pipeline.core.synthetic import planted_problem


def _unit_rows(A):
    return A / A.norm(dim=-1, keepdim=True)


def _spectrum_matrix(m, d, sigmas, gen):
    """(m, d) matrix with the given leading singular values (the rest 0)."""
    U = torch.linalg.qr(torch.randn(m, len(sigmas), generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, len(sigmas), generator=gen, dtype=torch.float64))[0]
    return (U * torch.tensor(sigmas, dtype=torch.float64)) @ V.T


def _pad(blocks):
    """(B, P, d) zero-padded block from a list of (m_b, d) matrices."""
    P = max(b.shape[0] for b in blocks)
    out = torch.zeros(len(blocks), P, blocks[0].shape[1], dtype=blocks[0].dtype)
    for i, b in enumerate(blocks):
        out[i, : b.shape[0]] = b
    return out


def _top_singular_vector(E):
    return torch.linalg.svd(E.double(), full_matrices=False).Vh[0]


@pytest.mark.parametrize("method", ["direct", "gram"])
@pytest.mark.parametrize("shape", ["light", "heavy"])
def test_signed_refits_equal_the_svd_even_with_a_small_spectral_gap(shape, method):
    gen = torch.Generator().manual_seed(0)
    d = 24
    sizes = [5, 17, 9, 20] if shape == "light" else [40, 33, 57, 30]
    mats = []
    for i, m in enumerate(sizes):
        if i == 0:  # planted: σ₂/σ₁ = 0.97, the case a capped power iteration stops far from
            E = _spectrum_matrix(m, d, [10.0, 9.7, 3.0, 1.0], gen) + 1e-3 * torch.randn(
                m, d, generator=gen, dtype=torch.float64
            )
        else:
            E = torch.randn(m, d, generator=gen, dtype=torch.float64)
        mats.append(E.float())
    E = _pad(mats)
    d_old = _unit_rows(torch.randn(len(sizes), d, generator=gen))  # a cold start: far from the answer
    fit = refit_block(E.clone(), d_old, nonnegative=False, tol=1e-6, max_steps=100, method=method)
    for b, (Eb, m) in enumerate(zip(mats, sizes)):
        v = _top_singular_vector(Eb)
        cos = float(torch.dot(fit.atoms[b].double(), v).abs())
        assert cos >= 1 - 1e-6, (b, 1 - cos)
        torch.testing.assert_close(fit.coefs[b, :m], Eb @ fit.atoms[b], atol=1e-4, rtol=1e-4)
        assert bool((fit.coefs[b, m:] == 0).all())  # padding rows get no coefficient
    torch.testing.assert_close(fit.atoms.norm(dim=1), torch.ones(len(sizes)))


@pytest.mark.parametrize("method", ["direct", "gram"])
def test_a_signed_refit_that_hits_the_cap_is_finished_exactly_and_counted(method):
    gen = torch.Generator().manual_seed(1)
    E = _spectrum_matrix(12, 16, [5.0, 4.95, 1.0], gen).float()[None]
    d_old = _unit_rows(torch.randn(1, 16, generator=gen))
    fit = refit_block(E.clone(), d_old, nonnegative=False, tol=1e-6, max_steps=3, method=method)
    # "direct" hands it to Lanczos (here exact: rank 3, an invariant Krylov space in 3 steps), "gram" to eigh
    assert fit.eigensolved + fit.lanczos == 1 and fit.steps <= 3
    assert (fit.lanczos == 1) == (method == "direct")
    assert float(torch.dot(fit.atoms[0].double(), _top_singular_vector(E[0])).abs()) >= 1 - 1e-6


@pytest.mark.parametrize("method", ["direct", "gram"])
def test_uncertifiable_refits_go_to_the_eigensolver_early(method):
    """Nearly isotropic restricted errors (what random atoms leave): the top eigenvalue holds too little of the
    energy for the certificate's bound, so no number of power steps can certify; the refits are handed to the
    eigensolver after a few steps instead of at the cap, and are exact."""
    gen = torch.Generator().manual_seed(2)
    mats = [torch.randn(m, 48, generator=gen, dtype=torch.float64).float() for m in (30, 41, 36)]
    E = _pad(mats)
    d_old = _unit_rows(torch.randn(3, 48, generator=gen))
    fit = refit_block(E.clone(), d_old, nonnegative=False, tol=1e-6, max_steps=100, method=method)
    assert fit.eigensolved + fit.lanczos == 3 and fit.steps <= 10, (fit.steps, fit.eigensolved, fit.lanczos)
    for b, Eb in enumerate(mats):
        assert float(torch.dot(fit.atoms[b].double(), _top_singular_vector(Eb)).abs()) >= 1 - 1e-6


def _fibonacci_sphere(n):
    i = torch.arange(n, dtype=torch.float64) + 0.5
    phi = torch.acos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    return torch.stack([torch.cos(theta) * torch.sin(phi), torch.sin(theta) * torch.sin(phi), torch.cos(phi)], 1)


@pytest.mark.parametrize("method", ["direct", "gram"])
@pytest.mark.parametrize("m", [7, 40])
def test_nonnegative_heavy_refit_matches_a_brute_force_search(m, method):
    """max over unit d of ‖max(E d, 0)‖², searched over 400k directions of the 3-sphere, started near it."""
    gen = torch.Generator().manual_seed(m)
    E = torch.randn(m, 3, generator=gen, dtype=torch.float64) + torch.tensor([0.8, 0.0, 0.0], dtype=torch.float64)
    grid = _fibonacci_sphere(400_000)
    values = (grid @ E.T).clamp(min=0).pow(2).sum(1)
    best = int(values.argmax())
    start = _unit_rows(grid[best] + 0.05 * torch.randn(3, generator=gen, dtype=torch.float64))
    fit = refit_block(E.float()[None], start.float()[None], nonnegative=True, tol=1e-9, max_steps=500, method=method)
    got = float((E @ fit.atoms[0].double()).clamp(min=0).pow(2).sum())
    assert got >= float(values[best]) * (1 - 1e-5)
    assert float(torch.dot(fit.atoms[0].double(), grid[best])) > 1 - 1e-4
    assert fit.capped == 0


@pytest.mark.parametrize("method", ["direct", "gram"])
def test_nonnegative_light_refit_matches_a_brute_force_search(method):
    """The light path (m <= d): E is 3 × 5 with rank 3, so the search runs over the 3-sphere of its row space."""
    gen = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(5, 3, generator=gen, dtype=torch.float64))[0]  # (5, 3) orthonormal
    C = torch.randn(3, 3, generator=gen, dtype=torch.float64) + 0.7
    E = C @ basis.T  # (3, 5); any best atom lies in span(basis)
    grid = _fibonacci_sphere(400_000) @ basis.T
    values = (grid @ E.T).clamp(min=0).pow(2).sum(1)
    best = int(values.argmax())
    start = _unit_rows(grid[best] + 0.05 * (torch.randn(3, generator=gen, dtype=torch.float64) @ basis.T))
    fit = refit_block(E.float()[None], start.float()[None], nonnegative=True, tol=1e-9, max_steps=500, method=method)
    got = float((E @ fit.atoms[0].double()).clamp(min=0).pow(2).sum())
    assert got >= float(values[best]) * (1 - 1e-5)


@pytest.mark.parametrize("method", ["direct", "gram"])
@pytest.mark.parametrize("shape", [(6, 10), (30, 10)])
def test_nonnegative_refits_never_increase_the_objective(shape, method):
    m, d = shape
    gen = torch.Generator().manual_seed(2)
    for trial in range(20):
        E = torch.randn(1, m, d, generator=gen) + 0.3
        d_old = _unit_rows(torch.randn(1, d, generator=gen))
        x_old = (E[0] @ d_old[0]).clamp(min=0) * torch.rand(m, generator=gen)  # any non-negative start
        before = float((E[0] - x_old[:, None] * d_old[0]).pow(2).sum())
        fit = refit_block(E, d_old, nonnegative=True, tol=1e-6, max_steps=100, method=method)
        after = float((E[0] - fit.coefs[0][:, None] * fit.atoms[0]).pow(2).sum())
        assert after <= before * (1 + 1e-6) + 1e-6, trial
        assert float(fit.coefs.min()) >= 0


def test_nonnegative_cap_is_counted_and_logged_by_the_learner(caplog):
    p = planted_problem(nonnegative=True, seed=4)
    from pipeline import learn_dictionary

    with caplog.at_level(logging.WARNING, logger="pipeline.core.learner"):
        D = learn_dictionary(p.Y, 50, 3, max_iters=2, tol=None, rank1_max_iters=1, progress=False)
    assert any(h["rank1_capped"] > 0 for h in D.history)
    assert "rank1_max_iters=1" in caplog.text
    D = learn_dictionary(p.Y, 50, 3, max_iters=2, tol=None, progress=False)
    assert all(h["rank1_capped"] == 0 for h in D.history)


# ------------------------------------------------------------------------------------------------------------
# whole sweeps against naive K-SVD written here
# ------------------------------------------------------------------------------------------------------------


def _problem(seed=0, K=30, d=12, n=400, k=3):
    gen = torch.Generator().manual_seed(seed)
    D = _unit_rows(torch.randn(K, d, generator=gen))
    Y = torch.randn(n, d, generator=gen)
    codes = encode(Y, D, k, nonnegative=False)
    return Y, D, codes


def _shuffled_used_atoms(codes, K, seed):
    """The order update_atoms visits atoms in: a permutation (from ``seed``) of the used atom ids, ascending."""
    used = torch.zeros(K, dtype=torch.bool)
    used[codes.indices[codes.values != 0]] = True
    ids = used.nonzero().squeeze(1)
    return ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))].tolist()


def _naive_refit(Y, D, X, j):
    """Sequential K-SVD's step for atom j on dense codes X (n, K): SVD of its restricted error."""
    omega = (X[:, j] != 0).nonzero().squeeze(1)
    E = Y[omega] - X[omega] @ D + X[omega, j][:, None] * D[j]
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    atom = Vh[0] * (1.0 if float(torch.dot(Vh[0], D[j])) >= 0 else -1.0)
    return omega, atom, E @ atom


@pytest.mark.parametrize("solver,kernel", [("direct", "numba"), ("direct", "torch"), ("gram", "auto")])
def test_atom_batch_one_equals_naive_sequential_ksvd(solver, kernel):
    Y, D, codes = _problem()
    K = D.shape[0]
    order = _shuffled_used_atoms(codes, K, seed=7)
    Dn, Xn = D.double().clone(), codes.to_dense(K).double()
    for j in order:  # Gauss-Seidel: each atom sees every earlier refit
        omega, atom, x = _naive_refit(Y.double(), Dn, Xn, j)
        Dn[j], Xn[omega, j] = atom, x
    Dg, R = D.clone(), Y - codes.decode(D)
    update_atoms(
        R,
        Dg,
        codes,
        1,
        nonnegative=False,
        tol=1e-12,
        solver=solver,
        kernel=kernel,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(Dg.double(), Dn, atol=2e-4, rtol=0)
    torch.testing.assert_close(codes.to_dense(K).double(), Xn, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(R, Y - codes.decode(Dg), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("solver,kernel", [("direct", "numba"), ("direct", "torch"), ("gram", "auto")])
def test_one_atom_batch_is_a_jacobi_sweep(solver, kernel):
    Y, D, codes = _problem(seed=1)
    K = D.shape[0]
    D0, X0 = D.double().clone(), codes.to_dense(K).double()
    Dn, Xn = D0.clone(), X0.clone()
    for j in _shuffled_used_atoms(codes, K, seed=3):  # Jacobi: every atom refitted against the same R
        omega, atom, x = _naive_refit(Y.double(), D0, X0, j)
        Dn[j], Xn[omega, j] = atom, x
    Dg, R = D.clone(), Y - codes.decode(D)
    update_atoms(
        R,
        Dg,
        codes,
        K,
        nonnegative=False,
        tol=1e-12,
        solver=solver,
        kernel=kernel,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(Dg.double(), Dn, atol=2e-4, rtol=0)
    torch.testing.assert_close(codes.to_dense(K).double(), Xn, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("nonnegative", [True, False])
def test_block_solvers_are_at_least_as_good_as_the_alternating_one(nonnegative):
    p = planted_problem(nonnegative=nonnegative, seed=3)
    gen = torch.Generator().manual_seed(0)
    D0 = _unit_rows(torch.randn(50, 20, generator=gen))
    results = {}
    for solver in ("direct", "gram", "alternating"):
        D = D0.clone()
        codes = encode(p.Y, D, 3, nonnegative=nonnegative)
        R = p.Y - codes.decode(D)
        stats = update_atoms(
            R,
            D,
            codes,
            5,
            nonnegative=nonnegative,
            solver=solver,
            tol=1e-6,
            max_iters=100,
            generator=torch.Generator().manual_seed(1),
        )
        results[solver] = objective(p.Y, D, codes)
        torch.testing.assert_close(R, p.Y - codes.decode(D), atol=1e-4, rtol=1e-4)
        assert stats.capped == 0
    assert results["direct"] <= results["alternating"] * (1 + 1e-4)
    assert results["gram"] <= results["alternating"] * (1 + 1e-4)


@pytest.mark.parametrize("solver", ["direct", "gram"])
def test_heavy_and_light_atoms_in_one_batch(solver):
    """Atoms used by more samples than d (refitted through d × d Grams) beside light ones, non-negative and
    signed: the sweep keeps the residual exact and never raises the objective (batch size 1)."""
    gen = torch.Generator().manual_seed(9)
    d, K, n = 8, 60, 600
    D = _unit_rows(torch.randn(K, d, generator=gen).abs())
    Y = torch.randn(n, d, generator=gen).abs()
    for nonnegative in (True, False):
        codes = encode(Y, D, 2, nonnegative=nonnegative)
        counts = torch.bincount(codes.indices[codes.values != 0], minlength=K)
        assert int(counts.max()) > d and int(counts[counts > 0].min()) <= d
        Dg, R = D.clone(), Y - codes.decode(D)
        before = objective(Y, Dg, codes)
        update_atoms(
            R, Dg, codes, 1, nonnegative=nonnegative, solver=solver, generator=torch.Generator().manual_seed(0)
        )
        assert objective(Y, Dg, codes) <= before * (1 + 1e-6)
        torch.testing.assert_close(R, Y - codes.decode(Dg), atol=1e-4, rtol=1e-4)


def test_support_blocks_cover_every_atom_once_and_keep_heavy_atoms_apart():
    counts = [3, 400, 90, 12, 700, 88, 5, 1000, 300, 64]
    blocks = support_blocks(counts, d=500, budget=10**9, method="gram")
    flat = sorted(i for b in blocks for i in b)
    assert flat == list(range(len(counts)))
    for b in blocks:
        assert len({counts[i] > 500 for i in b}) == 1  # light and heavy never share a block
    assert len([b for b in blocks if counts[b[0]] <= 500]) <= 3
    for method in ("direct", "gram"):
        small = support_blocks(counts, d=500, budget=500 * 1000, method=method)  # <= 1000 padded rows each
        for b in small:
            assert len(b) * max(counts[i] for i in b) <= 1000
        assert sorted(i for b in small for i in b) == flat
    direct = support_blocks(counts, d=500, budget=10**9, method="direct")
    assert sorted(i for b in direct for i in b) == flat and len(direct) <= 3


def test_codes_type_is_unchanged():
    Y, D, codes = _problem()
    update_atoms(Y - codes.decode(D), D, codes, 4, nonnegative=False)
    assert isinstance(codes, Codes) and codes.values.dtype == torch.float32
