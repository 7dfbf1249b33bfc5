"""The non-negative atom update on CPU through compiled per-atom loops: the driver of
:mod:`pipeline.core.update_numba` (numba, imported lazily), called by :func:`pipeline.core.atom_update.update_atoms`.

Atom batches go in the shuffled order :func:`~pipeline.core.atom_update.update_atoms` planned; within a batch the
atoms are refitted against the same residual (Jacobi) on ``torch.get_num_threads()`` Python threads running the
compiled refit with the GIL released, then the batch's residual corrections are written and the next batch sees
them (Gauss-Seidel), exactly the order of the block solver.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from pipeline.core import compiled
from pipeline.core.codes import Codes


def update(R: Tensor, D: Tensor, codes: Codes, atom_batch_size: int, order: Tensor, nz: Tensor, rows_all: Tensor,
           starts: list[int], flat_val: Tensor, tol: float, max_iters: int):
    """One sweep over the used atoms ``order`` (their code entries ``nz`` sorted by atom, atom a's being
    ``starts[a]:starts[a+1]``, in sample rows ``rows_all``), in place on ``R: (n, d)``, ``D: (K, d)`` and
    the codes; returns :class:`~pipeline.core.atom_update.UpdateStats` (iterations: mean over atoms)."""
    from pipeline.core.atom_update import UpdateStats

    kernels = compiled.module("update_numba")
    Rc = R if R.is_contiguous() else R.contiguous()
    Rn = Rc.numpy()
    rows = rows_all.numpy()
    x = flat_val[nz].numpy()
    n_used = int(order.numel())
    steps = np.zeros(n_used, dtype=np.int64)
    capped = np.zeros(n_used, dtype=np.int64)
    starts_np = np.asarray(starts, dtype=np.int64)
    threads = max(1, torch.get_num_threads())
    cuts = np.linspace(0, len(Rn), threads + 1).astype(np.int64)
    row_parts = list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for b0 in range(0, n_used, atom_batch_size):
            b1 = min(b0 + atom_batch_size, n_used)
            ids = order[b0:b1]
            D_old = D[ids].contiguous().numpy()
            e0, e1 = starts[b0], starts[b1]
            st = starts_np[b0:b1 + 1] - e0
            xo = x[e0:e1]  # read by both kernels; overwritten with xn only after them
            xn = np.empty_like(xo)
            D_new = np.empty_like(D_old)
            args = (Rn, D_old, rows[e0:e1], xo, st)
            outs = (D_new, xn, steps[b0:b1], capped[b0:b1])
            parts = _balanced(st, threads)
            fixes = (Rn, D_old, D_new, rows[e0:e1], xo, xn, st)
            if threads == 1:
                kernels.refit_atoms(*args, 0, b1 - b0, tol, max_iters, *outs)
                kernels.apply_refits(*fixes, 0, len(Rn))
            else:  # the atoms, then the rows, shared out over the threads
                list(pool.map(lambda p: kernels.refit_atoms(*args, p[0], p[1], tol, max_iters, *outs), parts))
                list(pool.map(lambda r: kernels.apply_refits(*fixes, r[0], r[1]), row_parts))
            D[ids] = torch.from_numpy(D_new)
            x[e0:e1] = xn
    if Rc is not R:
        R.copy_(Rc)
    flat_val[nz] = torch.from_numpy(x)
    codes.values.copy_(flat_val.view_as(codes.values))
    return UpdateStats(n_used, float(steps.mean()) if n_used else 0.0, int(capped.sum()))


def _balanced(starts: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Contiguous atom ranges with about equal numbers of entries (the refits' cost), at most ``parts``."""
    B = len(starts) - 1
    if parts <= 1 or B <= 1:
        return [(0, B)]
    cuts = np.searchsorted(starts, np.linspace(0, starts[-1], parts + 1)[1:-1])
    bounds = sorted({0, B, *[int(min(max(c, 1), B - 1)) for c in cuts]})
    return list(zip(bounds[:-1], bounds[1:]))

