"""What one sweep of the atom update did (:func:`pipeline.core.atom_update.update_atoms`, whichever loop ran it:
the torch block solvers or the compiled sweep of :mod:`pipeline.core.cpu.update_driver`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UpdateStats:
    """What one sweep over the atoms did."""

    n_used: int
    """Atoms with at least one coefficient in the batch (the ones refitted)."""
    mean_rank1_iters: float
    """Mean number of iterations the refit blocks (block solvers) or atom batches (alternating) needed."""
    capped: int = 0
    """Refits stopped at the iteration cap before converging (non-negative, or the alternating solver)."""
    eigensolved: int = 0
    """Signed refits finished by the dense eigensolver (block solvers; exact)."""
    lanczos: int = 0
    """Signed refits not certified by power steps and converged by Lanczos ("direct")."""
