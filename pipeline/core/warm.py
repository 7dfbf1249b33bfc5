"""Ahead-of-time compilation of the CPU fit's compiled loops (:mod:`pipeline.core.cpu`): ``setup.sh`` runs
:func:`warm_up`, so that a first fit's clock (the equal-time budget of the baselines) holds no compilation. It
runs the coder and the atom update themselves, so it sits above them (and ``cpu`` below)."""

from __future__ import annotations

import torch

from pipeline.core.atom_update import update_atoms
from pipeline.core.coders import encode


def warm_up() -> None:
    """Compile (or load from numba's cache) the CPU loops a fit uses, for fp32 and fp64: the coder's and the
    update's. ``setup.sh`` calls it, so a first fit's clock (the equal-time budget) holds no compilation."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        D = torch.randn(24, 8, generator=g, dtype=dtype).abs()
        D = D / D.norm(dim=1, keepdim=True)
        Y = torch.randn(64, 8, generator=g, dtype=dtype).abs()
        for nonnegative in (True, False):
            encode(Y, D, 3, nonnegative=nonnegative, kernel="numba")
        codes = encode(Y, D, 3, kernel="numba")
        update_atoms(Y - codes.decode(D), D, codes, 4, kernel="numba", generator=g)
