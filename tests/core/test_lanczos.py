"""Lanczos top right singular vectors (the signed refits power steps cannot certify): equal to the SVD where it
says it converged, honest where it cannot, independent of zero padding, and the same on two ranks as on one."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.lanczos import top_right_vectors
from pipeline.core.rank1 import refit_block
from tests.core.ranks import run_ranks
from tests.core.test_rank1 import _pad, _spectrum_matrix, _top_singular_vector, _unit_rows


def _one_minus_cos(u, E):
    return 1 - float(torch.dot(u.double(), _top_singular_vector(E)).abs())


@pytest.mark.parametrize("kind", ["isotropic", "decaying"])
def test_converged_vectors_equal_the_svd(kind):
    """Nearly isotropic blocks (what random atoms leave: no certificate is possible) and decaying spectra, with
    supports on both sides of d; every block converges within the cap and matches the SVD to 1e-6."""
    gen = torch.Generator().manual_seed(0)
    d = 48
    mats = []
    for m in (30, 41, 36, 70):
        X = torch.randn(m, d, generator=gen, dtype=torch.float64)
        if kind == "decaying":
            X = X * torch.logspace(0, -1.5, d, dtype=torch.float64)
        mats.append(X.float())
    E = _pad(mats)
    start = _unit_rows(torch.randn(len(mats), d, generator=gen))
    out = top_right_vectors(E, start, tol=1e-6, max_steps=100)
    assert bool(out.converged.all()) and out.steps <= d
    for b, Eb in enumerate(mats):
        assert _one_minus_cos(out.vectors[b], Eb) <= 1e-6, b
        assert float((out.vectors[b] * start[b]).sum()) >= 0  # oriented along the start


def test_a_tiny_gap_is_not_claimed_converged_and_the_refit_falls_back_to_the_dense_eigensolver():
    gen = torch.Generator().manual_seed(3)
    E = _spectrum_matrix(60, 40, [5.0, 4.9999, 4.0, 3.0, 2.0, 1.0], gen).float()[None]
    E = E + 1e-3 * torch.randn(E.shape, generator=gen)
    start = _unit_rows(torch.randn(1, 40, generator=gen))
    out = top_right_vectors(E, start, tol=1e-6, max_steps=3)
    assert not bool(out.converged[0])
    fit = refit_block(E.clone(), start, nonnegative=False, tol=1e-6, max_steps=3, method="direct")
    assert fit.eigensolved == 1 and fit.lanczos == 0
    assert _one_minus_cos(fit.atoms[0], E[0]) <= 1e-6


def test_a_start_the_block_maps_to_zero_is_not_claimed_converged():
    E = torch.zeros(1, 6, 4)
    E[0, :, :2] = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    start = torch.tensor([[0.0, 0.0, 1.0, 0.0]])  # E start = 0: its Krylov space is {start}
    out = top_right_vectors(E, start, tol=1e-6, max_steps=10)
    assert not bool(out.converged[0])


def test_padding_rows_change_nothing():
    gen = torch.Generator().manual_seed(5)
    Eb = torch.randn(25, 32, generator=gen)
    start = _unit_rows(torch.randn(1, 32, generator=gen))
    a = top_right_vectors(Eb[None], start, tol=1e-6, max_steps=100)
    b = top_right_vectors(torch.cat([Eb, torch.zeros(15, 32)])[None], start, tol=1e-6, max_steps=100)
    assert float((a.vectors - b.vectors).abs().max()) <= 1e-5 and a.steps == b.steps


def test_two_ranks_holding_half_the_rows_each_equal_one_process():
    gen = torch.Generator().manual_seed(7)
    mats = [torch.randn(m, 40, generator=gen) for m in (50, 31)]
    E = _pad(mats)
    start = _unit_rows(torch.randn(2, 40, generator=gen))
    single = top_right_vectors(E, start, tol=1e-6, max_steps=100)
    halves = [E[:, :25], E[:, 25:]]
    results = run_ranks(2, lambda comm: top_right_vectors(halves[comm.rank], start, tol=1e-6, max_steps=100, comm=comm))
    for r in results:
        assert bool(r.converged.all()) and r.steps == single.steps
        assert float((r.vectors - single.vectors).abs().max()) <= 1e-5
