"""The learner's sample batches: from a tensor (a seeded permutation per epoch, or the reference's fixed
contiguous batches, in row order or cut from one seeded permutation, ``shuffle_once``) or from any re-iterable of
``(b, d)`` batches, e.g. an activation-store loader.

Data parallel, every rank builds the same batches and keeps its contiguous share of each
(:meth:`~pipeline.core.collective.Collective.shard`); a loader whose ``epoch_batches(epoch, shard=...)`` takes
the share gathers only those rows. The first batch (atom init, centring) is read whole by every rank, so the
initial atoms are the single-process ones."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from pipeline.core.collective import LOCAL, Collective
from pipeline.core.learner_config import LearnerConfig
from pipeline.core.validation import check_samples
from pipeline.utils.devices import resolve_device

#: Offset of the ``shuffle_once`` permutation's seed from the per-epoch ones (``seed * 1_000_003 + epoch``).
_ONCE_STREAM = -1


class BatchSource:
    """Sample batches from a tensor (a seeded per-epoch permutation, or fixed consecutive batches with
    ``sample_order="contiguous"``, over one seeded permutation of the rows with ``shuffle_once``) or from a
    re-iterable of batches (in the order it yields them)."""

    def __init__(self, data: Tensor | Iterable[Tensor], cfg: LearnerConfig, comm: Collective = LOCAL):
        self.cfg, self.comm = cfg, comm
        self._once: Tensor | None = None
        self.tensor = data if isinstance(data, Tensor) else None
        self.iterable = None if isinstance(data, Tensor) else data
        if self.tensor is not None:
            check_samples(self.tensor, "data")
            if self.tensor.shape[0] < cfg.n_atoms:
                raise ValueError(
                    f"data has {self.tensor.shape[0]} samples, fewer than n_atoms = "
                    f"{cfg.n_atoms}; use more samples or fewer atoms."
                )
            self.d = self.tensor.shape[1]
            default = self.tensor.device if self.tensor.device.type != "cpu" else None
        else:
            if not isinstance(data, Iterable):
                raise ValueError(
                    f"data must be a (n, d) tensor or an iterable of (b, d) tensors, got {type(data).__name__}."
                )
            # a loader that knows its width (the store's) is not read ahead for it: a batch can be shards' worth
            self.d = getattr(data, "d", None) or self.first_batch().shape[1]
            default = None
        self.device = resolve_device(cfg.device or default)

    def first_batch(self) -> Tensor:
        if self.tensor is not None:
            rows = max(self.cfg.batch_size, self.cfg.n_atoms)
            order = self.fixed_order()
            first = self.tensor[:rows] if order is None else self.tensor[order[:rows].to(self.tensor.device)]
            return first.to(self._dev(), torch.float32)
        first = next(iter(self.iterable), None)
        if first is None:
            raise ValueError("data yielded no batches; check the activation store or iterable.")
        first = first[0] if isinstance(first, (tuple, list)) else first
        check_samples(first, "data batch")
        if first.shape[0] < self.cfg.n_atoms and self.cfg.init == "data":
            raise ValueError(
                f"the first batch has {first.shape[0]} samples, fewer than n_atoms = "
                f"{self.cfg.n_atoms}, so atoms cannot be initialised from data; use a larger batch "
                f"size or init='uniform'."
            )
        return first.to(self._dev(), torch.float32)

    def _dev(self) -> torch.device:
        return getattr(self, "device", None) or torch.device("cpu")

    def fixed_order(self) -> Tensor | None:
        """``(n,)`` the tensor's rows in the order the contiguous batches are cut from with ``shuffle_once`` (one
        permutation seeded by ``seed`` alone: every epoch, every rank and a resumed fit read the same), else None
        (row order)."""
        if self.tensor is None or self.cfg.sample_order != "contiguous" or not self.cfg.shuffle_once:
            return None
        if self._once is None:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + _ONCE_STREAM)
            self._once = torch.randperm(self.tensor.shape[0], generator=g)
        return self._once

    def mean(self, first: Tensor) -> Tensor:
        """(d,) the centre: the whole tensor's mean, or that of the ``first`` batch of an iterable."""
        if self.tensor is not None:
            return self.tensor.float().mean(0).to(self.device)
        return first.mean(0)

    def epoch(self, e: int, skip: int = 0) -> Iterator[Tensor]:
        """The batches of epoch ``e`` from batch ``skip`` on (this rank's share of each)."""
        mine = self.comm.shard
        if self.tensor is not None:
            n, bs = self.tensor.shape[0], self.cfg.batch_size
            if bs >= n:
                if skip == 0:
                    yield self.tensor[mine(n)].to(self.device, torch.float32)
                return
            if self.cfg.sample_order == "contiguous":  # the reference's fixed batches, a partial last one skipped
                order = self.fixed_order()
                for b in range(skip, n // bs):
                    if order is None:
                        yield self.tensor[b * bs : (b + 1) * bs][mine(bs)].to(self.device, torch.float32)
                    else:
                        idx = order[b * bs : (b + 1) * bs][mine(bs)].to(self.tensor.device)
                        yield self.tensor[idx].to(self.device, torch.float32)
                return
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + e)
            perm = torch.randperm(n, generator=g)
            n_batches = n // bs + (1 if n % bs >= bs // 2 else 0)
            for b in range(skip, n_batches):
                idx = perm[b * bs : (b + 1) * bs]
                idx = idx[mine(idx.numel())].to(self.tensor.device)
                yield self.tensor[idx].to(self.device, torch.float32)
            return
        # a loader that can replay a given epoch (e.g. ActivationLoader.epoch_batches) makes resume exact
        sliced_here = self.comm.distributed
        if hasattr(self.iterable, "epoch_batches"):
            if self.comm.distributed and "shard" in inspect.signature(self.iterable.epoch_batches).parameters:
                batches, sliced_here = self.iterable.epoch_batches(e, shard=mine), False
            else:
                batches = self.iterable.epoch_batches(e)
        else:
            batches = self.iterable
        for b, batch in enumerate(batches):
            if b < skip:
                continue
            batch = batch[0] if isinstance(batch, (tuple, list)) else batch
            check_samples(batch, "data batch", d=self.d)
            if sliced_here:
                batch = batch[mine(batch.shape[0])]
            yield batch.to(self.device, torch.float32)
