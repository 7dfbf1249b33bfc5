"""Shuffled, prefetched batches from an :class:`~pipeline.data.store.ActivationStore`.

Each epoch visits every row of the split exactly once. Shuffling is two-level and seeded by
``(seed, epoch)`` (``(seed, 0)`` in every epoch with ``reshuffle=False``): the shard order is permuted, shards
are read ``shuffle_shards`` at a time into a buffer (plus the rows left over from the previous buffer), and
batches are drawn from a random permutation of that buffer. Worker threads read (and checksum) the next shards
while a background thread gathers batches and moves them to the target device, keeping ``prefetch`` batches
ready while the consumer computes. With a CUDA target, shards travel to the GPU once in the store dtype and
batches are gathered and cast there.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.utils.devices import free_memory

_DONE = object()


class ShardedRows(Protocol):
    """What the loader reads: an :class:`~pipeline.data.store.ActivationStore`, named here by its methods so that
    the store (whose ``loader`` method builds an :class:`ActivationLoader`) is not imported back."""

    path: Path
    d: int
    dtype: torch.dtype

    def n_rows(self, split: str = "train") -> int: ...

    def shards(self, split: str = "train") -> list[dict[str, Any]]: ...

    def read_shard(self, shard: dict[str, Any]) -> torch.Tensor: ...

    def load_all(self, *args: Any, **kwargs: Any) -> torch.Tensor: ...


log = logging.getLogger(__name__)


class ActivationLoader:
    """Iterable over (b, d) batches; each ``iter()`` is the next epoch (reshuffled).

    ``epoch_batches(e)`` gives epoch ``e`` directly (deterministic), for callers that resume mid-fit.

    Args:
        store: the store to read.
        batch_size: rows per batch; the last batch of an epoch is smaller unless ``drop_last``.
        split: ``train`` or ``heldout``.
        shuffle: shuffle rows (else store order).
        seed: base seed; epoch ``e`` uses ``(seed, e)``.
        device: target device (``None``: cpu).
        dtype: dtype of the yielded batches (default float32).
        prefetch: batches kept ready by the background thread (0: no thread).
        shuffle_shards: shards mixed together per buffer (more = better mixing, more memory).
        drop_last: drop the final incomplete batch of each epoch.
        read_workers: threads reading + checksumming the next group's shards (up to two groups ahead).
        reshuffle: a new order every epoch; False: every epoch repeats epoch 0's (a store shuffled once, as the
            reference's file was written: ``LearnerConfig.shuffle_once``).
    """

    def __init__(
        self,
        store: ShardedRows,
        batch_size: int,
        *,
        split: str = "train",
        shuffle: bool = True,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        prefetch: int = 4,
        shuffle_shards: int = 4,
        drop_last: bool = False,
        read_workers: int = 2,
        reshuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if shuffle_shards < 1:
            raise ValueError(f"shuffle_shards={shuffle_shards} must be >= 1")
        self.store, self.batch_size, self.split = store, batch_size, split
        self.shuffle, self.reshuffle, self.seed, self.dtype = shuffle, reshuffle, seed, dtype
        self.device = torch.device(device or "cpu")
        self.prefetch, self.shuffle_shards, self.drop_last = prefetch, shuffle_shards, drop_last
        self.read_workers = max(1, read_workers)
        self.epoch = 0
        self.n_rows = store.n_rows(split)
        if self.n_rows == 0:
            raise ValueError(f"split {split!r} of {store.path} has no rows")

    @property
    def d(self) -> int:
        return self.store.d

    def __len__(self) -> int:
        div = self.n_rows / self.batch_size
        return math.floor(div) if self.drop_last else math.ceil(div)

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch = self.epoch
        self.epoch += 1
        return self.epoch_batches(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` yield epoch ``epoch`` (e.g. when resuming a fit mid-way)."""
        self.epoch = epoch

    def epoch_batches(self, epoch: int, shard: Callable[[int], slice] | None = None) -> Iterator[torch.Tensor]:
        """The batches of epoch ``epoch`` (deterministic given seed and epoch).

        ``shard``: for data-parallel readers, maps a batch's size to the slice of its rows this reader keeps
        (:meth:`pipeline.core.collective.Collective.shard`); only those rows are gathered and moved."""
        if self.prefetch <= 0:
            yield from self._produce(epoch, shard)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for batch in self._produce(epoch, shard):
                    while not stop.is_set():
                        try:
                            q.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(_DONE)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                q.put(exc)

        thread = threading.Thread(target=work, name="activation-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)

    def _produce(self, epoch: int, shard: Callable[[int], slice] | None = None) -> Iterator[torch.Tensor]:
        shards = self.store.shards(self.split)
        rng = np.random.default_rng([self.seed, epoch if self.reshuffle else 0])
        order = rng.permutation(len(shards)) if self.shuffle else np.arange(len(shards))
        # gather on the GPU when the target is one (the shards travel once, in the store dtype)
        work = self.device if self.device.type == "cuda" else torch.device("cpu")
        carry = torch.empty(0, self.d, dtype=self.store.dtype, device=work)
        b = self.batch_size
        # shards of the next group are read and checksummed by worker threads while this one is served
        pool = ThreadPoolExecutor(max_workers=self.read_workers, thread_name_prefix="shard-read")
        pending: deque = deque()
        upcoming = iter(order)

        def read_ahead() -> None:
            i = next(upcoming, None)
            if i is not None:
                pending.append(pool.submit(lambda s: self._to_work(self.store.read_shard(s), work), shards[i]))

        try:
            for _ in range(2 * self.shuffle_shards):
                read_ahead()
            for g in range(0, len(order), self.shuffle_shards):
                parts = [carry]
                for _ in order[g : g + self.shuffle_shards]:
                    parts.append(pending.popleft().result())
                    read_ahead()
                offsets = np.cumsum([0] + [len(p) for p in parts])
                n = int(offsets[-1])
                perm = rng.permutation(n) if self.shuffle else np.arange(n)
                part_of = np.searchsorted(offsets, perm, side="right") - 1
                local = perm - offsets[part_of]
                last = g + self.shuffle_shards >= len(order)
                n_full = n if last else n // b * b
                for s in range(0, n_full, b):
                    e = min(s + b, n_full)
                    if last and e - s < b and self.drop_last:
                        break
                    keep = slice(s, e) if shard is None else _within(slice(s, e), shard(e - s))
                    yield self._to_target(_gather(parts, part_of[keep], local[keep], work))
                carry = _gather(parts, part_of[n_full:], local[n_full:], work)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _to_work(x: torch.Tensor, work: torch.device) -> torch.Tensor:
        if work.type == "cuda":
            return x.pin_memory().to(work, non_blocking=True)
        return x

    def _to_target(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype)


def _within(outer: slice, inner: slice) -> slice:
    """``inner`` (a slice of the rows of ``outer``) as a slice of the whole."""
    return slice(outer.start + inner.start, outer.start + inner.stop)


def _gather(parts: list[torch.Tensor], part_of: np.ndarray, local: np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows ``parts[part_of[i]][local[i]]`` for every i, in order: (len(local), d)."""
    d, dtype = parts[-1].shape[1], parts[-1].dtype
    used = np.unique(part_of)
    if len(used) == 1:
        return parts[used[0]][torch.from_numpy(local).to(device)]
    out = torch.empty(len(local), d, dtype=dtype, device=device)
    for p in used:
        pos = np.flatnonzero(part_of == p)
        out[torch.from_numpy(pos).to(device)] = parts[p][torch.from_numpy(local[pos]).to(device)]
    return out


#: The store is fitted from memory when it takes at most this share of free memory, else streamed.
IN_MEMORY_SHARE = 0.25


def fits_in_memory(store: ShardedRows, device: torch.device, readers: int = 1) -> bool:
    """Whether the store's training rows take at most :data:`IN_MEMORY_SHARE` of ``device``'s free memory
    (on CPU, shared by ``readers`` processes of this machine loading it at once)."""
    need = store.n_rows() * store.d * 4
    share = IN_MEMORY_SHARE / (max(1, readers) if device.type == "cpu" else 1)
    return need <= share * free_memory(device)


def training_data(
    store: ShardedRows,
    batch_size: int,
    device: torch.device,
    seed: int,
    shuffle: bool = True,
    readers: int = 1,
    in_memory: bool | None = None,
    reshuffle: bool = True,
):
    """The store's training rows: one ``(n, d)`` tensor on ``device`` (in store order) when ``in_memory``, else a
    loader of full ``(batch_size, d)`` batches, shuffled every epoch (``reshuffle=False``: in epoch 0's order every
    epoch) or, with ``shuffle=False``, consecutive in store order. The two give different batches, so
    data-parallel ranks must pass one agreed ``in_memory``. ``in_memory=None``: decide here, by
    :func:`fits_in_memory` with ``readers`` (processes on this machine loading it at once into host memory, which
    they share)."""
    if in_memory is None:
        in_memory = fits_in_memory(store, device, readers)
    if in_memory:
        return store.load_all(device=device)
    log.info("streaming the store (%.1f GB)", store.n_rows() * store.d * 4 / 1e9)
    return ActivationLoader(
        store, batch_size, seed=seed, device=device, drop_last=True, shuffle=shuffle, reshuffle=reshuffle
    )
