"""DB-KSVD: double-batch K-SVD dictionary learning (sample batches × atom batches), in pure PyTorch.

Each iteration takes a sample batch, codes it with the current atoms (matching pursuit by default), refits
every used atom by its best rank-1 fit in shuffled atom batches (:mod:`pipeline.core.atom_update`), then replaces
dead atoms and near-duplicates. Codes are not carried between iterations. With a tensor that fits in one
batch this is classic (batched) K-SVD iterated to convergence; with the paper's options
(:data:`PAPER_SCHEDULE`) it is DB-KSVD's 65,536-sample batches, one update per batch, 3 epochs.

    >>> D = learn_dictionary(Y, n_atoms=4096, k=32)     # Y: (n, d) tensor or an iterable of (b, d) batches
    >>> codes = D.encode(Y_test); D.fvu(Y_test)

Data parallel (``process_group``, e.g. ``torch.distributed.group.WORLD`` under torchrun): every rank passes the
same data and codes its own contiguous share of each sample batch; every sum over samples is all-reduced
(:mod:`pipeline.core.collective`), so the ranks hold the dictionary one process fits on the whole batches, up
to floating-point summation order. Rank 0 alone writes the checkpoint and shows progress.

One module (~480 lines): the fit loop, one iteration, the held-out curve and the stop rules share the loop's
state (clock, resume position, checkpoint, generator); split apart they would pass all of it around.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pipeline.core.atom_update import update_atoms
from pipeline.core.batches import BatchSource
from pipeline.core.checkpoint import load_checkpoint, save_checkpoint
from pipeline.core.coders import encode, gram
from pipeline.core.codes import Codes
from pipeline.core.collective import LOCAL, Collective, collective
from pipeline.core.dictionary import Dictionary
from pipeline.core.learner_config import PAPER_SCHEDULE, LearnerConfig
from pipeline.core.matryoshka import Group, matryoshka_groups
from pipeline.utils.curves import on_log_grid

log = logging.getLogger(__name__)

#: The per-iteration record kept in ``Dictionary.history`` (and the fit's metrics), field by field.
HISTORY_FIELDS: dict[str, str] = {
    "fvu": "FVU of the batch with the codes it was coded with, before the update (Matryoshka, cascade loop: "
    "coding and updating interleave, so this is the FVU after each group's update; reference loop: the "
    "FVU of the coding with all atoms, before any update)",
    "l0": "mean non-zeros per sample of those same codes",
    "fvu_after_update": "FVU of the batch after the atom update (same supports, refitted atoms and values; "
    "Matryoshka reference loop: after each group's update and re-coding)",
    "l0_after_update": "mean non-zeros after the update (non-negative refits can zero coefficients)",
    "dead_fraction": "atoms with no coefficient after the update (re-seeded when reseed is set)",
    "n_duplicates": "atoms replaced as near-duplicates (duplicate_threshold)",
    "rank1_iters": "mean iterations per refit block (block solvers) or atom batch (alternating solver)",
    "rank1_capped": "refits stopped at rank1_max_iters before rank1_tol (logged as a warning)",
    "rank1_eigensolved": "signed refits finished exactly by the dense eigensolver (not certified by power steps "
    "within rank1_max_iters, or certain not to be, and not converged by Lanczos)",
    "rank1_lanczos": "signed refits not certified by power steps and converged by Lanczos to rank1_tol on its "
    "estimated angle (rank1_solver=direct)",
    "code_seconds": "wall time coding",
    "update_seconds": "wall time updating atoms",
    "reseed_seconds": "wall time re-seeding dead and duplicate atoms",
    "iteration": "1-based iteration number",
    "epoch": "0-based epoch",
    "rows": "samples in the batch (all ranks)",
    "seconds": "learner clock since the start of the fit (resumed fits continue it; held-out evaluation excluded)",
    "heldout_fvu": "FVU of the held-out rows under the dictionary after this iteration (only on the log grid of "
    "iterations and at the last, and only when held-out rows were given)",
}


def learn_dictionary(
    data: Tensor | Iterable[Tensor],
    n_atoms: int,
    k: int,
    *,
    process_group=None,
    callback=None,
    heldout: Tensor | None = None,
    **options,
) -> Dictionary:
    """Learn a dictionary of ``n_atoms`` unit-norm atoms for ``k``-sparse codes of ``data``.

    Args:
        data: a (n, d) tensor, or an iterable of (b, d) tensors (re-iterated once per epoch; each pass must
            yield the same batches for resume to be exact), e.g. an activation-store reader.
        n_atoms: K.
        k: non-zeros per sample.
        process_group: a ``torch.distributed`` process group for a data-parallel fit (every rank calls with the
            same data; each codes its share of every batch); None: one process.
        callback: called as ``callback(iteration, record, dictionary_atoms)`` after every iteration.
        heldout: ``(m, d)`` held-out rows: their FVU under the dictionary as it stands is measured after the
            iterations :func:`~pipeline.utils.curves.on_log_grid` names and after the last, off the learner's
            clock, and recorded as ``heldout_fvu`` in those iterations' history records.
        **options: any field of :class:`LearnerConfig`.

    Returns:
        the :class:`~pipeline.core.dictionary.Dictionary` (on the fitting device), with its per-iteration history.
    """
    return fit_dictionary(
        data,
        LearnerConfig.from_options(n_atoms, k, **options),
        process_group=process_group,
        callback=callback,
        heldout=heldout,
    )


def fit_dictionary(
    data: Tensor | Iterable[Tensor],
    cfg: LearnerConfig,
    *,
    process_group=None,
    callback=None,
    heldout: Tensor | None = None,
) -> Dictionary:
    """:func:`learn_dictionary` with its options as one typed :class:`LearnerConfig` (what the fit stage builds
    from the ``dictionary`` config node)."""
    n_atoms, k = cfg.n_atoms, cfg.coder.k
    comm = collective(process_group)
    source = BatchSource(data, cfg, comm)
    cfg.validate(source.d)
    if comm.distributed and cfg.rank1_solver == "gram" and not cfg.approximate:
        raise ValueError(
            "rank1_solver='gram' forms sample-by-sample Gram matrices, which a data-parallel fit "
            "cannot; use rank1_solver='direct' (the default)."
        )
    device = source.device
    if cfg.coder.kernel == "numba" and (comm.distributed or device.type != "cpu"):
        where = "a data-parallel fit" if comm.distributed else f"a fit on {device.type}"
        raise ValueError(
            f"coder.kernel = 'numba' forces the compiled CPU loops, and {where} cannot run them all "
            "(the compiled atom update is for one process on CPU); use coder.kernel='auto', which "
            "compiles what it can and runs the rest with torch."
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    groups = matryoshka_groups(n_atoms, k, cfg.matryoshka) if cfg.matryoshka is not None else None
    atom_batch = cfg.atom_batch_size or max(1, n_atoms // 128)

    state = load_checkpoint(cfg, device) if cfg.resume else None
    if state is not None:
        D, centre = state["atoms"], state["centre"]
        history, it, epoch, batch_pos = state["history"], state["iteration"], state["epoch"], state["batch_pos"]
        gen.set_state(state["generator"])
        elapsed0 = history[-1]["seconds"] if history else 0.0
        log.info("resuming from %s at iteration %d", cfg.checkpoint_path, it)
    else:
        first = source.first_batch()
        centre = source.mean(first) if cfg.center else None
        D = _init_atoms(first if centre is None else first - centre, n_atoms, cfg.init, gen)
        history, it, epoch, batch_pos, elapsed0 = [], 0, 0, 0, 0.0
    G = gram(D, cfg.coder.precision)
    t0 = time.perf_counter() - elapsed0
    eval_seconds = 0.0
    bar = tqdm(total=cfg.max_iters, initial=it, disable=not (cfg.progress and comm.is_main), desc="DB-KSVD", unit="it")
    stop = _stop_reason(cfg, history, it, epoch, 0.0)
    while stop is None:
        for Yb in source.epoch(epoch, skip=batch_pos):
            Yb = Yb if centre is None else Yb - centre
            rec = _iteration(Yb, D, G, cfg, groups, atom_batch, gen, comm)
            G = rec.pop("G")
            it += 1
            batch_pos += 1
            rec.update(iteration=it, epoch=epoch, seconds=_agreed(comm, time.perf_counter() - t0, device))
            history.append(rec)
            bar.update(1)
            bar.set_postfix(fvu=f"{rec['fvu']:.4f}", l0=f"{rec['l0']:.1f}", dead=f"{rec['dead_fraction']:.3f}")
            if rec["rank1_capped"] and comm.is_main:
                log.warning(
                    "iteration %d: %d rank-1 refits stopped at rank1_max_iters=%d before rank1_tol=%g "
                    "(their objective still improved); raise rank1_max_iters for exact refits",
                    it,
                    rec["rank1_capped"],
                    cfg.rank1_max_iters,
                    cfg.rank1_tol,
                )
            if callback is not None:
                callback(it, rec, D)
            stop = _stop_reason(cfg, history, it, epoch, rec["seconds"])
            if heldout is not None and (on_log_grid(it) or stop is not None):
                start = time.perf_counter()
                rec["heldout_fvu"] = _heldout_fvu(D, centre, groups, cfg, heldout)
                t0 += time.perf_counter() - start  # evaluation is not fitting: off the clock
                eval_seconds += time.perf_counter() - start
            if cfg.checkpoint_path and comm.is_main and (it % cfg.checkpoint_every == 0 or stop is not None):
                save_checkpoint(cfg, D, centre, history, it, epoch, batch_pos, gen)
            if stop is not None:
                break
        else:
            epoch += 1
            batch_pos = 0
            stop = _stop_reason(cfg, history, it, epoch, _agreed(comm, time.perf_counter() - t0, device))
            if cfg.checkpoint_path and comm.is_main:
                save_checkpoint(cfg, D, centre, history, it, epoch, batch_pos, gen)
    bar.close()
    if heldout is not None and history and "heldout_fvu" not in history[-1]:  # stopped at an epoch's end
        history[-1]["heldout_fvu"] = _heldout_fvu(D, centre, groups, cfg, heldout)
    log.info("DB-KSVD stopped after %d iterations: %s", it, stop)
    meta = {
        "learner": {k_: v for k_, v in asdict(cfg).items() if k_ not in ("progress",)},
        "stop_reason": stop,
        "iterations": it,
        "atom_batch_size": atom_batch,
        "ranks": comm.world,
        "heldout_eval_seconds": eval_seconds,
    }
    if groups is not None:
        meta["group_atom_batch_sizes"] = [group_atom_batch(atom_batch, g, n_atoms, cfg.matryoshka_loop) for g in groups]
    return Dictionary(D, _eval_coder(cfg), centre, groups, history, meta)


# ----------------------------------------------------------------------------------------------------------
# one iteration
# ----------------------------------------------------------------------------------------------------------


def _iteration(
    Yb: Tensor,
    D: Tensor,
    G: Tensor,
    cfg: LearnerConfig,
    groups: list[Group] | None,
    atom_batch: int,
    gen: torch.Generator,
    comm: Collective = LOCAL,
) -> dict[str, Any]:
    """Code one sample batch (this rank's share of it), update the atoms in place, re-seed; returns the
    iteration record + new G."""
    coder = cfg.coder.kwargs() | dict(chunk_size=cfg.chunk_size, validate=False)
    update = dict(
        nonnegative=cfg.coder.nonnegative,
        tol=cfg.rank1_tol,
        max_iters=cfg.rank1_max_iters,
        approximate=cfg.approximate,
        solver=cfg.rank1_solver,
        generator=gen,
        comm=comm,
        kernel=cfg.coder.kernel,
    )
    clock = _Clock(D.device)
    n_rows, denom = _rows_and_energy(Yb, comm)
    usage = torch.zeros(D.shape[0], device=D.device)
    err_before, iters = None, []
    l0, l0_after = torch.zeros(Yb.shape[0], device=D.device), torch.zeros(Yb.shape[0], device=D.device)
    capped = eigensolved = lanczos = 0
    reseeded = torch.zeros(D.shape[0], dtype=torch.bool, device=D.device)

    def refit(R: Tensor, atoms: Tensor, codes: Codes, batch: int, used: Tensor) -> None:
        """Update ``atoms`` (a view of D) against ``R`` and tally its statistics into this iteration's record."""
        nonlocal capped, eigensolved, lanczos
        stats = update_atoms(R, atoms, codes, batch, **update)
        iters.append(stats.mean_rank1_iters)
        capped, eigensolved = capped + stats.capped, eigensolved + stats.eigensolved
        lanczos += stats.lanczos
        _count_usage(used, codes, comm)
        l0_after.add_(codes.l0())

    if groups is not None and cfg.matryoshka_loop == "reference":
        codes = encode(Yb, D, cfg.coder.k, G=G, **coder)  # KSVD.jl codes with every atom before its loop
        # its groups' coder is the full one with only max_nnz changed (ksvd_loop.jl), so the step cap stays 4 k
        recoder = coder | dict(max_iter=cfg.coder.max_iter or 4 * cfg.coder.k)
        err_before = _total(comm, (Yb - codes.decode(D)).pow(2).sum())
        l0 += codes.l0()
        clock.lap("code")
        R = Yb
        for g in groups:  # update g with its share of the codes, re-seed, re-code g on what groups < g left
            Dg = D[g.start : g.end]  # a view: updated and re-seeded in place
            part = _group_share(codes, g)
            Rg = R - part.decode(Dg)
            refit(Rg, Dg, part, group_atom_batch(atom_batch, g, D.shape[0], "reference"), usage[g.start : g.end])
            dead_g = usage[g.start : g.end] == 0
            if cfg.reseed is not None and bool(dead_g.any()):
                _reseed(Dg, dead_g, Rg, cfg.reseed, gen, comm)
                reseeded[g.start : g.end] = dead_g
            clock.lap("update")
            budget = min(g.budget, Dg.shape[0], Dg.shape[1])
            recoded = encode(R, Dg, budget, G=gram(Dg, cfg.coder.precision), **recoder)
            R = R - recoded.decode(Dg)
            clock.lap("code")
    elif groups is None:
        codes = encode(Yb, D, cfg.coder.k, G=G, **coder)
        R = Yb - codes.decode(D)
        err_before = _total(comm, R.pow(2).sum())
        l0 += codes.l0()
        clock.lap("code")
        refit(R, D, codes, atom_batch, usage)
        clock.lap("update")
    else:  # residual cascade: code group g on what groups < g left, update it, move on
        R = Yb
        for g in groups:
            Dg = D[g.start : g.end]  # a view: updated in place
            codes = encode(
                R, Dg, min(g.budget, Dg.shape[0], Dg.shape[1]), G=G[g.start : g.end, g.start : g.end], **coder
            )
            R = R - codes.decode(Dg)
            l0 += codes.l0()
            clock.lap("code")
            refit(R, Dg, codes, group_atom_batch(atom_batch, g, D.shape[0], "cascade"), usage[g.start : g.end])
            clock.lap("update")
    err_after = _total(comm, R.pow(2).sum())
    clock.lap("update")
    dead = usage == 0
    n_dead = int(dead.sum())
    G = gram(D, cfg.coder.precision)
    n_dup = 0
    if cfg.duplicate_threshold is not None:
        dup = _duplicates(G, usage, cfg.duplicate_threshold)
        n_dup = int(dup.sum())
        dead = dead | dup
    dead = dead & ~reseeded  # the reference loop re-seeded its groups' dead atoms already
    if cfg.reseed is not None and bool(dead.any()):
        _reseed(D, dead, R, cfg.reseed, gen, comm)
        # recomputed whole (not patched): G must be a function of D alone, so a resumed fit sees the same G
        G = gram(D, cfg.coder.precision)
    clock.lap("reseed")
    fvu_after = err_after / denom
    # a cascade interleaves coding and updating, so its only error is the one after the updates
    fvu = fvu_after if err_before is None else err_before / denom
    l0_sum, l0_after_sum = comm.sum(l0.float().sum().reshape(1), l0_after.float().sum().reshape(1))
    return dict(
        **clock.seconds,
        fvu=fvu,
        fvu_after_update=fvu_after,
        l0=float(l0_sum) / n_rows,
        l0_after_update=float(l0_after_sum) / n_rows,
        dead_fraction=n_dead / D.shape[0],
        n_duplicates=n_dup,
        rank1_iters=sum(iters) / len(iters),
        rank1_capped=capped,
        rank1_eigensolved=eigensolved,
        rank1_lanczos=lanczos,
        rows=n_rows,
        G=G,
    )


def _rows_and_energy(Yb: Tensor, comm: Collective) -> tuple[int, float]:
    """Rows of the whole batch (all ranks) and its centred energy ``Σ‖y − ȳ‖²`` (the FVU's denominator)."""
    if not comm.distributed:
        return int(Yb.shape[0]), float((Yb - Yb.mean(0)).pow(2).sum().clamp(min=1e-30))
    count = torch.tensor([float(Yb.shape[0])], dtype=torch.float64, device=Yb.device)
    total, count = comm.sum(Yb.sum(0, dtype=torch.float64), count)
    mean = (total / count).to(Yb.dtype)
    return int(count.item()), _total(comm, (Yb - mean).pow(2).sum(), floor=1e-30)


def _total(comm: Collective, local: Tensor, floor: float | None = None) -> float:
    """A scalar summed over ranks (optionally clamped below at ``floor``)."""
    total = comm.sum(local.reshape(1))
    return float(total.clamp(min=floor) if floor is not None else total)


def _agreed(comm: Collective, seconds: float, device: torch.device) -> float:
    """The learner clock every rank uses: the slowest rank's, so time-budget stops are taken together."""
    if not comm.distributed:
        return seconds
    return float(comm.max(torch.tensor([seconds], dtype=torch.float64, device=device)))


def _group_share(codes: Codes, group: Group) -> Codes:
    """The entries of ``codes`` (global atom ids) on ``group``'s atoms, with ids local to the group; the other
    slots are emptied (index 0, value 0)."""
    inside = (codes.indices >= group.start) & (codes.indices < group.end) & (codes.values != 0)
    return Codes(
        torch.where(inside, codes.indices - group.start, torch.zeros_like(codes.indices)),
        torch.where(inside, codes.values, torch.zeros_like(codes.values)),
    )


def group_atom_batch(atom_batch: int, group: Group, n_atoms: int, loop: str = "cascade") -> int:
    """The atom-batch size for one Matryoshka group under ``loop`` (:attr:`LearnerConfig.matryoshka_loop`).

    "cascade" (ours): the dictionary's, scaled by the group's share of the atoms (a 16-atom batch on K = 2048
    is a 2-atom batch on a 256-atom group), so every group is refitted with the same degree of parallelism
    (Jacobi batches that are a large fraction of a group converge worse). "reference": the dictionary's in every
    group, at most the group's size, as KSVD.jl cuts every ``ksvd_update`` call into batches of its thread count
    (``ksvd_update_threaded_utils.jl``), whatever the group's size."""
    size = group.end - group.start
    if loop == "reference":
        return max(1, min(atom_batch, size))
    return max(1, round(atom_batch * size / n_atoms))


class _Clock:
    """Per-phase wall time of an iteration (synchronising CUDA so the phases are real)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self.t = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, phase: str) -> None:
        now = self._now()
        key = f"{phase}_seconds"
        self.seconds[key] = self.seconds.get(key, 0.0) + now - self.t
        self.t = now


def _count_usage(usage: Tensor, codes: Codes, comm: Collective = LOCAL) -> None:
    """Add to ``usage: (K,)`` how many samples (of all ranks) use each atom."""
    counts = torch.zeros_like(usage).index_add_(0, codes.indices.reshape(-1), (codes.values.reshape(-1) != 0).float())
    usage.add_(comm.sum(counts))


def _duplicates(G: Tensor, usage: Tensor, threshold: float) -> Tensor:
    """Atoms to replace: of each pair with |cos| > threshold, the less used one (ties: the later index)."""
    A = G.abs()
    A.fill_diagonal_(0)
    best, partner = A.max(dim=1)
    K = G.shape[0]
    ids = torch.arange(K, device=G.device)
    less_used = (usage < usage[partner]) | ((usage == usage[partner]) & (ids > partner))
    return (best > threshold) & less_used


def _reseed(D: Tensor, mask: Tensor, R: Tensor, how: str, gen: torch.Generator, comm: Collective = LOCAL) -> None:
    """Give the atoms in ``mask`` new directions: worst-reconstructed residuals (of all ranks) or random."""
    ids = mask.nonzero().squeeze(1)
    m = int(ids.numel())
    if how == "worst":
        new = _worst_residuals(R, m, comm)
        take = int(new.shape[0])
        if take < m:
            new = torch.cat([new, torch.randn(m - take, D.shape[1], generator=gen).to(D)])
    else:
        new = torch.randn(m, D.shape[1], generator=gen).to(D)
    D[ids] = new / new.norm(dim=1, keepdim=True).clamp(min=1e-30)


def _worst_residuals(R: Tensor, m: int, comm: Collective) -> Tensor:
    """(≤ m, d) the non-zero rows of the residual ``R`` with the largest norms, largest first; data parallel,
    over every rank's rows (each rank offers its own m worst, every rank picks the same m of them)."""
    err = R.pow(2).sum(dim=1)
    if not comm.distributed:
        take = min(m, int((err > 0).sum()))
        return R[err.topk(take).indices] if take > 0 else R[:0]
    local = min(m, int(err.numel()))
    vals, rows = err.topk(local)
    offer_vals = torch.full((m,), -1.0, dtype=err.dtype, device=err.device)
    offer_vals[:local] = vals
    offer_rows = torch.zeros(m, R.shape[1], dtype=R.dtype, device=R.device)
    offer_rows[:local] = R[rows]
    all_vals = torch.cat(comm.all_gather(offer_vals))
    all_rows = torch.cat(comm.all_gather(offer_rows))
    take = min(m, int((all_vals > 0).sum()))
    return all_rows[all_vals.topk(take).indices] if take > 0 else R[:0]


def _init_atoms(Y: Tensor, n_atoms: int, how: str, gen: torch.Generator) -> Tensor:
    d = Y.shape[1]
    if how == "uniform":
        D = torch.rand(n_atoms, d, generator=gen) - 0.5
    else:
        rows = torch.randperm(Y.shape[0], generator=gen)[:n_atoms].to(Y.device)
        D = Y[rows].float().cpu()
        zero = D.norm(dim=1) == 0
        if bool(zero.any()):
            D[zero] = torch.rand(int(zero.sum()), d, generator=gen) - 0.5
    D = D.to(Y.device, torch.float32)
    return D / D.norm(dim=1, keepdim=True)


def _heldout_fvu(D: Tensor, centre: Tensor | None, groups, cfg: LearnerConfig, Y: Tensor) -> float:
    """Held-out FVU of ``Y: (m, d)`` under atoms ``D: (K, d)`` coded as the finished dictionary will code it."""
    return Dictionary(D, _eval_coder(cfg), centre, groups, [], {}).fvu(Y.to(D.device))


def _eval_coder(cfg: LearnerConfig):
    """The coder settings a fitted dictionary encodes with: the fit's, with ``eval_refit`` when it is set."""
    return cfg.coder if cfg.eval_refit is None else replace(cfg.coder, refit=cfg.eval_refit)


def _stop_reason(cfg: LearnerConfig, history: list[dict], it: int, epoch: int, seconds: float) -> str | None:
    if cfg.max_iters is not None and it >= cfg.max_iters:
        return f"max_iters={cfg.max_iters}"
    if cfg.epochs is not None and epoch >= cfg.epochs:
        return f"epochs={cfg.epochs}"
    if cfg.time_budget is not None and seconds >= cfg.time_budget:
        return f"time_budget={cfg.time_budget}s"
    if cfg.tol is not None and len(history) > cfg.patience:
        old = min(h["fvu"] for h in history[: -cfg.patience])
        new = min(h["fvu"] for h in history[-cfg.patience :])
        if old - new < cfg.tol * max(old, 1e-12):
            return f"converged (FVU improved < {cfg.tol:g} over {cfg.patience} iterations)"
    return None


__all__ = ["fit_dictionary", "learn_dictionary", "LearnerConfig", "PAPER_SCHEDULE"]
