"""The data provider sae-lens's trainer reads: our activations as endless ``(batch_size, d)`` float32 batches.

``data`` is what :func:`pipeline.core.learner.learn_dictionary` takes: an ``(n, d)`` tensor (shuffled afresh
each epoch by a seeded permutation) or a re-iterable of ``(b, d)`` batches such as an
:class:`~pipeline.data.loader.ActivationLoader` (each ``iter()`` is an epoch, in its own order). Batches of any
size are re-batched to exactly ``batch_size`` rows; the rows left over at the end of an epoch open the next one,
so every row is used once per epoch and every optimiser step sees a full batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

#: Rows averaged for ``b_dec_init = "mean"`` when ``data`` is streamed (a tensor is averaged whole).
MEAN_ROWS = 2**16


def training_batches(
    data: Tensor | Iterable[Tensor], d_in: int, batch_size: int, seed: int, device: torch.device
) -> Iterator[Tensor]:
    """Endless ``(batch_size, d_in)`` float32 batches of ``data`` on ``device``, epoch after epoch."""
    carry: Tensor | None = None
    epoch = 0
    while True:
        rows = 0
        for chunk in _epoch_chunks(data, seed, epoch, batch_size):
            chunk = _check_chunk(chunk, d_in).to(device, torch.float32)
            rows += chunk.shape[0]
            if carry is not None:
                chunk, carry = torch.cat([carry, chunk]), None
            full = chunk.shape[0] // batch_size * batch_size
            for s in range(0, full, batch_size):
                yield chunk[s : s + batch_size]
            if full < chunk.shape[0]:
                carry = chunk[full:]
        if rows == 0:
            raise ValueError(
                "the training data yielded no rows in an epoch: a one-shot iterator (e.g. a generator) "
                "runs dry after one pass; pass an (n, d) tensor or a re-iterable such as an "
                "ActivationLoader, or a budget within one pass."
            )
        epoch += 1


@torch.no_grad()
def data_mean(data: Tensor | Iterable[Tensor], d_in: int, device: torch.device) -> Tensor:
    """``(d_in,)`` mean of ``data``: of every row of a tensor, else of its first :data:`MEAN_ROWS` streamed rows
    (accumulated in float64)."""
    total = torch.zeros(d_in, dtype=torch.float64, device=device)
    n = 0
    if isinstance(data, Tensor):
        _check_chunk(data, d_in)
        chunks: Iterable[Tensor] = (data[s : s + MEAN_ROWS] for s in range(0, data.shape[0], MEAN_ROWS))
    else:
        chunks = data
    for chunk in chunks:
        chunk = _check_chunk(chunk, d_in)
        total += chunk.to(device, torch.float64).sum(0)
        n += chunk.shape[0]
        if not isinstance(data, Tensor) and n >= MEAN_ROWS:
            break
    if n == 0:
        raise ValueError("the training data has no rows.")
    return (total / n).float()


def _epoch_chunks(data: Tensor | Iterable[Tensor], seed: int, epoch: int, batch_size: int) -> Iterator[Tensor]:
    if isinstance(data, Tensor):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(data.shape[0], generator=g).to(data.device)
        for s in range(0, data.shape[0], batch_size):
            yield data[perm[s : s + batch_size]]
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _check_chunk(x: Tensor, d_in: int) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != d_in:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"training data must be (n, {d_in}) tensors (d_in = {d_in}), got {shape}.")
    return x


__all__ = ["MEAN_ROWS", "data_mean", "training_batches"]
