"""Top right singular vectors of a batch of blocks by Lanczos: the signed refits power steps cannot certify.

For each block ``E_b: (P, d)`` the top eigenvector of ``A_b = E_bᵀE_b`` is sought in the Krylov space of the
current atom, built with one product ``A v = Eᵀ(E v)`` per step (data parallel: that product is all-reduced,
a (B, d) collective, instead of the d × d Gram an eigensolver needs) and fully re-orthogonalised (twice, classical
Gram-Schmidt), so the small tridiagonal matrix ``T`` of the Lanczos coefficients carries the Ritz values.

Stopping rule, per block, after each step j: with the top Ritz pair (θ₁, s₁) and the next (θ₂, s₂) of ``T_j``
and the new coefficient β_j, the Ritz residuals are ``r_i = β_j |s_i[j]|`` (``‖A u_i − θ_i u_i‖``). With λ₂
estimated from above by ``θ₂ + r₂`` (θ₂ <= λ₂ always; an eigenvalue lies within r₂ of θ₂), the angle to the top
eigenvector is estimated by ``sin φ <= r₁ / (θ₁ − θ₂ − r₂)`` (Davis-Kahan with that gap) and the refit stops once
``1 − cos φ <= tol``; a step that finds an invariant subspace (β_j ≈ 0) ends it exactly. This is the standard
a-posteriori test of Lanczos eigensolvers (ARPACK, and KSVD.jl's Arnoldi stops on the residual alone), tighter
than a residual test; unlike the trace bound of :mod:`pipeline.core.rank1` it is an estimate, not a proof, since
an eigenvalue the Krylov space has not met yet could lie above θ₂ + r₂. Blocks not converged within
``max_steps`` are reported so the caller can finish them with a dense eigensolver.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.core.batched import bmv, unit_rows
from pipeline.core.collective import LOCAL, Collective

#: β below this fraction of θ₁ means the Krylov space is invariant: the Ritz pair is exact.
_INVARIANT = 1e-6


@dataclass
class LanczosResult:
    vectors: Tensor
    """(B, d) unit top right singular vectors (the top Ritz vectors), oriented along the start vectors."""
    converged: Tensor
    """(B,) bool: met the stopping rule (the others hold their best Ritz vector after ``max_steps``)."""
    steps: int
    """Lanczos steps taken (the slowest block's)."""


def top_right_vectors(
    E: Tensor, start: Tensor, *, tol: float, max_steps: int, comm: Collective = LOCAL, check_every: int = 1
) -> LanczosResult:
    """Top right singular vectors of ``E: (B, P, d)`` (zero padding rows allowed; data parallel: this rank's rows,
    every product summed over ranks), from the Krylov spaces of ``start: (B, d)``; stopping rule above."""
    B, P, d = E.shape
    steps_cap = max(1, min(max_steps, d))
    Et = E.transpose(1, 2)
    V = E.new_zeros(B, steps_cap + 1, d)
    alpha = torch.zeros(B, steps_cap, dtype=torch.float64, device=E.device)
    beta = torch.zeros(B, steps_cap, dtype=torch.float64, device=E.device)
    v = unit_rows(start)[0]
    V[:, 0] = v
    done = torch.zeros(B, dtype=torch.bool, device=E.device)
    S = torch.ones(B, 1, 1, dtype=torch.float64, device=E.device)
    steps = 0
    for j in range(steps_cap):
        steps = j + 1
        w = comm.sum(bmv(Et, bmv(E, v)))  # A v
        alpha[:, j] = (w * v).sum(1).double()
        basis = V[:, : j + 1]
        for _ in range(2):  # full re-orthogonalisation
            w = w - torch.bmm(torch.bmm(basis, w.unsqueeze(2)).transpose(1, 2), basis).squeeze(1)
        b = w.norm(dim=1)
        beta[:, j] = b.double()
        if steps % check_every == 0 or steps == steps_cap:
            T = (
                torch.diag_embed(alpha[:, :steps])
                + torch.diag_embed(beta[:, : steps - 1], 1)
                + torch.diag_embed(beta[:, : steps - 1], -1)
            )
            theta, S = torch.linalg.eigh(T)
            top = theta[:, -1]
            r1 = beta[:, j] * S[:, -1, -1].abs()
            invariant = (beta[:, j] <= _INVARIANT * top) & (top > 0)  # (A v = 0 from a start E misses: not done)
            if steps > 1:
                r2 = beta[:, j] * S[:, -1, -2].abs()
                gap = top - theta[:, -2] - r2
                sin2 = torch.where(gap > 0, (r1 / gap.clamp(min=1e-300)).pow(2), torch.ones_like(r1)).clamp(max=1)
                one_minus_cos = sin2 / (1 + (1 - sin2).sqrt())
                done = invariant | (one_minus_cos <= tol)
            else:
                done = invariant
            if bool(done.all()):
                break
        # a block whose Krylov space became invariant stops growing it (its next vector would be amplified
        # rounding noise): v = 0 gives zero coefficients, decoupled from its T
        grown = (b.double() > _INVARIANT * alpha[:, :steps].amax(1)) & (b > 0)
        v = torch.where(grown[:, None], w / b[:, None].clamp(min=torch.finfo(E.dtype).tiny), torch.zeros_like(w))
        V[:, j + 1] = v
    coef = S[:, :, -1].to(E.dtype)  # the top Ritz vector's coordinates in the basis
    u = torch.bmm(coef.unsqueeze(1), V[:, : coef.shape[1]]).squeeze(1)
    u = unit_rows(u)[0]
    u = torch.where((u * start).sum(1, keepdim=True) < 0, -u, u)
    return LanczosResult(u, done, steps)
