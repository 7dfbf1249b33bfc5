"""Input checks shared by the algorithm's public functions: each failure names the problem and the fix."""

from __future__ import annotations

import torch
from torch import Tensor

#: Largest tolerated deviation of an atom's norm from 1.
UNIT_NORM_TOL = 1e-3


def check_samples(Y: Tensor, name: str = "Y", d: int | None = None) -> None:
    """Y must be a finite floating (n, d) tensor (with d matching the dictionary when given)."""
    if not isinstance(Y, Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor of shape (n, d), got {type(Y).__name__}; "
            f"convert with torch.as_tensor({name})."
        )
    if Y.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (n, d), got shape {tuple(Y.shape)}; "
            f"flatten leading dimensions with {name}.reshape(-1, {name}.shape[-1])."
        )
    if not Y.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {Y.dtype}; use {name}.float().")
    if d is not None and Y.shape[1] != d:
        raise ValueError(
            f"{name} has d = {Y.shape[1]} but the dictionary has d = {d}; "
            f"pass activations from the same hook the dictionary was fitted on."
        )
    if not bool(torch.isfinite(Y).all()):
        bad = int((~torch.isfinite(Y)).any(dim=1).sum())
        raise ValueError(
            f"{name} contains NaN or Inf in {bad} row(s); drop or repair those samples "
            f"(e.g. {name} = {name}[torch.isfinite({name}).all(1)])."
        )


def check_atoms(D: Tensor, name: str = "D") -> None:
    """D must be a finite (K, d) tensor with unit-norm rows."""
    check_samples(D, name)
    norms = D.float().norm(dim=1)
    worst = float((norms - 1).abs().max()) if norms.numel() else 0.0
    if worst > UNIT_NORM_TOL:
        raise ValueError(
            f"atoms of {name} are not unit norm (largest |norm - 1| = {worst:.3g}); "
            f"normalise the rows: {name} = {name} / {name}.norm(dim=1, keepdim=True)."
        )


def check_sparsity(k: int, n_atoms: int, d: int) -> None:
    """1 <= k <= min(d, n_atoms)."""
    if not isinstance(k, int) or isinstance(k, bool):
        raise ValueError(f"k must be an int, got {k!r}.")
    if k < 1:
        raise ValueError(f"k = {k} must be at least 1 (the number of non-zeros per sample).")
    if k > d:
        raise ValueError(
            f"k = {k} exceeds the dimension d = {d}: more than d atoms cannot be independent; choose k <= {d}."
        )
    if n_atoms < k:
        raise ValueError(f"n_atoms = {n_atoms} is smaller than k = {k}; choose n_atoms >= k (typically n_atoms >> k).")
