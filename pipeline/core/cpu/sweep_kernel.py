"""The atom-update sweep on CPU, compiled (numba): every function the sweep calls lives in this one file, so that
numba's own cache check (the stamp of the file that defines the function it loads) sees a change to any of them.
Its driver is :mod:`pipeline.core.cpu.update_driver`. One module for that reason, in three parts, each
the job of a section below.

**Synchronisation** (:func:`fetch_add`, :func:`load`, :func:`barrier`). The sweep's Python threads each run one
long ``nogil`` call and meet at spin barriers: a barrier costs well under a microsecond when every thread has its
own core, against ~a millisecond for a round of a thread pool from Python, and numba's own ``prange`` measured
slower on the whole sweep (BENCHMARKS.md (e)). Callers start at most as many threads as the process has cores
and CPU quota (:func:`pipeline.core.cpu.runtime.threads`), since a spinning thread holds its core. A waiter spins
:data:`SPIN_ROUNDS` rounds, then yields its core (``sched_yield``) at every further round: when the thread it waits
for is off its core (more threads than cores, another process, a quota), that thread gets the core at once
instead of after the scheduler's time slice; with a core each, ``sched_yield`` returns at once. The atomics are
sequentially consistent read-modify-writes, so every plain write made before a barrier is seen by every thread
after it. ``sync``, the shared state, is an int64 array of :data:`SYNC_SLOTS` zeros, ``[arrived, generation,
abort, yields]``; a thread that sees ``abort`` set (the driver sets it when another thread failed before reaching
a barrier) leaves the barrier returning -1 instead of waiting forever; ``yields`` counts the rounds that yielded.

**Refits** (:func:`refit_nonnegative`, :func:`refit_signed`): one atom's exact rank-1 refit, reading its rows of
the residual in place. The restricted error ``E = R[ω] + x_old d_oldᵀ`` is never gathered:
``E_r · u = R_r · u + x_old,r (d_old · u)`` and ``Eᵀx = Σ x_r R_r + (Σ x_r x_old,r) d_old``, one pass over the
atom's rows (which stay in the core's cache between passes) giving both. ``fastmath`` lets the dot products
vectorise (their sums are reassociated).

- Non-negative: the "direct" alternating minimisation of :mod:`pipeline.core.rank1`, ``x ← max(E u, 0)``,
  ``u ← Eᵀx / ‖Eᵀx‖``, stopped on the block solver's estimate of the distance to the fixed point
  (:class:`pipeline.core.rank1._Convergence`, ``update``), per atom.
- Signed: Lanczos on ``EᵀE`` from the current atom, fully re-orthogonalised, as :mod:`pipeline.core.lanczos`
  (its Ritz-estimate stop), plus the block solver's certificate (Davis-Kahan with the trace bound
  ``λ₂ <= ‖E‖_F² − θ₁``), tested at every step on the top Ritz pair; a refit neither certified nor converged
  within ``min(max_steps, d)`` steps is solved densely (``eigh`` of the smaller Gram, fp64).

**The sweep** (:func:`sweep`): one call per thread for all the atom batches, the threads meeting at barriers
between a batch's refits and its residual corrections: no Python between batches.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# ---------------------------------------------------------------------------------------------- synchronisation
#: Length of the ``sync`` array: arrivals at the current barrier, barriers passed, abort flag, yielded rounds.
SYNC_SLOTS = 4
_ARRIVED, _GENERATION = 0, 1
#: Index of the abort flag in ``sync``.
ABORT = 2
#: Index of the count of waiting rounds that yielded the core (all barriers of the run).
YIELDS = 3
#: Rounds a waiter spins before it yields its core at every further round: ~10-100 µs of spinning, far longer
#: than a barrier takes when every thread has its own core.
SPIN_ROUNDS = 2000
#: libc's ``sched_yield()``: the calling thread goes to the back of its core's run queue (returns 0).
sched_yield = types.ExternalFunction("sched_yield", types.int32())


@intrinsic
def fetch_add(typingctx, array, index, value):
    """``old = array[index]; array[index] += value; return old`` as one atomic step (int64, C-contiguous 1-d)."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64 and array.ndim == 1):
        return None
    sig = types.int64(array, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        index_value = context.cast(builder, args[1], signature.args[1], types.intp)
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [index_value])
        return builder.atomic_rmw("add", pointer, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def load(typingctx, array, index):
    """``array[index]`` read atomically (int64, 1-d): a spinning thread sees other threads' writes."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64 and array.ndim == 1):
        return None
    sig = types.int64(array, types.intp)

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        index_value = context.cast(builder, args[1], signature.args[1], types.intp)
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [index_value])
        return builder.load_atomic(pointer, "seq_cst", 8)

    return sig, codegen


@numba.njit(nogil=True, cache=True)
def barrier(sync, threads, generation):
    """Wait until all ``threads`` threads have called this for barrier number ``generation`` (0, 1, 2, … in
    every thread); returns the next generation, or -1 when the run was aborted. Spins :data:`SPIN_ROUNDS` rounds,
    then yields the core at every round (counted in ``sync[YIELDS]``)."""
    if fetch_add(sync, _ARRIVED, 1) == threads - 1:  # the last to arrive resets the count and releases the rest
        fetch_add(sync, _ARRIVED, -threads)
        fetch_add(sync, _GENERATION, 1)
        return generation + 1
    rounds = 0
    while load(sync, _GENERATION) == generation:
        if load(sync, ABORT) != 0:
            return -1
        if rounds < SPIN_ROUNDS:
            rounds += 1
        else:
            fetch_add(sync, YIELDS, 1)
            sched_yield()
    return generation + 1


# ---------------------------------------------------------------------------------------------- refits
#: Smallest step treated as converged outright (rank1._STEP_FLOOR).
STEP_FLOOR = 1e-6
#: Upper bound on the estimated contraction rate (rank1._MAX_RATE).
MAX_RATE = 0.999
#: β below this fraction of θ₁ means the Krylov space is invariant: the Ritz pair is exact (lanczos._INVARIANT).
INVARIANT = 1e-6
#: How a refit ended (per atom): converged (non-negative: estimate within tol; signed: certified), stopped at the
#: cap (non-negative), stopped on the Lanczos estimate (signed, not certified), solved densely (signed).
CONVERGED, CAPPED, LANCZOS, DENSE = 0, 1, 2, 3


@numba.njit(nogil=True, cache=True, fastmath=True)
def _dot(a, b):
    """``a · b``, accumulated in the arrays' dtype."""
    s = a[0] - a[0]
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@numba.njit(nogil=True, cache=True, fastmath=True)
def _pass(R, rows, x_old, d_old, u, x, y, clamp):
    """One pass over the atom's rows: ``x = E u`` (``max(E u, 0)`` with ``clamp``) and, from the same rows while
    they are in cache, ``y = Eᵀx = Σ x_r R_r + (Σ x_r x_old,r) d_old``; returns ``Σ x²``."""
    ov = _dot(d_old, u)
    d = y.shape[0]
    y[:] = 0
    w = 0.0
    total = 0.0
    for r in range(rows.shape[0]):
        row = R[rows[r]]
        v = _dot(row, u) + x_old[r] * ov
        if clamp:
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
def refit_nonnegative(R, rows, x_old, d_old, u, x, y, max_step, max_steps):
    """Refit one atom with non-negative coefficients: its entries' sample ``rows`` of ``R: (n, d)`` and
    coefficients ``x_old``, its old direction ``d_old: (d,)``. Writes the new direction into ``u: (d,)`` and the
    new coefficients into ``x`` (per entry); ``y: (d,)`` is scratch; ``max_step``: the step (‖Δu‖) that ``tol``
    allows. Each step is one pass over the rows: the coefficients of the current direction and the next
    direction ``Eᵀx`` are computed together. Returns (steps, CONVERGED or CAPPED)."""
    d = R.shape[1]
    u[:] = d_old
    energy = _pass(R, rows, x_old, d_old, u, x, y, True)
    prev = 0.0
    last_rate = MAX_RATE
    done = False
    steps = 0
    for steps in range(1, max_steps + 1):  # noqa: B007 (the count is returned)
        norm = np.sqrt(_dot(y, y))
        step2 = 0.0
        if norm > 0:
            for i in range(d):
                v = y[i] / norm
                step2 += (v - u[i]) ** 2
                u[i] = v
        step = np.sqrt(step2)
        energy = _pass(R, rows, x_old, d_old, u, x, y, True)
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
    return steps, CONVERGED if done else CAPPED


@numba.njit(nogil=True, cache=True, fastmath=True)
def _energy(R, rows, x_old, d_old):
    """``‖E‖_F² = trace(EᵀE)``, in fp64."""
    total = 0.0
    for r in range(rows.shape[0]):
        row = R[rows[r]]
        a = x_old[r]
        for i in range(row.shape[0]):
            v = np.float64(row[i] + a * d_old[i])
            total += v * v
    return total


@numba.njit(nogil=True, cache=True)
def _one_minus_cos(residual, gap):
    """``1 − cos φ`` from ``sin φ <= residual / gap`` (1 when the gap is not positive)."""
    if gap <= 0:
        return 1.0
    sin2 = min((residual / gap) ** 2, 1.0)
    return sin2 / (1 + np.sqrt(1 - sin2))


@numba.njit(nogil=True, cache=True)
def _dense_top(R, rows, x_old, d_old, u):
    """The exact top right singular vector of E into ``u``, from the smaller of its Gram matrices (fp64
    ``eigh``), oriented along ``d_old`` (as :func:`pipeline.core.rank1._top_right_vector`)."""
    P, d = rows.shape[0], R.shape[1]
    E = np.empty((P, d))
    for r in range(P):
        for i in range(d):
            E[r, i] = R[rows[r], i] + x_old[r] * d_old[i]
    if P > d:
        top = np.linalg.eigh(E.T @ E)[1][:, d - 1]
        if _dot(top, d_old.astype(np.float64)) < 0:
            top = -top
    else:
        v = np.linalg.eigh(E @ E.T)[1][:, P - 1]
        if _dot(v, E @ d_old.astype(np.float64)) < 0:
            v = -v
        top = E.T @ v
        top /= np.sqrt(_dot(top, top))
    for i in range(d):
        u[i] = top[i]


@numba.njit(nogil=True, cache=True, fastmath=True)
def refit_signed(R, rows, x_old, d_old, u, x, w, V, tol, max_steps):
    """Refit one atom with signed coefficients: the top right singular vector of E into ``u: (d,)``, its
    coefficients ``x = E u`` into ``x``. ``w: (d,)`` and ``V: (≥ min(max_steps, d) + 1, d)`` are scratch (the
    Lanczos basis). Each Lanczos step is one pass over the rows (``EᵀE v``). Returns (steps, CONVERGED: certified
    by the trace bound, LANCZOS: stopped on the Ritz estimate, or DENSE)."""
    d = R.shape[1]
    cap = min(max_steps, d)
    energy = _energy(R, rows, x_old, d_old)
    if energy <= 0:  # E = 0: every direction fits it equally (with zero coefficients); keep the atom's
        u[:] = d_old
        x[:] = 0
        return 0, CONVERGED
    alpha = np.zeros(cap)
    beta = np.zeros(cap)
    V[0] = d_old
    outcome = DENSE
    steps = 0
    S = np.ones((1, 1))
    top = 0.0
    met_before = False
    for j in range(cap):
        steps = j + 1
        _pass(R, rows, x_old, d_old, V[j], x, w, False)  # w = EᵀE v_j
        alpha[j] = _dot(w, V[j])
        for _ in range(2):  # full re-orthogonalisation (classical Gram-Schmidt, twice)
            for i in range(j + 1):
                c = _dot(V[i], w)
                for t in range(d):
                    w[t] -= c * V[i, t]
        b = np.sqrt(np.float64(_dot(w, w)))
        beta[j] = b
        T = np.zeros((steps, steps))
        for i in range(steps):
            T[i, i] = alpha[i]
            if i + 1 < steps:
                T[i, i + 1] = beta[i]
                T[i + 1, i] = beta[i]
        theta, S = np.linalg.eigh(T)
        top = theta[j]
        r1 = b * abs(S[j, j])  # ‖EᵀE u − θ₁ u‖ of the top Ritz pair
        if _one_minus_cos(r1, top - (energy - top)) <= tol:  # λ₂ <= trace − λ₁ <= trace − θ₁: a proof
            outcome = CONVERGED
            break
        if b <= INVARIANT * top and top > 0:  # an invariant Krylov space: the Ritz pair is exact
            outcome = LANCZOS
            break
        met = j >= 1 and _one_minus_cos(r1, top - theta[j - 1] - b * abs(S[j, j - 1])) <= tol
        if met and met_before:
            outcome = LANCZOS
            break
        met_before = met
        if not (b > INVARIANT * alpha[:steps].max() and b > 0):  # nothing left to grow the space with
            outcome = LANCZOS if top > 0 else DENSE
            break
        for t in range(d):
            V[j + 1, t] = w[t] / b
    if outcome == DENSE:
        _dense_top(R, rows, x_old, d_old, u)
    else:
        u[:] = 0
        for i in range(steps):
            s = S[i, steps - 1]
            for t in range(d):
                u[t] += s * V[i, t]
        norm = np.sqrt(_dot(u, u))
        sign = -1.0 if _dot(u, d_old) < 0 else 1.0
        for t in range(d):
            u[t] = sign * u[t] / norm
    _pass(R, rows, x_old, d_old, u, x, w, False)  # the coefficients E u
    return steps, outcome


# ---------------------------------------------------------------------------------------------- the sweep
@numba.njit(nogil=True, cache=True, fastmath=True)
def correct(R, d_old, d_new, rows, x_old, x_new, row_lo, row_hi):
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
    each, the GIL released), in step through :func:`barrier`.

    ``R: (n, d)`` the residual, corrected in place. ``D: (K, d)`` the atoms, read only: the used ones are
    ``order`` (sweep position → atom id) and their refits go to ``D_new: (n_used, d)`` by position. Position p's
    entries are ``starts[p]:starts[p+1]`` of ``rows`` (sample rows), ``x_old`` (coefficients, read) and
    ``x_new`` (written). ``signed``: signed refits, else non-negative ones. Writes ``steps_out`` and
    ``outcome_out`` (:data:`CONVERGED` and the others) per position.

    Atom batches are positions ``b0:b0+batch``. In each, the threads take the batch's atoms one at a time
    (``claims[batch index]`` counts the taken ones; ``claim_order`` lists each batch's positions, largest
    first) and refit them against the same residual (Jacobi); at a barrier, each thread then applies every
    refit's correction to its own rows ``row_lo:row_hi``; at a second barrier the next batch starts and sees
    them (Gauss-Seidel). ``sync``: the barriers' shared state (module docstring).
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
            correct(R, D[order[p]], D_new[p], rows[e0:e1], x_old[e0:e1], x_new[e0:e1], row_lo, row_hi)
        generation = barrier(sync, threads, generation)
        if generation < 0:
            return
