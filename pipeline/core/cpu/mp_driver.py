"""Matching pursuit on CPU as one compiled loop per sample (numba), the coder's fast path on CPU.

The batched torch loop in :mod:`pipeline.core.coders` moves the whole ``(m, K)`` correlation block through
memory several times per greedy step (the max, the gathered Gram rows, the update) and runs ~25 small tensor
ops per step for the support bookkeeping. Here each sample runs all its steps on its own correlation row,
which stays in the core's L1/L2 cache (``K`` floats), with the max of the next step taken in the same pass as
the update ``c -= a G[j]``; only the Gram rows it picks come from further away. Pieces of samples are taken one
at a time by Python threads (:func:`pipeline.core.cpu.runtime.threads` of them) running the compiled function with
the GIL released, so no numba threading layer is needed and several callers (thread ranks) can use it at once.

The rules are those of the torch loop, step for step (``pipeline.core.coders`` documents them): argmax of c
(non-negative: the largest positive c, stop when none; signed: the largest |c|, the positive one on a tie,
the first index on equal values), the support table of k + 1 slots with the smallest-|coefficient| drop, and
the ``rtol`` tests, KSVD.jl's strict order with ``reference_rules``. The updates are the same arithmetic in
the same dtype, so results equal the torch loop's up to the rounding of one multiply-add.

This file is the driver; the kernel (numba) is :mod:`pipeline.core.cpu.mp_kernel`, imported lazily
(:mod:`pipeline.core.cpu.runtime`, which says whether it can be used; the torch loop is the fallback).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.core.cpu import runtime

#: Row pieces per thread: rows stop after different numbers of steps, so smaller pieces balance the threads.
_PIECES_PER_THREAD = 4


def mp_codes(
    C: Tensor,
    G: Tensor,
    norm2: Tensor,
    rtol: float,
    k: int,
    max_iter: int,
    nonnegative: bool,
    reference_rules: bool,
    Y: Tensor,
    D: Tensor,
    band: Tensor,
) -> tuple[Tensor, Tensor]:
    """Matching pursuit from the initial correlations, on CPU.

    Args:
        C: (m, K) correlations ``Y Dᵀ`` (fp32 or fp64, CPU), consumed in place.
        G: (K, K) Gram matrix ``D Dᵀ`` with unit diagonal, same dtype.
        norm2: (m,) ``‖y‖²`` of each sample.
        rtol, k, max_iter, nonnegative, reference_rules: as :func:`pipeline.core.coders.encode`.
        Y: (m, d) the samples and ``D: (K, d)`` the atoms, same dtype: with ``reference_rules`` the rtol test of a
            row whose running energy is at most ``band: (m,)`` reads its residual recomputed from them.

    Returns:
        ``indices: (m, k + 1)`` int64 and ``values: (m, k + 1)`` in C's dtype; slot k is used only when
        ``reference_rules`` keeps k + 1 atoms, unused slots hold (0, 0).
    """
    kernels = runtime.module("mp_kernel")
    if kernels is None:
        raise RuntimeError("numba is not importable; use the torch loop (coders.encode(..., kernel='torch')).")
    if C.device.type != "cpu":
        raise ValueError(f"the compiled coder runs on CPU; C is on {C.device}.")
    m = C.shape[0]
    C, G, norm2 = C.detach(), G.detach(), norm2.detach()  # pursuit has no gradient; numpy() refuses graphs
    Cn = C.contiguous().numpy()
    ints = np.int32 if Cn.dtype == np.float32 else np.int64
    masks = np.array([np.iinfo(ints).max, -1], dtype=ints)  # all bits but the sign, all bits
    Gn = G.to(C.dtype).contiguous().numpy()
    n2 = norm2.to(C.dtype).contiguous().numpy()
    th = ((rtol * rtol) * norm2).to(C.dtype).contiguous().numpy()
    Yn, Dn = Y.detach().to(C.dtype).contiguous().numpy(), D.detach().to(C.dtype).contiguous().numpy()
    bn = band.detach().to(C.dtype).contiguous().numpy()
    out_idx = np.zeros((m, k + 1), dtype=np.int64)
    out_val = np.zeros((m, k + 1), dtype=Cn.dtype)
    args = (Cn, Gn, masks, n2, th, k, max_iter, nonnegative, reference_rules, out_idx, out_val, Yn, Dn, bn)
    threads = runtime.threads() if m >= 64 else 1
    pieces = min(m, threads * _PIECES_PER_THREAD)
    bounds = np.linspace(0, m, pieces + 1).astype(np.int64)
    launch(kernels, args, bounds, threads)
    return torch.from_numpy(out_idx), torch.from_numpy(out_val)


def launch(kernels: Any, args: tuple, bounds: np.ndarray, threads: int) -> None:
    """Run ``kernels.mp_rows(*args, lo, hi)`` on the row pieces ``bounds[i]:bounds[i+1]``, ``threads`` threads
    taking the next piece as they finish one (:func:`pipeline.core.cpu.runtime.run_threads`). A separate seam so
    that ``benchmarks/bench_update_cpu.py`` can run the same pieces through numba's own threads instead."""
    pieces = len(bounds) - 1
    claim = itertools.count()  # each thread takes the next piece (next() on a count is atomic under the GIL)

    def work(_thread: int) -> None:
        while (i := next(claim)) < pieces:
            kernels.mp_rows(*args, bounds[i], bounds[i + 1])

    runtime.run_threads(work, threads)
