"""Batched K-SVD atom update: monotone for atom-batch size 1, exact residual bookkeeping, reduction hook (the
alternating solver's; the Gram solver's exactness is pinned in test_rank1.py)."""

import threading

import pytest
import torch

from pipeline.core.atom_update import objective, update_atoms
from pipeline.core.coders import encode
from pipeline.core.synthetic import planted_problem


@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("approximate,solver", [(False, "direct"), (False, "gram"), (False, "alternating"), (True, "alternating")])
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


def test_every_per_atom_sum_goes_through_reduce():
    p = planted_problem(seed=1)
    D = p.D.clone()
    codes = encode(p.Y, D, 3, nonnegative=False)
    R = p.Y - codes.decode(D)
    calls = []

    def reduce(t):
        calls.append(t.shape)
        return t

    stats = update_atoms(R, D, codes, 10, nonnegative=False, solver="alternating", tol=1e-4, max_iters=30,
                         reduce=reduce)
    # one (atoms of the batch, d) sum per alternating step of every atom batch (each batch is one chunk here)
    n_batches = -(-stats.n_used // 10)
    assert len(calls) == round(stats.mean_rank1_iters * n_batches)
    assert sorted(set(calls)) == sorted({(10, 20), (stats.n_used - 10 * (n_batches - 1), 20)})


class ThreadAllReduce:
    """An all-reduce between ``n`` threads (stand-ins for ranks): every rank gets the sum of all ranks'
    tensors, added in rank order so every rank gets the same bits."""

    def __init__(self, n: int):
        self.slots = [None] * n
        self.barrier = threading.Barrier(n, timeout=60)  # a rank that skips a call breaks it, not hangs

    def for_rank(self, rank: int):
        def reduce(t):
            self.slots[rank] = t.clone()
            self.barrier.wait()  # every rank has put its part
            total = self.slots[0].clone()
            for part in self.slots[1:]:
                total += part
            self.barrier.wait()  # every rank has read before the next call overwrites a slot
            return total
        return reduce


def _sweep(Y, D, k, rows, reduce=None):
    """Code ``Y[rows]`` with D (fixed supports), then one atom-update sweep on them: (atoms, codes, residual)."""
    D = D.clone()
    codes = encode(Y[rows], D, k, nonnegative=False)
    R = Y[rows] - codes.decode(D)
    opts = dict(nonnegative=False, solver="alternating", tol=-1.0, max_iters=6,  # tol < 0: always 6 steps, so
                generator=torch.Generator().manual_seed(0))  # rounding cannot change where a refit stops
    update_atoms(R, D, codes, 10, **opts, **({} if reduce is None else {"reduce": reduce}))
    return D, codes, R


@pytest.mark.parametrize("split", ["halves", "interleaved"])
def test_reduce_results_make_two_ranks_equal_one_process(split):
    """Data parallel: two ranks each update with half the samples and an all-reduce as ``reduce``; their atoms
    (and each rank's codes and residual) equal a single process updating with all the samples."""
    p = planted_problem(seed=1)
    D0 = torch.randn(50, 20, generator=torch.Generator().manual_seed(2))
    D0 = D0 / D0.norm(dim=1, keepdim=True)
    n = p.Y.shape[0]
    shards = [torch.arange(0, n // 2), torch.arange(n // 2, n)] if split == "halves" else \
        [torch.arange(0, n, 2), torch.arange(1, n, 2)]
    for rows in shards:  # precondition: every rank refits the same atoms, so both make the same reduce calls
        codes = encode(p.Y[rows], D0, 3, nonnegative=False)
        assert codes.indices[codes.values != 0].unique().numel() == 50
    single = _sweep(p.Y, D0, 3, torch.arange(n))

    allreduce, results, errors = ThreadAllReduce(2), [None, None], []

    def rank(r):
        try:
            results[r] = _sweep(p.Y, D0, 3, shards[r], allreduce.for_rank(r))
        except Exception as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            allreduce.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r, rows in enumerate(shards):
        D, codes, R = results[r]
        torch.testing.assert_close(D, single[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(codes.to_dense(50), single[1].to_dense(50)[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(R, single[2][rows], atol=1e-5, rtol=1e-5)
    # control: a reduce that ignores the other rank (each rank fits its own half) does not give that result
    for rows in shards:
        alone = _sweep(p.Y, D0, 3, rows)[0]
        assert float((alone - single[0]).abs().max()) > 1e-2


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
