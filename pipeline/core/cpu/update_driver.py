"""The atom update on CPU through compiled loops: the driver of :mod:`pipeline.core.cpu.sweep_kernel` (numba,
imported lazily), called by :func:`pipeline.core.atom_update.update_atoms`.

Atom batches go in the shuffled order :func:`~pipeline.core.atom_update.update_atoms` planned; within a batch the
atoms are refitted against the same residual (Jacobi), then the batch's residual corrections are written and the
next batch sees them (Gauss-Seidel), exactly the order of the block solver. The whole sweep is one compiled call
per thread (:func:`pipeline.core.cpu.runtime.run_threads`): the threads take a batch's atoms one at a time,
largest first, and split its corrections by sample rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.core.codes import Codes
from pipeline.core.cpu import runtime
from pipeline.core.update_stats import UpdateStats


def update(
    R: Tensor,
    D: Tensor,
    codes: Codes,
    atom_batch_size: int,
    order: Tensor,
    nz: Tensor,
    rows_all: Tensor,
    starts: list[int],
    flat_val: Tensor,
    nonnegative: bool,
    tol: float,
    max_iters: int,
):
    """One sweep over the used atoms ``order`` (their code entries ``nz`` sorted by atom, atom a's being
    ``starts[a]:starts[a+1]``, in sample rows ``rows_all``), in place on ``R: (n, d)``, ``D: (K, d)`` and
    the codes; returns :class:`~pipeline.core.update_stats.UpdateStats` (iterations: mean over atoms; signed,
    Lanczos steps; ``lanczos``: signed refits stopped on the Lanczos estimate rather than certified)."""
    kernel = runtime.module("sweep_kernel")
    Rc = R if R.is_contiguous() else R.contiguous()
    Rn = Rc.numpy()
    n_used = int(order.numel())
    starts_np = np.asarray(starts, dtype=np.int64)
    x_old = flat_val[nz].numpy()
    x_new = np.empty_like(x_old)
    D_new = np.empty((n_used, D.shape[1]), dtype=Rn.dtype)
    steps = np.zeros(n_used, dtype=np.int64)
    outcome = np.zeros(n_used, dtype=np.int64)
    batch = max(1, int(atom_batch_size))
    # each batch's positions, the atoms with most entries first (a thread that takes a large one last waits)
    claim_order = np.lexsort((-np.diff(starts_np), np.arange(n_used) // batch)).astype(np.int64)
    threads = runtime.threads()
    cuts = np.linspace(0, len(Rn), threads + 1).astype(np.int64)
    sync = np.zeros(kernel.SYNC_SLOTS, dtype=np.int64)
    claims = np.zeros(-(-n_used // batch), dtype=np.int64)
    D_in = D.detach().contiguous().numpy()
    args = (
        Rn,
        D_in,
        order.numpy(),
        rows_all.numpy(),
        x_old,
        starts_np,
        claim_order,
        batch,
        not nonnegative,
        tol,
        max_iters,
        D_new,
        x_new,
        steps,
        outcome,
        sync,
        claims,
    )
    launch(kernel, args, cuts, threads, sync)
    if Rc is not R:
        R.copy_(Rc)
    D[order] = torch.from_numpy(D_new)
    flat_val[nz] = torch.from_numpy(x_new)
    codes.values.copy_(flat_val.view_as(codes.values))
    ended = np.bincount(outcome, minlength=4)
    return UpdateStats(
        n_used,
        float(steps.mean()) if n_used else 0.0,
        capped=int(ended[kernel.CAPPED]),
        eigensolved=int(ended[kernel.DENSE]),
        lanczos=int(ended[kernel.LANCZOS]),
    )


def launch(kernel: Any, args: tuple, cuts: np.ndarray, threads: int, sync: np.ndarray) -> None:
    """Run the sweep: ``kernel.sweep(*args, rows cuts[t]:cuts[t+1], threads)`` on each of ``threads`` threads at
    once (:func:`pipeline.core.cpu.runtime.run_threads`, the barriers' abort flag in ``sync``). A separate seam so
    that ``benchmarks/bench_update_cpu.py`` can run the same arguments through numba's own threads instead."""
    runtime.run_threads(
        lambda t: kernel.sweep(*args, cuts[t], cuts[t + 1], threads), threads, sync[kernel.ABORT : kernel.ABORT + 1]
    )
