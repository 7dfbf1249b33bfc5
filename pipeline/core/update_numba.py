"""The non-negative atom refits of one atom batch as compiled loops (numba); used through
:mod:`pipeline.core.atom_update` (``kernel``), on CPU, in single-process updates.

Each atom's refit is the "direct" alternating minimisation of :mod:`pipeline.core.rank1` run on its own:
``x ← max(E u, 0)``, ``u ← Eᵀx / ‖Eᵀx‖`` with the restricted error ``E = R[ω] + x_old d_oldᵀ`` read row by
row from the residual (never gathered: ``E_r · u = R_r · u + x_old,r (d_old · u)`` and
``Eᵀx = Σ x_r R_r + (Σ x_r x_old,r) d_old``), the atom's rows staying in the core's cache between steps. It
stops on the same estimate as the block solver (:class:`pipeline.core.rank1._Convergence`, ``update``), per
atom rather than per block. ``fastmath`` lets the dot products vectorise (their sums are reassociated).
"""

from __future__ import annotations

import numba
import numpy as np

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
def refit_atoms(R, D_old, rows, x_old, starts, lo, hi, tol, max_steps, D_new, x_new, steps_out, capped_out):
    """Refit atoms ``lo:hi`` of a batch against the residual ``R: (n, d)``.

    ``D_old: (B, d)`` the batch's atoms; atom b's entries are ``starts[b]:starts[b+1]`` of ``rows`` (sample rows)
    and ``x_old`` (coefficients). Writes ``D_new: (B, d)``, ``x_new`` (per entry), ``steps_out`` and
    ``capped_out`` (1 where the cap was hit before ``tol``) per atom. Each step is one pass over the rows: the
    coefficients of the current atom and the next atom's direction ``Eᵀx`` are computed together.
    """
    d = R.shape[1]
    max_step = np.sqrt(max(2 * tol, 0.0)) if tol >= 0 else -1.0  # 1 − cos θ <= tol ⇔ θ <= √(2 tol)
    y = np.empty(d, dtype=R.dtype)
    for b in range(lo, hi):
        e0, e1 = starts[b], starts[b + 1]
        rb, xo, xb = rows[e0:e1], x_old[e0:e1], x_new[e0:e1]
        d_old = D_old[b]
        u = D_new[b]
        u[:] = d_old
        energy = _pass(R, rb, xo, d_old, u, xb, y)
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
            energy = _pass(R, rb, xo, d_old, u, xb, y)
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
        steps_out[b] = steps
        capped_out[b] = 0 if done else 1
        if energy <= 0:  # no sample has a positive projection: keep the direction, zero coefficients
            u[:] = d_old
            xb[:] = 0


@numba.njit(nogil=True, cache=True, fastmath=True)
def apply_refits(R, D_old, D_new, rows, x_old, x_new, starts, row_lo, row_hi):
    """The residual correction of a refitted batch: ``R[row] += x_old d_old − x_new d_new`` for every entry
    whose sample row is in ``row_lo:row_hi`` (threads share the rows out)."""
    d = R.shape[1]
    for b in range(starts.shape[0] - 1):
        do, dn = D_old[b], D_new[b]
        for e in range(starts[b], starts[b + 1]):
            if rows[e] < row_lo or rows[e] >= row_hi:
                continue
            row = R[rows[e]]
            a, c = x_old[e], x_new[e]
            for i in range(d):
                row[i] += a * do[i] - c * dn[i]
