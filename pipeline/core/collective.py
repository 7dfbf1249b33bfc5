"""Sums over samples across data-parallel ranks: the learner's only contact with ``torch.distributed``.

In a data-parallel fit every rank codes its own disjoint shard of each sample batch; every quantity the
algorithm needs that is a sum over samples (the refits' ``Eᵀx``, Rayleigh quotients and energies, atom usage,
errors, the re-seeding candidates, the convergence test's inputs) goes through a :class:`Collective`, so N ranks
compute what one process computes on the union of their shards, up to floating-point summation order. Every
decision (when a refit stops, which atoms are dead, when the fit stops) is taken from reduced values, which an
all-reduce gives every rank bit for bit, so all ranks take the same branch and call the same collectives.

- :class:`Collective`: the single-process one: every reduction is the identity (no copies, no cost);
- :class:`ProcessGroupCollective`: a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs); it counts
  the calls, the bytes it reduces and the wall time spent in them (the communication benchmark reads them; on
  CUDA the time is the host's, not the stream's).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor


class RankPlace:
    """A process's place among ``world`` data-parallel ranks."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Whether this rank writes files, shows progress and logs per-iteration lines (rank 0)."""
        return self.rank == 0


class Collective(RankPlace):
    """One process: sums over samples are already complete, so every reduction returns its input."""

    def sum(self, *tensors: Tensor) -> tuple[Tensor, ...] | Tensor:
        """Element-wise sums over ranks of each tensor (one collective for all of them); returns new tensors
        (a single tensor when given one). Every rank gets the same bits."""
        return tensors[0] if len(tensors) == 1 else tensors

    def max(self, t: Tensor) -> Tensor:
        """Element-wise maximum over ranks."""
        return t

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's ``t`` (same shape and dtype on all ranks), in rank order."""
        return [t]

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` rows: rank r takes rows ``[r·n/W, (r+1)·n/W)``, so the shards,
        concatenated in rank order, are the rows in their order."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)


LOCAL = Collective()


class ProcessGroupCollective(Collective):
    """The collectives of a ``torch.distributed`` process group (the default group when ``group`` is None).

    Tensors must live where the backend works: CUDA for NCCL, CPU (or CUDA) for gloo.
    """

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "a data-parallel fit needs an initialised torch.distributed process group: launch with "
                "torchrun (the fit stage initialises it), or call torch.distributed.init_process_group "
                "before fitting."
            )
        self.dist, self.group = dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.calls = 0
        self.bytes = 0
        self.seconds = 0.0

    def _all_reduce(self, flat: Tensor, op) -> Tensor:
        t = time.perf_counter()
        self.dist.all_reduce(flat, op=op, group=self.group)
        self._count(flat.numel() * flat.element_size(), t)
        return flat

    def _count(self, nbytes: int, t: float) -> None:
        self.calls += 1
        self.bytes += nbytes
        self.seconds += time.perf_counter() - t

    def sum(self, *tensors: Tensor) -> tuple[Tensor, ...] | Tensor:
        if len(tensors) == 1:
            out = self._all_reduce(tensors[0].detach().clone().contiguous(), self.dist.ReduceOp.SUM)
            return out
        dtype = tensors[0].dtype
        if any(t.dtype != dtype or t.device != tensors[0].device for t in tensors):
            raise ValueError("Collective.sum of several tensors needs one dtype and device for all of them.")
        flat = self._all_reduce(torch.cat([t.reshape(-1) for t in tensors]), self.dist.ReduceOp.SUM)
        out, at = [], 0
        for t in tensors:
            out.append(flat[at : at + t.numel()].view(t.shape))
            at += t.numel()
        return tuple(out)

    def max(self, t: Tensor) -> Tensor:
        return self._all_reduce(t.detach().clone().contiguous(), self.dist.ReduceOp.MAX)

    def all_gather(self, t: Tensor) -> list[Tensor]:
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        start = time.perf_counter()
        self.dist.all_gather(out, t, group=self.group)
        self._count(t.numel() * t.element_size() * self.world, start)
        return out


def collective(process_group=None) -> Collective:
    """The collective for a fit: :data:`LOCAL` for None (one process), the group's for a ``torch.distributed``
    process group (e.g. ``torch.distributed.group.WORLD``), or a :class:`Collective` as given (another transport).
    Never guessed from an initialised default group: a caller that fits one dictionary per rank must not have
    its data sharded behind its back."""
    if process_group is None:
        return LOCAL
    if isinstance(process_group, Collective):
        return process_group
    return ProcessGroupCollective(process_group)
