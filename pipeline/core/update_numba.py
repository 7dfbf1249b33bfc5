"""A whole atom-update sweep as one compiled call per thread (numba); used through
:mod:`pipeline.core.update_kernel` (``kernel`` of :func:`pipeline.core.atom_update.update_atoms`), on CPU, in
single-process updates. Each atom's refit reads its rows of the residual in place
(:mod:`pipeline.core.refit_numba`: non-negative alternating minimisation, signed Lanczos).

The threads stay inside :func:`sweep` for all the atom batches and meet at spin barriers
(:mod:`pipeline.core.spin`) between a batch's refits and its residual corrections: no Python between batches.
"""

from __future__ import annotations

import numba
import numpy as np

from pipeline.core.refit_numba import refit_nonnegative, refit_signed
from pipeline.core.spin import barrier, fetch_add


@numba.njit(nogil=True, cache=True, fastmath=True)
def _correct(R, d_old, d_new, rows, x_old, x_new, row_lo, row_hi):
    """One refitted atom's residual correction, ``R[row] += x_old d_old − x_new d_new``, for its entries whose
    sample row is in ``row_lo:row_hi``."""
    d = R.shape[1]
    for e in range(rows.shape[0]):
        if rows[e] < row_lo or rows[e] >= row_hi:
            continue
        row = R[rows[e]]
        a, c = x_old[e], x_new[e]
        for i in range(d):
            row[i] += a * d_old[i] - c * d_new[i]


@numba.njit(nogil=True, cache=True, fastmath=True)
def sweep(
    R,
    D,
    order,
    rows,
    x_old,
    starts,
    claim_order,
    batch,
    signed,
    tol,
    max_steps,
    D_new,
    x_new,
    steps_out,
    outcome_out,
    sync,
    claims,
    row_lo,
    row_hi,
    threads,
):
    """One thread's share of a whole sweep; every one of ``threads`` threads runs it at once (one Python thread
    each, the GIL released), in step through :func:`pipeline.core.spin.barrier`.

    ``R: (n, d)`` the residual, corrected in place. ``D: (K, d)`` the atoms, read only: the used ones are
    ``order`` (sweep position → atom id) and their refits go to ``D_new: (n_used, d)`` by position. Position p's
    entries are ``starts[p]:starts[p+1]`` of ``rows`` (sample rows), ``x_old`` (coefficients, read) and
    ``x_new`` (written). ``signed``: signed refits, else non-negative ones. Writes ``steps_out`` and
    ``outcome_out`` (:data:`pipeline.core.refit_numba.CONVERGED` and the others) per position.

    Atom batches are positions ``b0:b0+batch``. In each, the threads take the batch's atoms one at a time
    (``claims[batch index]`` counts the taken ones; ``claim_order`` lists each batch's positions, largest
    first) and refit them against the same residual (Jacobi); at a barrier, each thread then applies every
    refit's correction to its own rows ``row_lo:row_hi``; at a second barrier the next batch starts and sees
    them (Gauss-Seidel). ``sync``: :mod:`pipeline.core.spin`'s shared state.
    """
    d = R.shape[1]
    n_used = order.shape[0]
    max_step = np.sqrt(max(2 * tol, 0.0)) if tol >= 0 else -1.0  # 1 − cos θ <= tol ⇔ θ <= √(2 tol)
    y = np.empty(d, dtype=R.dtype)
    basis = np.empty((min(max_steps, d) + 1 if signed else 1, d), dtype=R.dtype)  # signed: the Lanczos basis
    generation = 0
    for b0 in range(0, n_used, batch):
        b1 = min(b0 + batch, n_used)
        while True:
            j = b0 + fetch_add(claims, b0 // batch, 1)
            if j >= b1:
                break
            p = claim_order[j]
            e0, e1 = starts[p], starts[p + 1]
            if signed:
                steps, outcome = refit_signed(
                    R, rows[e0:e1], x_old[e0:e1], D[order[p]], D_new[p], x_new[e0:e1], y, basis, tol, max_steps
                )
            else:
                steps, outcome = refit_nonnegative(
                    R, rows[e0:e1], x_old[e0:e1], D[order[p]], D_new[p], x_new[e0:e1], y, max_step, max_steps
                )
            steps_out[p] = steps
            outcome_out[p] = outcome
        generation = barrier(sync, threads, generation)
        if generation < 0:
            return
        for p in range(b0, b1):
            e0, e1 = starts[p], starts[p + 1]
            _correct(R, D[order[p]], D_new[p], rows[e0:e1], x_old[e0:e1], x_new[e0:e1], row_lo, row_hi)
        generation = barrier(sync, threads, generation)
        if generation < 0:
            return
