"""Batched K-SVD atom update: monotone for atom-batch size 1, exact residual bookkeeping, sums through the
data-parallel collective (two thread ranks = one process; the Gram solver's exactness is pinned in test_rank1.py)."""

import pytest
import torch

from pipeline.core.atom_update import objective, update_atoms
from pipeline.core.coders import encode
from pipeline.core.codes import Codes
from pipeline.core.collective import LOCAL, Collective
from pipeline.core.synthetic import planted_problem
from tests.core.ranks import run_ranks


@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize(
    "approximate,solver", [(False, "direct"), (False, "gram"), (False, "alternating"), (True, "alternating")]
)
def test_atom_batch_size_one_never_increases_the_objective(nonnegative, approximate, solver):
    p = planted_problem(nonnegative=nonnegative, seed=3)
    g = torch.Generator().manual_seed(0)
    D = torch.randn(50, 20, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    codes = encode(p.Y, D, 3, nonnegative=nonnegative)
    R = p.Y - codes.decode(D)
    support = codes.indices.clone(), codes.values != 0
    prev = objective(p.Y, D, codes)
    for _ in range(4):  # several sweeps on fixed supports
        update_atoms(R, D, codes, 1, nonnegative=nonnegative, approximate=approximate, solver=solver, generator=g)
        now = objective(p.Y, D, codes)
        assert now <= prev * (1 + 1e-6)
        prev = now
    torch.testing.assert_close(R, p.Y - codes.decode(D), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(D.norm(dim=1), torch.ones(50))
    assert torch.equal(codes.indices, support[0])
    assert bool(((codes.values != 0) <= support[1]).all())  # supports never grow
    if nonnegative:
        assert float(codes.values.min()) >= 0


class _CountingLocal(Collective):
    """One process, recording the shape of every sum it is asked for."""

    def __init__(self):
        self.calls = []

    def sum(self, *tensors):
        self.calls.append([tuple(t.shape) for t in tensors])
        return tensors[0] if len(tensors) == 1 else tensors


def test_every_per_atom_sum_goes_through_the_collective():
    p = planted_problem(seed=1)
    D = p.D.clone()
    codes = encode(p.Y, D, 3, nonnegative=False)
    R = p.Y - codes.decode(D)
    comm = _CountingLocal()
    stats = update_atoms(R, D, codes, 10, nonnegative=False, solver="alternating", tol=1e-4, max_iters=30, comm=comm)
    assert comm.calls[0] == [(50,)]  # the support sizes
    # then one (atoms of the batch, d) sum per alternating step of every atom batch (each batch is one chunk here)
    n_batches = -(-stats.n_used // 10)
    steps = comm.calls[1:]
    assert len(steps) == round(stats.mean_rank1_iters * n_batches)
    assert sorted({c[0] for c in steps}) == sorted({(10, 20), (stats.n_used - 10 * (n_batches - 1), 20)})


def _sweep(Y, D, k, rows, comm=LOCAL, solver="alternating", nonnegative=False):
    """Code ``Y[rows]`` with D (fixed supports), then one atom-update sweep on them: (atoms, codes, residual)."""
    D = D.clone()
    codes = encode(Y[rows], D, k, nonnegative=nonnegative)
    R = Y[rows] - codes.decode(D)
    # alternating, tol < 0: always 6 steps, so rounding cannot change where a refit stops
    opts = dict(tol=-1.0, max_iters=6) if solver == "alternating" else dict(tol=1e-6, max_iters=100)
    # kernel="torch": the single process runs the data-parallel runs' solver (the compiled one stops each atom on
    # its own estimate, so it agrees to the refit tolerance only: test_compiled_nonnegative_update_...)
    update_atoms(
        R,
        D,
        codes,
        10,
        nonnegative=nonnegative,
        solver=solver,
        generator=torch.Generator().manual_seed(0),
        comm=comm,
        kernel="torch",
        **opts,
    )
    return D, codes, R


@pytest.mark.parametrize(
    "solver,nonnegative,split",
    [
        ("alternating", False, "halves"),
        ("alternating", False, "interleaved"),
        ("direct", False, "halves"),
        ("direct", False, "interleaved"),
        ("direct", True, "halves"),
        ("alternating", True, "interleaved"),
    ],
)
def test_two_ranks_equal_one_process(solver, nonnegative, split):
    """Data parallel: two ranks each update with half the samples, summing through the collective; their atoms
    (and each rank's codes and residual) equal a single process updating with all the samples."""
    p = planted_problem(seed=1, nonnegative=nonnegative)
    D0 = torch.randn(50, 20, generator=torch.Generator().manual_seed(2))
    D0 = D0 / D0.norm(dim=1, keepdim=True)
    n = p.Y.shape[0]
    shards = (
        [torch.arange(0, n // 2), torch.arange(n // 2, n)]
        if split == "halves"
        else [torch.arange(0, n, 2), torch.arange(1, n, 2)]
    )
    single = _sweep(p.Y, D0, 3, torch.arange(n), solver=solver, nonnegative=nonnegative)
    results = run_ranks(2, lambda comm: _sweep(p.Y, D0, 3, shards[comm.rank], comm, solver, nonnegative))
    for r, rows in enumerate(shards):
        D, codes, R = results[r]
        torch.testing.assert_close(D, single[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(codes.to_dense(50), single[1].to_dense(50)[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(R, single[2][rows], atol=1e-5, rtol=1e-5)
    # control: each rank fitting its own half alone does not give that result
    for rows in shards:
        alone = _sweep(p.Y, D0, 3, rows, solver=solver, nonnegative=nonnegative)[0]
        assert float((alone - single[0]).abs().max()) > 1e-2


def test_a_rank_without_samples_of_an_atom_still_joins_its_refit():
    """Atoms used on one rank only (and a rank with no rows in some blocks) refit as in one process."""
    p = planted_problem(seed=4)
    D0 = p.D.clone()
    codes = encode(p.Y, D0, 3, nonnegative=False)
    first = codes.indices[:, 0]
    rows_a = (first < 25).nonzero().squeeze(1)  # rank 0: samples whose first atom is in the first half
    rows_b = (first >= 25).nonzero().squeeze(1)
    shards = [rows_a, rows_b]
    order = torch.cat(shards)
    single = _sweep(p.Y[order], D0, 3, torch.arange(order.numel()), solver="direct")
    results = run_ranks(2, lambda comm: _sweep(p.Y, D0, 3, shards[comm.rank], comm, "direct"))
    for D, _, _ in results:
        torch.testing.assert_close(D, single[0], atol=1e-5, rtol=1e-5)


def test_gram_solver_refuses_data_parallel_updates():
    p = planted_problem(seed=1)
    with pytest.raises(ValueError, match="solver='direct'"):
        run_ranks(2, lambda comm: _sweep(p.Y, p.D, 3, torch.arange(10), comm, "gram"))


def test_unused_atoms_are_left_alone():
    p = planted_problem(seed=2)
    D = torch.cat([p.D, torch.eye(20)[:5]])
    codes = encode(p.Y, D[:50], 3, nonnegative=False)
    R = p.Y - codes.decode(D[:50])
    before = D[50:].clone()
    stats = update_atoms(R, D, codes, 8, nonnegative=False)
    assert stats.n_used == codes.indices[codes.values != 0].unique().numel()
    assert torch.equal(D[50:], before)


def test_gpu_and_cpu_segment_sums_agree():
    """The CUDA path (atomic index-add) and the CPU path (embedding bag) compute the same E_jᵀ x."""
    from pipeline.core.atom_update import _Segments

    g = torch.Generator().manual_seed(0)
    pos = torch.sort(torch.randint(0, 20, (500,), generator=g)).values
    Rg, w = torch.randn(500, 16, generator=g), torch.randn(500, generator=g)
    seg = _Segments(pos, 20, Rg)
    bags = seg.sum_rows(Rg, w)
    seg.bags = False
    torch.testing.assert_close(bags, seg.sum_rows(Rg, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 7, 50])
def test_compiled_update_equals_the_block_solver(dtype, batch, nonnegative):
    """The compiled per-atom refits (kernel='numba') and the torch block solver reach the same refits (to the
    tolerance: each atom stops on its own test there, on its block's slowest atom here; signed, by Lanczos from
    the start there, power steps first here), with the same Gauss-Seidel order over atom batches and exact
    residual bookkeeping."""
    p = planted_problem(nonnegative=nonnegative, seed=5)
    Y = p.Y.to(dtype)
    D0 = torch.randn(50, 20, generator=torch.Generator().manual_seed(1), dtype=dtype)
    D0 = (D0.abs() if nonnegative else D0) / D0.norm(dim=1, keepdim=True)
    codes0 = encode(Y, D0, 3, nonnegative=nonnegative)
    out = {}
    for kernel in ("torch", "numba"):
        D, codes = D0.clone(), Codes(codes0.indices.clone(), codes0.values.clone())
        R = Y - codes.decode(D)
        stats = update_atoms(
            R,
            D,
            codes,
            batch,
            tol=1e-10,
            max_iters=500,
            kernel=kernel,
            nonnegative=nonnegative,
            generator=torch.Generator().manual_seed(4),
        )
        assert stats.capped == 0 and stats.n_used == codes0.indices[codes0.values != 0].unique().numel()
        torch.testing.assert_close(R, Y - codes.decode(D), atol=1e-4, rtol=1e-4)
        assert torch.equal(codes.indices, codes0.indices)
        assert float(codes.values.min()) >= 0 or not nonnegative
        out[kernel] = D, codes, objective(Y, D, codes)
    cos = (out["torch"][0] * out["numba"][0]).sum(1)
    assert float((1 - cos).max()) < (1e-4 if dtype == torch.float32 else 1e-8)
    torch.testing.assert_close(out["numba"][1].values, out["torch"][1].values, atol=1e-3, rtol=1e-3)
    assert abs(out["numba"][2] - out["torch"][2]) <= 1e-5 * out["torch"][2]
    assert out["numba"][2] < objective(Y, D0, codes0)


def _one_atom_problem(sigmas, seed=0, m=40, d=24):
    """One atom used by every sample, with coefficients such that its restricted error is exactly the data
    ``Y: (m, d)`` (fp64), whose leading singular values are ``sigmas`` (plus 1e-3 noise)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(sigmas), generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, len(sigmas), generator=g, dtype=torch.float64))[0]
    Y = (U * torch.tensor(sigmas, dtype=torch.float64)) @ V.T + 1e-3 * torch.randn(
        m, d, generator=g, dtype=torch.float64
    )
    D = torch.randn(1, d, generator=g, dtype=torch.float64)
    D = D / D.norm()
    codes = Codes(torch.zeros(m, 1, dtype=torch.long), (Y @ D[0])[:, None])
    return Y, D, codes


@pytest.mark.parametrize(
    "sigmas, max_iters, ended",
    [
        ([10.0, 9.7, 3.0, 1.0], 100, "lanczos"),  # σ₂/σ₁ = 0.97: no trace-bound certificate, Lanczos converges
        ([10.0, 1.0], 100, "certified"),  # a dominant top pair: certified by the trace bound
        ([10.0, 9.7, 9.5, 9.3, 1.0], 2, "eigensolved"),  # two Lanczos steps cannot: the dense eigensolver
    ],
)
def test_compiled_signed_refit_equals_the_svd(sigmas, max_iters, ended):
    """A compiled signed refit is the top right singular vector of the restricted error (oriented along the old
    atom) with coefficients E u, however it ended, and says how it ended."""
    Y, D, codes = _one_atom_problem(sigmas)
    R = Y - codes.decode(D)
    d_old = D[0].clone()
    stats = update_atoms(R, D, codes, 1, nonnegative=False, tol=1e-6, max_iters=max_iters, kernel="numba")
    top = torch.linalg.svd(Y, full_matrices=False).Vh[0]
    top = top if float(top @ d_old) >= 0 else -top
    assert 1 - float(D[0] @ top) <= 1e-6
    torch.testing.assert_close(codes.values[:, 0], Y @ D[0])
    torch.testing.assert_close(R, Y - codes.decode(D))
    counts = {"lanczos": stats.lanczos, "eigensolved": stats.eigensolved}
    assert counts == {key: int(key == ended) for key in counts}


def test_compiled_update_keeps_an_atom_no_sample_projects_onto():
    """An atom whose restricted error has no positive projection keeps its direction with zero coefficients,
    as the block solver does."""
    Y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    D = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    codes = Codes(torch.tensor([[2], [1]]), torch.tensor([[0.5], [1.0]]))  # atom 2 fits y0 = (1, 0) badly
    for kernel in ("torch", "numba"):
        Dk, ck = D.clone(), Codes(codes.indices.clone(), codes.values.clone())
        R = Y - ck.decode(Dk)
        update_atoms(R, Dk, ck, 1, kernel=kernel, generator=torch.Generator().manual_seed(0))
        assert torch.equal(Dk[2], D[2]) and float(ck.values[0, 0]) == 0.0, kernel
        torch.testing.assert_close(R, Y - ck.decode(Dk))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_compiled_update_threads_do_not_change_the_result(monkeypatch, threads):
    """However many threads share the sweep (taking atoms one at a time, splitting the corrections by rows),
    the atoms, the codes and the residual are the same to the bit: each refit reads the residual its batch
    started from, and each row's corrections are added in the same order. Three threads on a two-core machine
    also exercise the barrier with a thread waiting on a busy core."""
    from pipeline.core.cpu import runtime

    for nonnegative in (True, False):
        p = planted_problem(nonnegative=nonnegative, seed=7)
        D0 = torch.randn(50, 20, generator=torch.Generator().manual_seed(2)).abs()
        D0 = D0 / D0.norm(dim=1, keepdim=True)
        codes0 = encode(p.Y, D0, 3, nonnegative=nonnegative)
        out = []
        for n in (1, threads):
            monkeypatch.setattr(runtime, "threads", lambda n=n: n)
            D, codes = D0.clone(), Codes(codes0.indices.clone(), codes0.values.clone())
            R = p.Y - codes.decode(D)
            update_atoms(
                R, D, codes, 6, kernel="numba", nonnegative=nonnegative, generator=torch.Generator().manual_seed(3)
            )
            out.append((D, codes.values, R))
        for a, b in zip(*out):
            assert torch.equal(a, b), nonnegative


def test_compiled_update_refuses_what_it_does_not_do():
    p = planted_problem(seed=1)
    codes = encode(p.Y, p.D, 3, nonnegative=False)
    R = p.Y - codes.decode(p.D)
    for opts in (dict(solver="gram"), dict(solver="alternating"), dict(approximate=True)):
        with pytest.raises(ValueError, match="kernel='numba' refits atoms with the direct solver"):
            update_atoms(R, p.D.clone(), codes, 5, nonnegative=False, kernel="numba", **opts)
    with pytest.raises(ValueError, match="kernel = 'fast'"):
        update_atoms(R, p.D.clone(), codes, 5, kernel="fast")


def test_warm_up_compiles_the_fit_loops_for_both_dtypes():
    """setup.sh's warm-up leaves compiled coder and update loops for fp32 and fp64 (a first fit's clock then
    holds no compilation)."""
    from pipeline.core.cpu import mp_kernel, sweep_kernel
    from pipeline.core.warm import warm_up

    warm_up()
    for dispatcher in (mp_kernel.mp_rows, sweep_kernel.sweep):
        dtypes = {str(sig[0].dtype) for sig in dispatcher.signatures}
        assert {"float32", "float64"} <= dtypes, (dispatcher, dtypes)
