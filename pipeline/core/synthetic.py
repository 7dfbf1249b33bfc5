"""Planted dictionary problems (Aharon, Elad & Bruckstein 2006) for tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PlantedProblem:
    """``Y = X D + noise`` with k-sparse X over a known unit-norm dictionary."""

    Y: Tensor
    """(n, d) samples."""
    D: Tensor
    """(K, d) the planted atoms."""
    indices: Tensor
    """(n, k) planted supports."""
    values: Tensor
    """(n, k) planted coefficients."""


def planted_problem(
    d: int = 20,
    n_atoms: int = 50,
    k: int = 3,
    n: int = 1500,
    snr_db: float | None = 20.0,
    nonnegative: bool = False,
    seed: int = 0,
) -> PlantedProblem:
    """The K-SVD paper's synthetic experiment: Gaussian unit-norm atoms, k distinct atoms per sample with
    i.i.d. uniform coefficients (in [0.1, 1] when ``nonnegative``, else ±[0.1, 1]), white noise at ``snr_db``.
    """
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_atoms, d, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    indices = torch.rand(n, n_atoms, generator=g).argsort(dim=1)[:, :k]
    values = 0.1 + 0.9 * torch.rand(n, k, generator=g)
    if not nonnegative:
        values = values * (torch.randint(0, 2, (n, k), generator=g) * 2 - 1)
    Y = (values[:, :, None] * D[indices]).sum(dim=1)
    if snr_db is not None:
        noise = torch.randn(n, d, generator=g)
        scale = Y.pow(2).sum().div(noise.pow(2).sum()).sqrt() * 10 ** (-snr_db / 20)
        Y = Y + scale * noise
    return PlantedProblem(Y, D, indices, values)


def recovered_fraction(D_true: Tensor, D_learned: Tensor, threshold: float = 0.99) -> float:
    """Fraction of true atoms with a learned atom at |cos| > threshold."""
    cos = (D_true.float() @ D_learned.float().T).abs()
    return float((cos.max(dim=1).values > threshold).float().mean())
