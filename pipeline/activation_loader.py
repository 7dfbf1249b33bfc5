"""Shuffled, prefetched batches from an :class:`~pipeline.activation_store.ActivationStore`.

Each epoch visits every row of the split exactly once. Shuffling is two-level and seeded by
``(seed, epoch)``: the shard order is permuted, shards are read ``shuffle_shards`` at a time into a buffer
(plus the rows left over from the previous buffer), and batches are drawn from a random permutation of that
buffer. A background thread reads (and checksums) shards and moves batches to the target device while the
consumer computes, keeping ``prefetch`` batches ready.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .activation_store import ActivationStore

_DONE = object()


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
    """

    def __init__(self, store: "ActivationStore", batch_size: int, *, split: str = "train", shuffle: bool = True,
                 seed: int = 0, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 prefetch: int = 4, shuffle_shards: int = 4, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if shuffle_shards < 1:
            raise ValueError(f"shuffle_shards={shuffle_shards} must be >= 1")
        self.store, self.batch_size, self.split = store, batch_size, split
        self.shuffle, self.seed, self.dtype = shuffle, seed, dtype
        self.device = torch.device(device or "cpu")
        self.prefetch, self.shuffle_shards, self.drop_last = prefetch, shuffle_shards, drop_last
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

    def epoch_batches(self, epoch: int) -> Iterator[torch.Tensor]:
        """The batches of epoch ``epoch`` (deterministic given seed and epoch)."""
        if self.prefetch <= 0:
            yield from self._produce(epoch)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for batch in self._produce(epoch):
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

    def _produce(self, epoch: int) -> Iterator[torch.Tensor]:
        shards = self.store.shards(self.split)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(shards)) if self.shuffle else np.arange(len(shards))
        carry = torch.empty(0, self.d, dtype=self.store.dtype)
        b = self.batch_size
        for g in range(0, len(order), self.shuffle_shards):
            parts = [carry] + [self.store.read_shard(shards[i]) for i in order[g:g + self.shuffle_shards]]
            buf = torch.cat(parts) if len(parts) > 1 else parts[0]
            perm = torch.from_numpy(rng.permutation(len(buf))) if self.shuffle else torch.arange(len(buf))
            last = g + self.shuffle_shards >= len(order)
            n_full = len(buf) if last else len(buf) // b * b
            for s in range(0, n_full, b):
                idx = perm[s:min(s + b, n_full)]
                if last and len(idx) < b and self.drop_last:
                    break
                yield self._to_target(buf[idx])
            carry = buf[perm[n_full:]]

    def _to_target(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.to(device=self.device, dtype=self.dtype)
