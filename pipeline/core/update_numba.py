"""A whole non-negative atom-update sweep as one compiled call per thread (numba); used through
:mod:`pipeline.core.update_kernel` (``kernel`` of :func:`pipeline.core.atom_update.update_atoms`), on CPU, in
single-process updates.

Each atom's refit is the "direct" alternating minimisation of :mod:`pipeline.core.rank1` run on its own:
``x ← max(E u, 0)``, ``u ← Eᵀx / ‖Eᵀx‖`` with the restricted error ``E = R[ω] + x_old d_oldᵀ`` read row by
row from the residual (never gathered: ``E_r · u = R_r · u + x_old,r (d_old · u)`` and
``Eᵀx = Σ x_r R_r + (Σ x_r x_old,r) d_old``), the atom's rows staying in the core's cache between steps. It
stops on the same estimate as the block solver (:class:`pipeline.core.rank1._Convergence`, ``update``), per
atom rather than per block. ``fastmath`` lets the dot products vectorise (their sums are reassociated).

The threads stay inside :func:`sweep` for all the atom batches and meet at spin barriers
(:mod:`pipeline.core.spin`) between a batch's refits and its residual corrections: no Python between batches.
"""

from __future__ import annotations

import numba
import numpy as np

from pipeline.core.spin import barrier, fetch_add

#: Smallest step treated as converged outright (rank1._STEP_FLOOR).
STEP_FLOOR = 1e-6
#: Upper bound on the estimated contraction rate (rank1._MAX_RATE).
MAX_RATE = 0.999


@numba.njit(nogil=True, cache=True, fastmath=True)
def _dot(a, b):
    """``a · b``, accumulated in the arrays' dtype."""
    s = a[0] - a[0]
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@numba.njit(nogil=True, cache=True, fastmath=True)
def _pass(R, rows, x_old, d_old, u, x, y):
    """One pass over the atom's rows: ``x = max(E u, 0)`` and, from the same rows while they are in cache,
    ``y = Eᵀx = Σ x_r R_r + (Σ x_r x_old,r) d_old``; returns ``Σ x²``."""
    ov = _dot(d_old, u)
    d = y.shape[0]
    y[:] = 0
    w = 0.0
    total = 0.0
    for r in range(rows.shape[0]):
        row = R[rows[r]]
        v = _dot(row, u) + x_old[r] * ov
        v = v if v > 0 else v - v
        x[r] = v
        if v != 0:
            total += v * v
            w += v * x_old[r]
            for i in range(d):
                y[i] += v * row[i]
    for i in range(d):
        y[i] += w * d_old[i]
    return total


@numba.njit(nogil=True, cache=True, fastmath=True)
def _refit(R, rows, x_old, d_old, u, x, y, max_step, max_steps):
    """Refit one atom: its entries' sample ``rows`` of ``R: (n, d)`` and coefficients ``x_old``, its old direction
    ``d_old: (d,)``. Writes the new direction into ``u: (d,)`` and the new coefficients into ``x`` (per entry);
    ``y: (d,)`` is scratch. Each step is one pass over the rows: the coefficients of the current direction and
    the next direction ``Eᵀx`` are computed together. Returns (steps, converged before ``max_steps``)."""
    d = R.shape[1]
    u[:] = d_old
    energy = _pass(R, rows, x_old, d_old, u, x, y)
    prev = 0.0
    last_rate = MAX_RATE
    done = False
    steps = 0
    for steps in range(1, max_steps + 1):
        norm = np.sqrt(_dot(y, y))
        step2 = 0.0
        if norm > 0:
            for i in range(d):
                v = y[i] / norm
                step2 += (v - u[i]) ** 2
                u[i] = v
        step = np.sqrt(step2)
        energy = _pass(R, rows, x_old, d_old, u, x, y)
        # the block solver's estimate of the distance to the fixed point (rank1._Convergence.update)
        # (written without inf or NaN, which fastmath may not honour: prev is 0 only at the first step, where
        # the block solver's step/0 = inf is clamped to MAX_RATE; a zero step is converged outright)
        rate = min(step / prev, MAX_RATE) if prev > 0 else MAX_RATE
        rho = max(last_rate, rate)
        remaining = step * rho / (1 - rho)
        done = step <= STEP_FLOOR or max(remaining, step) <= max_step
        last_rate, prev = rate, step
        if done:
            break
    if energy <= 0:  # no sample has a positive projection: keep the direction, zero coefficients
        u[:] = d_old
        x[:] = 0
    return steps, done


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
def sweep(R, D, order, rows, x_old, starts, claim_order, batch, tol, max_steps, D_new, x_new, steps_out,
          capped_out, sync, claims, row_lo, row_hi, threads):
    """One thread's share of a whole sweep; every one of ``threads`` threads runs it at once (one Python thread
    each, the GIL released), in step through :func:`pipeline.core.spin.barrier`.

    ``R: (n, d)`` the residual, corrected in place. ``D: (K, d)`` the atoms, read only: the used ones are
    ``order`` (sweep position → atom id) and their refits go to ``D_new: (n_used, d)`` by position. Position p's
    entries are ``starts[p]:starts[p+1]`` of ``rows`` (sample rows), ``x_old`` (coefficients, read) and
    ``x_new`` (written). Writes ``steps_out`` and ``capped_out`` (1 where the cap came before ``tol``) per position.

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
    generation = 0
    for b0 in range(0, n_used, batch):
        b1 = min(b0 + batch, n_used)
        while True:
            j = b0 + fetch_add(claims, b0 // batch, 1)
            if j >= b1:
                break
            p = claim_order[j]
            e0, e1 = starts[p], starts[p + 1]
            steps, done = _refit(R, rows[e0:e1], x_old[e0:e1], D[order[p]], D_new[p], x_new[e0:e1], y, max_step,
                                 max_steps)
            steps_out[p] = steps
            capped_out[p] = 0 if done else 1
        generation = barrier(sync, threads, generation)
        if generation < 0:
            return
        for p in range(b0, b1):
            e0, e1 = starts[p], starts[p + 1]
            _correct(R, D[order[p]], D_new[p], rows[e0:e1], x_old[e0:e1], x_new[e0:e1], row_lo, row_hi)
        generation = barrier(sync, threads, generation)
        if generation < 0:
            return
