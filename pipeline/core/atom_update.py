"""Batched K-SVD dictionary update: best rank-1 refits of atoms in shuffled atom batches.

One module (~480 lines) because the plan of one sweep (used atoms, their entries, the shuffled atom batches)
feeds both of its paths, the torch block solvers here and the compiled sweep (:mod:`pipeline.core.cpu.update_driver`).

For atom j with support ω_j (the samples whose codes use j) and coefficients x_j, the restricted residual
with the atom added back is ``E_j = R[ω_j] + x_j d_jᵀ``. K-SVD replaces (d_j, x_j) by the best rank-1
approximation of E_j, keeping the support (non-negative codes: the best one with x_j >= 0).

Two solvers:

- ``solver="direct"`` (default) and ``solver="gram"`` (exact): every atom batch's restricted errors are gathered
  once into contiguous zero-padded blocks, grouped by support size so padding stays small, and each block is
  refitted to ``tol`` (:mod:`pipeline.core.rank1`): "direct" iterates on the block, "gram" in the small space
  of its Gram matrix. Signed refits are certified or finished by an eigensolver; non-negative ones that hit
  ``max_iters`` are counted.
- ``solver="alternating"``: the matrix-free alternating minimisation ``x ← E_j d``, ``d ← E_jᵀx/‖E_jᵀx‖``
  computed from scattered rows of R at every step; the solver of ``approximate=True`` (one step: Rubinstein et
  al.'s approximate K-SVD).

Data parallel (``comm``, :mod:`pipeline.core.collective`): each rank holds its own samples' residual rows and
codes; which atoms are used, the support sizes that plan the blocks, and every per-atom sum over samples
(``Eᵀx``, Rayleigh quotients, energies) are all-reduced, so every rank makes the same refits as one process
with all the samples ("direct": the distributed power iteration; "alternating" likewise; "gram" refuses).

Atoms go in shuffled **atom batches**: all atoms of a batch are refitted against the same residual (Jacobi),
then the residual is refreshed and the next batch sees the new atoms (Gauss-Seidel). Batch size 1 is exact
sequential K-SVD; one batch of all K atoms converges much worse (noted by the reference's authors).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core.codes import Codes
from pipeline.core.collective import LOCAL, Collective
from pipeline.core.cpu import runtime, update_driver
from pipeline.core.cpu.runtime import KERNELS
from pipeline.core.rank1 import refit_block
from pipeline.core.update_stats import UpdateStats

#: Largest number of gathered residual entries (rows × d) held at once by one compute chunk (CPU, CUDA).
_GATHER_BUDGET = {"cpu": 1 << 25, "cuda": 1 << 28}
#: Iterations between convergence tests of the block solvers (a test synchronises the host with CUDA).
_CHECK_EVERY = {"cpu": 1, "cuda": 8}
#: Fixed cost of one extra block, in atoms of average cost: splitting an atom batch into blocks by support size
#: trades padding work against per-block overhead (a block's set-up and its per-step kernel launches).
_BLOCK_OVERHEAD_ATOMS = 4
SOLVERS = ("direct", "gram", "alternating")
#: Solvers that gather blocks (everything but the matrix-free alternating one).
_BLOCK_SOLVERS = ("direct", "gram")


def update_atoms(
    R: Tensor,
    D: Tensor,
    codes: Codes,
    atom_batch_size: int,
    *,
    nonnegative: bool = True,
    tol: float = 1e-6,
    max_iters: int = 100,
    approximate: bool = False,
    solver: str = "direct",
    generator: torch.Generator | None = None,
    comm: Collective = LOCAL,
    kernel: str = "auto",
) -> UpdateStats:
    """One K-SVD sweep over the used atoms, in place.

    Args:
        R: (n, d) residual ``Y − codes.decode(D)``; refreshed in place after every atom batch.
        D: (K, d) unit-norm atoms; used atoms are replaced in place.
        codes: codes of the n samples; their values are replaced in place (support unchanged).
        atom_batch_size: atoms refitted in parallel against the same residual (1 = sequential K-SVD).
        nonnegative: keep coefficients >= 0.
        tol: per-atom convergence threshold: block solvers, ``1 − cos`` to the exact refit (certified for
            signed codes, estimated for non-negative ones); alternating, ``1 − d_newᵀ d`` between steps.
        max_iters: cap on iterations per refit block (block solvers) or atom batch (alternating).
        approximate: a single alternating step per atom (approximate K-SVD) instead of iterating to ``tol``.
        solver: ``"direct"`` / ``"gram"`` (exact refits of gathered blocks) or ``"alternating"`` (matrix-free).
        generator: random source for the atom shuffle (CPU generator; determinism; the same seed on every rank).
        comm: data-parallel runs: R and codes hold this rank's samples; sums over samples are all-reduced.
        kernel: ``"numba"`` runs the "direct" refits and the residual corrections as compiled per-atom loops
            that read each atom's rows of R in place (:mod:`pipeline.core.cpu`; CPU, one process;
            signed refits by Lanczos from the start, not power steps first); ``"torch"`` the batched block
            solver; ``"auto"`` numba wherever it applies. Each atom then stops on its own test instead of
            waiting for its block's slowest atom.

    Returns:
        :class:`UpdateStats`.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver = {solver!r} is not one of {SOLVERS}.")
    if solver == "gram" and not approximate and comm.distributed:
        raise ValueError(
            "solver='gram' forms sample-by-sample Gram matrices, which a data-parallel update cannot; "
            "use solver='direct' (rank1_solver=direct), the distributed power iteration."
        )
    run_compiled = _use_compiled(kernel, solver, approximate, comm, R, D)
    K, d = D.shape
    device = D.device
    flat_val = codes.values.reshape(-1)
    flat_idx = codes.indices.reshape(-1)
    nz = (flat_val != 0).nonzero().squeeze(1)  # entry ids into the flattened code slots
    atoms = flat_idx[nz]
    support = comm.sum(torch.bincount(atoms, minlength=K))  # |ω_j| over all ranks
    used_ids = (support > 0).nonzero().squeeze(1)
    n_used = int(used_ids.numel())
    if n_used == 0:
        return UpdateStats(0, 0.0)
    order = used_ids[torch.randperm(n_used, generator=generator).to(device)]
    rank = torch.full((K,), -1, dtype=torch.long, device=device)
    rank[order] = torch.arange(n_used, device=device)
    # sort code entries by the rank of their atom: each batch (and each atom) is a contiguous range
    ent_rank = rank[atoms]
    perm = torch.argsort(ent_rank, stable=True)
    nz, ent_rank = nz[perm], ent_rank[perm]
    rows_all = nz // codes.k
    starts = torch.searchsorted(ent_rank, torch.arange(0, n_used + 1, device=device)).tolist()
    if run_compiled:
        return update_driver.update(
            R, D, codes, atom_batch_size, order, nz, rows_all, starts, flat_val, nonnegative, tol, max_iters
        )
    counts = [starts[a + 1] - starts[a] for a in range(n_used)]  # this rank's entries per atom, in order
    # how the work is cut (blocks, chunks) must be the same on every rank: planned on the global support sizes
    sizes = support[order].tolist() if comm.distributed else counts
    if solver in _BLOCK_SOLVERS and not approximate:
        return _update_blocks(
            R,
            D,
            codes,
            atom_batch_size,
            order,
            nz,
            rows_all,
            starts,
            counts,
            sizes,
            flat_val,
            nonnegative,
            tol,
            max_iters,
            solver,
            comm,
        )
    plan = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    iters_total, n_batches, capped = 0, 0, 0
    budget = _GATHER_BUDGET.get(device.type, _GATHER_BUDGET["cpu"])
    for b0 in range(0, n_used, atom_batch_size):
        b1 = min(b0 + atom_batch_size, n_used)
        corrections = []
        # compute chunks inside the batch only bound memory; every chunk sees the same residual (Jacobi)
        a0 = b0
        while a0 < b1:
            a1 = a0 + 1
            while a1 < b1 and (plan[a1 + 1] - plan[a0]) * d <= budget:
                a1 += 1
            e0, e1 = starts[a0], starts[a1]
            ent = nz[e0:e1]
            pos = ent_rank[e0:e1] - a0
            new_d, new_x, n_it, n_late = _rank1_fit(
                R,
                D[order[a0:a1]],
                rows_all[e0:e1],
                pos,
                flat_val[ent],
                nonnegative,
                tol,
                1 if approximate else max_iters,
                comm,
            )
            corrections.append((order[a0:a1], ent, rows_all[e0:e1], pos, new_d, new_x))
            iters_total += n_it
            capped += 0 if approximate else n_late
            n_batches += 1
            a0 = a1
        for ids, ent, rows, pos, new_d, new_x in corrections:
            old_d = D[ids]
            old_x = flat_val[ent]
            delta = old_x[:, None] * old_d[pos] - new_x[:, None] * new_d[pos]
            R.index_add_(0, rows, delta.to(R.dtype))
            D[ids] = new_d
            flat_val[ent] = new_x
    codes.values.copy_(flat_val.view_as(codes.values))
    return UpdateStats(n_used, iters_total / max(n_batches, 1), capped)


def _use_compiled(kernel: str, solver: str, approximate: bool, comm: Collective, R: Tensor, D: Tensor) -> bool:
    """Whether this sweep runs the compiled refits (``kernel``; see :func:`update_atoms`)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel = {kernel!r} is not one of {KERNELS}.")
    fits = (
        solver == "direct"
        and not approximate
        and not comm.distributed
        and D.device.type == "cpu"
        and R.dtype == D.dtype
        and R.dtype in (torch.float32, torch.float64)
    )
    return runtime.use(
        kernel,
        fits,
        "kernel='numba' refits atoms with the direct solver (not approximate) on CPU "
        "in one process; use kernel='torch' or 'auto' for this update.",
    )


def _update_blocks(
    R: Tensor,
    D: Tensor,
    codes: Codes,
    atom_batch_size: int,
    order: Tensor,
    nz: Tensor,
    rows_all: Tensor,
    starts: list[int],
    counts: list[int],
    sizes: list[int],
    flat_val: Tensor,
    nonnegative: bool,
    tol: float,
    max_iters: int,
    method: str,
    comm: Collective,
) -> UpdateStats:
    """The sweep with a block solver: per atom batch, blocks of similar support size (``sizes``: over all
    ranks, so every rank cuts the same blocks), each gathered once from this rank's rows (``counts`` per atom)."""
    n_used = int(order.numel())
    n, d = R.shape
    device = D.device
    budget = _GATHER_BUDGET.get(device.type, _GATHER_BUDGET["cpu"])
    check_every = _CHECK_EVERY.get(device.type, 1)
    # the residual with one extra zero row that padding slots point at: padded gathers need no masking, and
    # padded scatters add zeros to a row nobody reads
    Rx = torch.empty(n + 1, d, dtype=D.dtype, device=device)
    Rx[:n] = R
    Rx[n] = 0
    starts_t = torch.tensor(starts, device=device)
    plan = [
        (b0, support_blocks(sizes[b0 : b0 + atom_batch_size], d, budget, method))
        for b0 in range(0, n_used, atom_batch_size)
    ]
    # one reused work buffer for the gathered blocks: a fresh multi-MB tensor per block would cost a page fault
    # per 4 KiB on CPU
    size = max(len(r) * max(counts[b0 + i] for i in r) for b0, blocks in plan for r in blocks)  # this rank's rows
    work_E = torch.empty(size, d, dtype=D.dtype, device=device)
    steps_total, n_blocks, capped, eigensolved, lanczos = 0, 0, 0, 0, 0
    for b0, blocks in plan:
        refits = []
        for ranks in blocks:
            ranks_t = torch.tensor(ranks, device=device) + b0
            cnt = starts_t[ranks_t + 1] - starts_t[ranks_t]
            P = max(counts[b0 + r] for r in ranks)
            col = torch.arange(P, device=device)
            mask = col[None, :] < cnt[:, None]  # (B, P) real rows
            slot = torch.where(mask, starts_t[ranks_t][:, None] + col[None, :], 0)  # into the sorted entries
            ent = nz[slot]
            rows = torch.where(mask, rows_all[slot], n)
            ids = order[ranks_t]
            d_old = D[ids]
            x_old = flat_val[ent] * mask
            flat = work_E[: len(ranks) * P]
            torch.index_select(Rx, 0, rows.view(-1), out=flat)
            E = flat.view(len(ranks), P, d)
            E.addcmul_(x_old[:, :, None], d_old[:, None, :])  # add the atom back: E = R[ω] + x dᵀ
            fit = refit_block(
                E,
                d_old,
                nonnegative=nonnegative,
                tol=tol,
                max_steps=max_iters,
                method=method,
                check_every=check_every,
                comm=comm,
            )
            del E
            atom = torch.arange(len(ranks), device=device)[:, None].expand_as(mask)[mask]
            refits.append(_BlockRefit(ids, ent[mask], rows[mask], atom, d_old, x_old[mask], fit.atoms, fit.coefs[mask]))
            steps_total += fit.steps
            n_blocks += 1
            capped += fit.capped
            eigensolved += fit.eigensolved
            lanczos += fit.lanczos
        _apply_refits(Rx, D, flat_val, refits)  # Jacobi: every block above saw the same residual
    R.copy_(Rx[:n])
    codes.values.copy_(flat_val.view_as(codes.values))
    return UpdateStats(n_used, steps_total / max(n_blocks, 1), capped, eigensolved, lanczos)


class _BlockRefit(NamedTuple):
    """One refitted block's real (unpadded) entries, ready to be written."""

    ids: Tensor
    """(B,) atom ids."""
    slots: Tensor
    """(e,) flat code slots of the entries."""
    rows: Tensor
    """(e,) sample row of each entry."""
    atom: Tensor
    """(e,) position in the block of each entry's atom."""
    d_old: Tensor
    """(B, d) atoms before the refit."""
    x_old: Tensor
    """(e,) coefficients before the refit."""
    d_new: Tensor
    """(B, d) refitted atoms."""
    x_new: Tensor
    """(e,) refitted coefficients."""


def _apply_refits(Rx: Tensor, D: Tensor, flat_val: Tensor, refits: list[_BlockRefit]) -> None:
    """Write an atom batch's refits: atoms, coefficients, and the residual correction
    ``Σ_j (x_j,old d_j,oldᵀ − x_j,new d_j,newᵀ)`` on the rows the batch's atoms use. Each touched row's
    correction is one embedding-bag sum over a small (2 × atoms, d) table of the old and new atoms, so no
    (entries, d) outer products are formed."""
    ids = torch.cat([r.ids for r in refits])
    new = torch.cat([r.d_new for r in refits])
    B = ids.numel()
    firsts = [0]
    for r in refits[:-1]:
        firsts.append(firsts[-1] + r.ids.numel())
    atom = torch.cat([r.atom + f for r, f in zip(refits, firsts)])  # each entry's atom, 0..B-1
    rows = torch.cat([r.rows for r in refits])
    x_old = torch.cat([r.x_old for r in refits])
    x_new = torch.cat([r.x_new for r in refits])
    slots = torch.cat([r.slots for r in refits])
    flat_val[slots] = x_new
    order = torch.argsort(rows, stable=True)
    rows, atom, x_old, x_new = rows[order], atom[order], x_old[order], x_new[order]
    touched, per_row = torch.unique_consecutive(rows, return_counts=True)
    # a bag per touched row, holding each entry twice: +x_old on its old atom, −x_new on its new one
    idx = torch.stack([atom, atom + B], 1).reshape(-1)
    weights = torch.stack([x_old, -x_new], 1).reshape(-1)
    offsets = torch.zeros(touched.numel(), dtype=torch.long, device=D.device)
    torch.cumsum(2 * per_row[:-1], 0, out=offsets[1:])
    table = torch.cat([torch.cat([r.d_old for r in refits]), new])
    delta = F.embedding_bag(idx, table, offsets, mode="sum", per_sample_weights=weights)
    Rx.index_add_(0, touched, delta)
    D[ids] = new


def support_blocks(counts: list[int], d: int, budget: int, method: str = "direct") -> list[list[int]]:
    """Group the atoms of one atom batch into refit blocks by support size.

    Args:
        counts: (B,) support size |ω| of each atom of the batch.
        d: the data dimension (with ``method="gram"``, atoms with |ω| <= d are "light", refitted through
            |ω| × |ω| Grams, the others through d × d ones).
        budget: largest block size in gathered entries (atoms × padded rows × d).
        method: the refit method, whose cost in the padded size P sets the split: P per atom ("direct"),
            P² ("gram").

    Returns:
        lists of positions into ``counts``: at most three blocks of contiguous support sizes (plus, for "gram",
        one of heavy atoms, which never share a block with light ones) chosen to minimise padded cost plus a
        per-block overhead; any block over ``budget`` is cut.
    """
    by_size = sorted(range(len(counts)), key=lambda i: counts[i])
    if method == "gram":
        light = [i for i in by_size if counts[i] <= d]
        heavy = [i for i in by_size if counts[i] > d]
        groups = _split_by_size(light, [counts[i] ** 2 for i in light]) + ([heavy] if heavy else [])
    else:
        groups = _split_by_size(by_size, [counts[i] for i in by_size])
    blocks = []
    for g in groups:
        cap = max(1, budget // max(1, max(counts[i] for i in g) * d))
        blocks.extend(g[i : i + cap] for i in range(0, len(g), cap))
    return blocks


def _split_by_size(items: list[int], costs: list[int]) -> list[list[int]]:
    """At most three contiguous groups of ``items`` (sorted by their per-atom ``costs``, which grow with the
    support size) minimising Σ |g|·max cost in g + a fixed cost per group (padding vs per-block overhead)."""
    n = len(items)
    if n == 0:
        return []
    c = np.asarray(costs, dtype=np.float64)
    overhead = float(c.mean()) * _BLOCK_OVERHEAD_ATOMS
    last = n * c[-1]
    best, cuts = last + overhead, ()
    if n >= 2:
        s = np.arange(1, n)
        two = s * c[s - 1] + (n - s) * c[-1] + 2 * overhead
        i = int(two.argmin())
        if two[i] < best:
            best, cuts = float(two[i]), (int(s[i]),)
    if n >= 3:
        s, t = np.triu_indices(n - 1, k=1)  # 0 <= s < t <= n - 2, cuts at s + 1 < t + 1
        s, t = s + 1, t + 1
        three = s * c[s - 1] + (t - s) * c[t - 1] + (n - t) * c[-1] + 3 * overhead
        i = int(three.argmin())
        if three[i] < best:
            cuts = (int(s[i]), int(t[i]))
    bounds = (0, *cuts, n)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _rank1_fit(
    R: Tensor,
    d_old: Tensor,
    rows: Tensor,
    pos: Tensor,
    x_old: Tensor,
    nonnegative: bool,
    tol: float,
    max_iters: int,
    comm: Collective,
) -> tuple[Tensor, Tensor, int, int]:
    """Best rank-1 refit of a group of atoms against the same residual.

    Args:
        R: (n, d) residual (atoms' contributions removed).
        d_old: (B, d) current atoms.
        rows, pos, x_old: (e,) per code entry: sample row, atom position in the group, coefficient.

    Returns:
        (new atoms (B, d), new coefficients (e,), steps taken, atoms not converged within ``max_iters``).
    """
    B, dim = d_old.shape
    Rg = R.index_select(0, rows).to(d_old.dtype)  # (e, d), entries grouped by atom (pos ascending)
    seg = _Segments(pos, B, Rg)
    d_cur = d_old
    steps, change = 0, torch.zeros(B, dtype=d_old.dtype, device=d_old.device)
    for steps in range(1, max_iters + 1):
        x = _project(Rg, d_old, d_cur, seg, x_old, nonnegative)
        xx = torch.zeros(B, dtype=d_old.dtype, device=d_old.device).index_add_(0, pos, x_old * x)
        u = comm.sum(seg.sum_rows(Rg, x) + xx[:, None] * d_old)  # E_jᵀ x for every atom of the group
        norm = u.norm(dim=1, keepdim=True)
        d_new = torch.where(norm > 0, u / norm.clamp(min=torch.finfo(u.dtype).tiny), d_cur)
        change = 1 - (d_new * d_cur).sum(dim=1)
        d_cur = d_new
        if steps < max_iters and bool((change <= tol).all()):
            break
    x = _project(Rg, d_old, d_cur, seg, x_old, nonnegative)
    return d_cur, x, steps, int((change > tol).sum())


class _Segments:
    """Code entries grouped by atom: entries of atom b are rows ``offsets[b]:offsets[b+1]`` of Rg.

    ``E_jᵀ x`` sums each segment's rows weighted by x: on CPU one embedding-bag sum (no (e, d) temporary),
    on CUDA an atomic index-add (the GPU embedding-bag kernel serialises long segments, and segment lengths
    follow atom usage, which is very uneven; cuSPARSE SpMM/SDDMM measured slower still on an H200).
    ``E_j d`` dots every row with its own atom.
    """

    def __init__(self, pos: Tensor, B: int, Rg: Tensor):
        self.pos, self.B, self.e = pos, B, Rg.shape[0]
        counts = torch.bincount(pos, minlength=B)
        self.offsets = torch.zeros(B + 1, dtype=torch.long, device=pos.device)
        torch.cumsum(counts, 0, out=self.offsets[1:])
        self.entries = torch.arange(self.e, device=pos.device)
        self.bags = not Rg.is_cuda

    def sum_rows(self, Rg: Tensor, w: Tensor) -> Tensor:
        """(B, d): Σ over each segment of ``w_e Rg[e]``."""
        if self.bags:
            return F.embedding_bag(self.entries, Rg, self.offsets[:-1], mode="sum", per_sample_weights=w)
        out = torch.zeros(self.B, Rg.shape[1], dtype=Rg.dtype, device=Rg.device)
        return out.index_add_(0, self.pos, Rg * w[:, None])

    def dot_atoms(self, Rg: Tensor, atoms: Tensor) -> Tensor:
        """(e,): ``Rg[e] · atoms[pos_e]``."""
        return torch.linalg.vecdot(Rg, atoms.index_select(0, self.pos))


def _project(Rg: Tensor, d_old: Tensor, d_cur: Tensor, seg: _Segments, x_old: Tensor, nonnegative: bool) -> Tensor:
    """(e,) ``E_j d`` per entry: ``R[ω_j] d + x_j (d_jᵀ d)``; clipped at 0 for non-negative codes."""
    overlap = (d_old * d_cur).sum(dim=1)
    x = seg.dot_atoms(Rg, d_cur) + x_old * overlap.index_select(0, seg.pos)
    return x.clamp(min=0) if nonnegative else x


def objective(Y: Tensor, D: Tensor, codes: Codes) -> float:
    """‖Y − X D‖²_F."""
    return float((Y - codes.decode(D)).pow(2).sum())
