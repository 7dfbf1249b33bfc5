"""Exact rank-1 refits of restricted errors gathered into contiguous, zero-padded blocks.

A block holds B atoms' restricted errors ``E_b = R[ω_b] + x_b d_bᵀ`` as a ``(B, P, d)`` tensor, row ``p`` of
atom ``b`` being one sample of its support; rows past ``|ω_b|`` are zero, so padding changes no product. Each
refit solves, warm started from the current atom ``d_b``:

    signed:        max over unit d of ‖E d‖²            (the top singular pair; coefficients x = E d)
    non-negative:  max over unit d of ‖max(E d, 0)‖²    (coefficients x = max(E d, 0))

Two methods, both iterating from the current atom to ``tol``:

- ``"direct"``: iterate on the block itself, ``x ← E d`` (non-negative: ``max(E d, 0)``),
  ``d ← Eᵀx / ‖Eᵀx‖``: two batched matrix-vector products per step over the contiguous block (cache-resident
  per atom batch on a CPU). For signed codes this is the power iteration on ``EᵀE``; for non-negative ones the
  alternating exact minimisation, which never increases the objective.
- ``"gram"``: read the block once to form the small Gram matrix with one batched matmul (KSVD.jl's Arnoldi
  solver works on the same matrices) and iterate there: ``M = E Eᵀ`` (B, P, P) for light blocks
  (``P <= d``), whose iterate is a coefficient vector v with atom ``Eᵀv / ‖Eᵀv‖`` and step ``v ← M v``
  (non-negative: ``max(M v, 0)``, the same alternating minimisation folded into one step), costing ``P²``
  per step instead of ``P·d``; ``N = EᵀE`` (B, d, d) for heavy signed blocks; heavy non-negative blocks
  iterate directly. Forming M costs ``2 P² d`` flops per atom, so this wins when steps are many or flops
  are cheap relative to memory traffic (GPUs); on a 2-core CPU at ``P ≈ d/2`` "direct" is several times faster.

Convergence is tested on the atoms, against ``tol`` on ``1 − cos`` to the exact solution:

- signed refits are **certified**: for a unit iterate v of the Gram matrix A with Rayleigh quotient q and
  residual ``r = ‖A v − q v‖``, and an upper bound λ₂⁺ on every eigenvalue but the top one
  (``√(‖A‖_F² − q²)`` when A is formed, ``trace(A) − q = ‖E‖_F² − q`` when it is not), ``gap = q − λ₂⁺ > 0``
  gives the Davis-Kahan bound ``sin θ <= r / gap``. A refit not certified within ``max_steps`` (a small or
  unprovable gap; handed over as soon as its Rayleigh quotient, rising at its latest rate, could not make the
  gap positive before the cap) is finished by an eigensolver: with ``"direct"``, Lanczos from the current
  iterate to the same ``tol`` on its estimated angle (:mod:`pipeline.core.lanczos`), and a dense fp64
  ``torch.linalg.eigh`` of its Gram matrix for any Lanczos leaves unconverged; with ``"gram"``, the dense
  eigensolver of the Gram it formed;
- non-negative refits (a local optimum; no certificate exists) stop once the estimated distance to the fixed
  point, ``δ ρ / (1 − ρ)`` from the latest step ``δ = ‖d_{t+1} − d_t‖`` (computed without cancellation) and
  the larger of the last two step ratios ρ, is within tol; one that hits the cap keeps its last
  (objective-improving) iterate and is counted in ``capped``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.core.batched import bmv, unit_rows
from pipeline.core.collective import LOCAL, Collective
from pipeline.core.lanczos import top_right_vectors

#: Smallest step (‖d_{t+1} − d_t‖) treated as converged outright: fp32 resolves atom steps to about 1e-7.
_STEP_FLOOR = 1e-6
#: Largest number of entries of the d × d Grams a data-parallel eigensolve all-reduces at once.
_GRAM_CHUNK = 1 << 25
#: Upper bound on the estimated contraction rate (a ratio of 1 or more means "not contracting yet").
_MAX_RATE = 0.999


@dataclass
class Rank1Refit:
    """The refits of one block."""

    atoms: Tensor
    """(B, d) new unit-norm atoms."""
    coefs: Tensor
    """(B, P) new coefficients (zero on padding rows)."""
    steps: int
    """Iterations taken (the block's slowest atom)."""
    capped: int
    """Non-negative refits that stopped at ``max_steps`` before ``tol`` (signed ones are finished exactly)."""
    eigensolved: int
    """Signed refits finished by the dense eigensolver (not certified within ``max_steps``, or certain not to be,
    and, with "direct", not converged by Lanczos either)."""
    lanczos: int = 0
    """Signed refits ("direct") not certified by power steps and converged by Lanczos instead."""


def refit_block(
    E: Tensor,
    d_old: Tensor,
    *,
    nonnegative: bool,
    tol: float,
    max_steps: int,
    method: str = "direct",
    check_every: int = 1,
    comm: Collective = LOCAL,
) -> Rank1Refit:
    """Best rank-1 refits of a block of restricted errors, each warm started from its current atom.

    Args:
        E: (B, P, d) restricted errors, zero rows past each atom's support size.
        d_old: (B, d) current unit-norm atoms.
        nonnegative: keep coefficients >= 0.
        tol: convergence threshold on the estimated ``1 − cos`` between the atom and the exact solution.
        max_steps: iteration cap.
        method: ``"direct"`` (iterate on the block itself) or ``"gram"`` (form the small Gram first).
        check_every: iterations between convergence tests (each test is a host synchronisation on CUDA).
        comm: data-parallel runs: each rank holds the rows of its own samples (P is its own padded size) and
            every sum over rows is all-reduced, so every rank gets the refit of the union of the rows ("direct"
            only: the Gram method pairs samples with samples).

    Returns:
        :class:`Rank1Refit`.
    """
    B, P, d = E.shape
    if method == "direct":
        return _direct(E, d_old, nonnegative, tol, max_steps, check_every, comm)
    if method != "gram":
        raise ValueError(f"method = {method!r} is not 'direct' or 'gram'.")
    if comm.distributed:
        raise ValueError(
            "method='gram' refits from sample-by-sample Gram matrices, which a data-parallel run "
            "cannot form; use method='direct' (rank1_solver=direct)."
        )
    if P <= d:
        return _light(E, d_old, nonnegative, tol, max_steps, check_every)
    if not nonnegative:
        return _heavy_signed(E, d_old, tol, max_steps, check_every)
    return _direct(E, d_old, nonnegative, tol, max_steps, check_every)


def _second_eigenvalue_bound(fro2: Tensor, q: Tensor) -> Tensor:
    """Upper bound on every eigenvalue but the top one of a PSD matrix with ``‖A‖_F² = fro2`` whose top
    eigenvalue is at least q: ``λ₂² <= ‖A‖_F² − λ₁² <= ‖A‖_F² − q²``."""
    return (fro2 - q * q).clamp(min=0).sqrt()


class _Convergence:
    """Per-atom convergence tests (see the module docstring): a certificate for signed refits, an estimate of
    the distance to the fixed point for non-negative ones."""

    def __init__(self, B: int, tol: float, device: torch.device, dtype: torch.dtype):
        self.tol = tol
        self.max_step = max(2 * tol, 0.0) ** 0.5 if tol >= 0 else -1.0  # 1 − cos θ <= tol ⇔ θ <= √(2 tol)
        self.prev = torch.zeros(B, device=device, dtype=dtype)  # step/0 = inf: the first rate is unknown
        self.last_rate = torch.full((B,), _MAX_RATE, device=device, dtype=dtype)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.stalled = torch.zeros(B, dtype=torch.bool, device=device)
        self.prev_q: Tensor | None = None

    @property
    def settled(self) -> Tensor:
        """(B,) refits that need no further step: converged, or (signed) left to the eigensolver."""
        return self.done | self.stalled

    def certify(self, residual: Tensor, q: Tensor, below: Tensor, needed: Tensor, steps_left: int) -> None:
        """Signed: ``residual = ‖A v − q v‖`` for a unit v, Rayleigh quotient q of the symmetric PSD Gram A, and
        ``below`` an upper bound on every eigenvalue of A but the top one. With ``gap = q − below > 0``,
        ``sin θ(v, top eigenvector) <= residual / gap`` (Davis-Kahan).

        ``needed`` is the q at which the gap turns positive. A refit whose q, growing at its latest rate for the
        ``steps_left`` remaining steps, would still not reach it cannot be certified before the cap (the Rayleigh
        quotient of the power iteration rises ever more slowly): it is marked ``stalled`` and goes to the
        eigensolver now instead of after the cap (nearly isotropic errors, e.g. from random atoms)."""
        gap = q - below
        sin2 = torch.where(gap > 0, (residual / gap.clamp(min=1e-30)).pow(2), torch.ones_like(q)).clamp(max=1)
        one_minus_cos = sin2 / (1 + (1 - sin2).sqrt())
        self.done = (one_minus_cos <= self.tol) | (q <= 0)
        if self.prev_q is not None:
            grew = (q - self.prev_q).clamp(min=0)
            self.stalled = self.stalled | (~self.done & (gap <= 0) & (q + steps_left * grew < needed))
        self.prev_q = q

    def update(self, step: Tensor) -> None:
        """Non-negative: ``step`` (B,) = ‖d_{t+1} − d_t‖ of the latest iteration. The contraction rate is the
        larger of the last two step ratios (so a fast first phase cannot hide a slow one), the estimated
        distance to the fixed point ``step·ρ/(1 − ρ)``."""
        rate = (step / self.prev).clamp(max=_MAX_RATE)  # NaN (0/0) only when both steps are 0: done below
        rho = torch.fmax(self.last_rate, rate)
        remaining = step * rho / (1 - rho)
        self.done = (step <= _STEP_FLOOR) | (torch.maximum(remaining, step) <= self.max_step)
        self.last_rate, self.prev = rate, step


def _light(E: Tensor, d_old: Tensor, nonnegative: bool, tol: float, max_steps: int, check_every: int) -> Rank1Refit:
    """Refits in the coefficient space through ``M = E Eᵀ`` (P <= d)."""
    M = torch.bmm(E, E.transpose(1, 2))  # (B, P, P)
    fro2 = M.pow(2).sum((1, 2))
    v = bmv(E, d_old)  # E d_old: the coefficients of the current atom
    if nonnegative:
        v = v.clamp(min=0)
    v, _ = unit_rows(v)
    w = bmv(M, v)
    q = (v * w).sum(1)  # ‖Eᵀ v‖² for unit v
    conv = _Convergence(E.shape[0], tol, E.device, E.dtype)
    steps = 0
    for steps in range(1, max_steps + 1):
        v2, _ = unit_rows(w.clamp(min=0) if nonnegative else w)
        w2 = bmv(M, v2)
        q2 = (v2 * w2).sum(1)
        if nonnegative:
            # atoms Eᵀv/√q: their difference is Eᵀz with z = v2/√q2 − v/√q, so ‖step‖² = zᵀ M z (no cancellation)
            s, s2 = q.clamp(min=1e-30).rsqrt(), q2.clamp(min=1e-30).rsqrt()
            z = v2 * s2[:, None] - v * s[:, None]
            Mz = w2 * s2[:, None] - w * s[:, None]
            step = (z * Mz).sum(1).clamp(min=0).sqrt()
            conv.update(torch.where((q > 0) & (q2 > 0), step, torch.zeros_like(step)))
        else:
            conv.certify(
                (w2 - q2[:, None] * v2).norm(dim=1),
                q2,
                _second_eigenvalue_bound(fro2, q2),
                (fro2 / 2).sqrt(),
                max_steps - steps,
            )
        v, w, q = v2, w2, q2
        if (steps % check_every == 0 or steps == max_steps) and bool(conv.settled.all()):
            break
    eigensolved = 0
    if not nonnegative:  # a refit not certified, or whose start E d_old was zero, is solved by the eigensolver
        late = ~conv.done | ((q <= 0) & (fro2 > 0))
        if bool(late.any()):
            late = late.nonzero().squeeze(1)
            v = v.index_copy(0, late, _top_eigenvectors(M.index_select(0, late), v.index_select(0, late)))
            eigensolved = int(late.numel())
    atoms, norm = unit_rows(bmv(E.transpose(1, 2), v))  # Eᵀ v
    coefs = bmv(E, atoms)
    if nonnegative:
        coefs = coefs.clamp(min=0)
    atoms, coefs = _keep_dead(atoms, coefs, norm, d_old)
    capped = int((~conv.done).sum()) if nonnegative else 0
    return Rank1Refit(atoms, coefs, steps, capped, eigensolved)


def _heavy_signed(E: Tensor, d_old: Tensor, tol: float, max_steps: int, check_every: int) -> Rank1Refit:
    """Signed refits through ``N = EᵀE`` (B, d, d): power iteration on the atom, certified as in ``_light``."""
    N = torch.bmm(E.transpose(1, 2), E)
    fro2 = N.pow(2).sum((1, 2))
    u = d_old
    Nu = bmv(N, u)
    conv = _Convergence(E.shape[0], tol, E.device, E.dtype)
    steps = 0
    for steps in range(1, max_steps + 1):
        u2, norm = unit_rows(Nu)
        u = torch.where(norm[:, None] > 0, u2, u)
        Nu = bmv(N, u)
        q = (u * Nu).sum(1)
        conv.certify(
            (Nu - q[:, None] * u).norm(dim=1),
            q,
            _second_eigenvalue_bound(fro2, q),
            (fro2 / 2).sqrt(),
            max_steps - steps,
        )
        if (steps % check_every == 0 or steps == max_steps) and bool(conv.settled.all()):
            break
    eigensolved = 0
    late = ~conv.done | (((u * Nu).sum(1) <= 0) & (fro2 > 0))
    if bool(late.any()):
        late = late.nonzero().squeeze(1)
        u = u.index_copy(0, late, _top_eigenvectors(N.index_select(0, late), u.index_select(0, late)))
        eigensolved = int(late.numel())
    coefs = bmv(E, u)
    return Rank1Refit(u, coefs, steps, 0, eigensolved)


def _direct(
    E: Tensor, d_old: Tensor, nonnegative: bool, tol: float, max_steps: int, check_every: int, comm: Collective = LOCAL
) -> Rank1Refit:
    """Refits iterating on the block itself: ``x ← E d`` (non-negative: ``max(E d, 0)``), ``d ← Eᵀx / ‖Eᵀx‖``,
    two batched matrix-vector products per step over the contiguous block. Signed refits are certified with
    the trace bound (every eigenvalue of EᵀE below the top one is at most ``‖E‖_F² − q``); the rest are
    finished by Lanczos (and, where it does not converge, the dense eigensolver).

    Data parallel, each step all-reduces ``Eᵀx`` (and, signed, ``‖x‖²``): one (B, d + 1) collective per step,
    the distributed power iteration; the trace is reduced once, and refits left to the eigensolver reduce their
    d × d Gram ``EᵀE``; Lanczos steps reduce one (B, d) product each."""
    Et = E.transpose(1, 2)
    u = d_old
    x = bmv(E, u)
    if nonnegative:
        x = x.clamp(min=0)
    conv = _Convergence(E.shape[0], tol, E.device, E.dtype)
    energy = None if nonnegative else comm.sum(torch.linalg.vector_norm(E, dim=(1, 2)).pow(2))  # trace(EᵀE)
    steps = 0
    for steps in range(1, max_steps + 1):
        y = bmv(Et, x)  # Eᵀx; for signed x = E u this is (EᵀE) u
        if nonnegative:
            y = comm.sum(y)
        else:
            y, q = comm.sum(y, x.pow(2).sum(1))  # q: Rayleigh quotient of EᵀE at the unit u
            # λ₂ <= trace − λ₁ <= trace − q: a certificate needs q > trace / 2
            conv.certify((y - q[:, None] * u).norm(dim=1), q, energy - q, energy / 2, max_steps - steps)
            if (steps % check_every == 0 or steps == max_steps) and bool(conv.settled.all()):
                break
        u2, norm = unit_rows(y)
        u2 = torch.where(norm[:, None] > 0, u2, u)
        x = bmv(E, u2)
        if nonnegative:
            x = x.clamp(min=0)
            conv.update((u2 - u).norm(dim=1))
        u = u2
        if nonnegative and (steps % check_every == 0 or steps == max_steps) and bool(conv.done.all()):
            break
    eigensolved = lanczos = 0
    if not nonnegative:
        late = ~conv.done | ((comm.sum(x.pow(2).sum(1)) <= 0) & (energy > 0))
        if bool(late.any()):
            late = late.nonzero().squeeze(1)
            E_late, u_late = E.index_select(0, late), u.index_select(0, late)
            found = top_right_vectors(E_late, u_late, tol=tol, max_steps=max_steps, comm=comm, check_every=check_every)
            vectors, dense = found.vectors, (~found.converged).nonzero().squeeze(1)
            if dense.numel():  # Lanczos did not converge within max_steps: the dense eigensolver, exact
                vectors = vectors.index_copy(
                    0, dense, _top_right_vector(E_late.index_select(0, dense), u_late.index_select(0, dense), comm)
                )
            u = u.index_copy(0, late, vectors)
            x = bmv(E, u)
            eigensolved, lanczos = int(dense.numel()), int(late.numel() - dense.numel())
    capped = int((~conv.done).sum()) if nonnegative else 0
    if nonnegative:
        u, x = _keep_dead(u, x, comm.sum(x.pow(2).sum(1)).sqrt(), d_old)
    return Rank1Refit(u, x, steps, capped, eigensolved, lanczos)


def _top_right_vector(E: Tensor, ref: Tensor, comm: Collective = LOCAL) -> Tensor:
    """(B, d) top right singular vectors of E: (B, P, d), from the smaller of its two Gram matrices (data
    parallel: the d × d one, summed over ranks), oriented to have a non-negative dot product with ``ref``."""
    B, P, d = E.shape
    if comm.distributed:  # in chunks of atoms: B d × d Grams can be GBs (d = 2304)
        step = max(1, _GRAM_CHUNK // (d * d))
        return torch.cat(
            [
                _top_eigenvectors(
                    comm.sum(torch.bmm(E[i : i + step].transpose(1, 2), E[i : i + step])), ref[i : i + step]
                )
                for i in range(0, B, step)
            ]
        )
    if P > d:
        return _top_eigenvectors(torch.bmm(E.transpose(1, 2), E), ref)
    v = _top_eigenvectors(torch.bmm(E, E.transpose(1, 2)), bmv(E, ref))
    return unit_rows(bmv(E.transpose(1, 2), v))[0]


def _top_eigenvectors(A: Tensor, ref: Tensor) -> Tensor:
    """(B, m) unit eigenvectors of the largest eigenvalues of symmetric A: (B, m, m) (solved in fp64), each
    oriented to have a non-negative dot product with ``ref``: (B, m)."""
    top = torch.linalg.eigh(A.double()).eigenvectors[..., -1].to(A.dtype)
    return torch.where((top * ref).sum(1, keepdim=True) < 0, -top, top)


def _keep_dead(atoms: Tensor, coefs: Tensor, norm: Tensor, d_old: Tensor) -> tuple[Tensor, Tensor]:
    """An atom whose refit is zero (no sample has a positive projection) keeps its direction, with zero
    coefficients: the best non-negative fit of that error is nothing."""
    dead = norm <= 0
    if bool(dead.any()):
        atoms = torch.where(dead[:, None], d_old, atoms)
        coefs = torch.where(dead[:, None], torch.zeros_like(coefs), coefs)
    return atoms, coefs
