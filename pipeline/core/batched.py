"""Small batched linear-algebra helpers shared by the rank-1 refits (:mod:`pipeline.core.rank1`) and their Lanczos
solver (:mod:`pipeline.core.lanczos`)."""

from __future__ import annotations

import torch
from torch import Tensor


def bmv(A: Tensor, v: Tensor) -> Tensor:
    """(B, m) ``A_b v_b`` for A: (B, m, n), v: (B, n), computed as the row product ``v_bᵀ A_bᵀ``: on CPU
    (torch 2.13, MKL) that form runs several times faster than ``bmm(A, v[..., None])`` for both A = E and A = Eᵀ."""
    return torch.bmm(v.unsqueeze(1), A.transpose(1, 2)).squeeze(1)


def unit_rows(v: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``v: (B, n)`` scaled to unit norm (zero rows stay zero), and the norms (B,)."""
    n = v.norm(dim=1, keepdim=True)
    return v / n.clamp(min=torch.finfo(v.dtype).tiny), n.squeeze(1)
