"""The sparse-codes type shared by the coders, the learner and the SAE wrapper.

Codes are kept as fixed-width ``(n, k)`` index/value pairs rather than a sparse matrix: every row has at most
``k`` non-zeros, the layout is the same on CPU and GPU, and gathers/scatters over it are plain tensor ops.
Unused slots hold index 0 with value 0, so they contribute nothing to any product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Codes:
    """Sparse codes of ``n`` samples with at most ``k`` non-zeros each.

    Attributes:
        indices: (n, k) int64 atom ids; padding slots hold 0.
        values: (n, k) float coefficients; padding slots hold 0.
    """

    indices: Tensor
    values: Tensor

    @property
    def n(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def l0(self) -> Tensor:
        """(n,) number of non-zero coefficients per sample."""
        return (self.values != 0).sum(dim=1)

    def to(self, device: torch.device | str) -> Codes:
        return Codes(self.indices.to(device), self.values.to(device))

    def to_dense(self, n_atoms: int) -> Tensor:
        """(n, n_atoms) dense code matrix X, so that ``X @ D`` reconstructs."""
        out = torch.zeros(self.n, n_atoms, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_add_(1, self.indices, self.values)

    def decode(self, D: Tensor) -> Tensor:
        """(n, d) reconstruction ``X @ D`` for atoms ``D: (K, d)``, without forming the dense codes."""
        if self.k == 0:
            return torch.zeros(self.n, D.shape[1], dtype=D.dtype, device=D.device)
        return F.embedding_bag(self.indices, D, per_sample_weights=self.values.to(D.dtype), mode="sum")

    def __getitem__(self, rows) -> Codes:
        return Codes(self.indices[rows], self.values[rows])

    @staticmethod
    def cat(parts: list[Codes]) -> Codes:
        return Codes(torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts]))

    @staticmethod
    def hcat(parts: list[Codes]) -> Codes:
        """Join the slots of several codes of the same samples (e.g. Matryoshka groups)."""
        return Codes(torch.cat([p.indices for p in parts], dim=1), torch.cat([p.values for p in parts], dim=1))
