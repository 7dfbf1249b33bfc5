"""One pass of an SAE over the harvest store's rows: every non-zero code, and where each row sits in the text.

The store's shards keep their rows' token ids (:class:`~pipeline.data.store.ShardTokens`), so the contexts a
latent fires on come from the harvest itself: no second forward pass of the language model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.data.store import ActivationStore

log = logging.getLogger(__name__)

#: Order in which the store's splits are read (the held-out rows, never seen by a fit, first).
READ_ORDER = ("heldout", "train")


@dataclass
class StoreText:
    """The text behind ``n`` store rows: row ``i`` is token ``pos[i]`` of context ``ctx[i]``."""

    token_ids: torch.Tensor
    """(C, L) int64: the token ids of the contexts the rows come from."""
    ctx: torch.Tensor
    """(n,) int64: each row's context, a row index into ``token_ids``."""
    pos: torch.Tensor
    """(n,) int64: each row's position in its context."""

    @property
    def n_rows(self) -> int:
        return len(self.ctx)

    @property
    def context_length(self) -> int:
        return int(self.token_ids.shape[1])


def read_store_text(store: ActivationStore, max_rows: int) -> tuple[torch.Tensor, StoreText]:
    """The first ``max_rows`` rows of the store (held-out, then train) as ``(n, d)`` in the store dtype, with their
    text.

    ``ValueError`` when the store keeps no token ids (an imported array)."""
    if not store.has_tokens():
        raise ValueError(
            f"the store at {store.path} keeps no token ids (an imported array, or a harvest older than "
            "the dashboards); re-harvest it with `python -m pipeline stage=harvest` in a fresh "
            "output folder to get dashboards"
        )
    rows, ids, ctx, pos, n, n_ctx = [], [], [], [], 0, 0
    for split in READ_ORDER:
        for shard in store.shards(split):
            if n >= max_rows:
                break
            x, t = store.read_with_tokens(shard)
            x = x[: max_rows - n]
            L = t.token_ids.shape[1]
            p = t.positions[: len(x)]
            rows.append(x)
            ids.append(t.token_ids.long())
            ctx.append(p // L + n_ctx)
            pos.append(p % L)
            n, n_ctx = n + len(x), n_ctx + len(t.token_ids)
    if n == 0:
        raise ValueError(f"the store at {store.path} has no rows")
    return torch.cat(rows), StoreText(torch.cat(ids), torch.cat(ctx), torch.cat(pos))


@dataclass
class SparseCodes:
    """An SAE's non-zero codes over ``n_rows`` rows, sorted by latent (COO)."""

    latent: torch.Tensor
    """(nnz,) int64, ascending."""
    row: torch.Tensor
    """(nnz,) int64."""
    value: torch.Tensor
    """(nnz,) float32."""
    width: int
    """Number of latents."""
    n_rows: int

    def __post_init__(self) -> None:
        self.count = torch.bincount(self.latent, minlength=self.width)
        """(width,) how many rows each latent fires on."""
        self._start = torch.cat([torch.zeros(1, dtype=torch.long), self.count.cumsum(0)])

    def of(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent ``j``'s ``(rows, values)``."""
        lo, hi = int(self._start[j]), int(self._start[j + 1])
        return self.row[lo:hi], self.value[lo:hi]


@torch.no_grad()
def encode_rows(
    sae: Any, x: torch.Tensor, *, batch_size: int, device: str, progress: bool = True, name: str = ""
) -> SparseCodes:
    """Encode ``x: (n, d)`` with ``sae.encode`` in batches on ``device``; keep the non-zeros."""
    width = int(sae.cfg.d_sae)
    dtype = next((p.dtype for p in sae.parameters()), torch.float32) if hasattr(sae, "parameters") else torch.float32
    lat, row, val = [], [], []
    for b in tqdm(range(0, len(x), batch_size), desc=f"encode {name}", disable=not progress, leave=False):
        codes = sae.encode(x[b : b + batch_size].to(device=device, dtype=dtype)).float().cpu()  # (B, width)
        r, j = codes.nonzero(as_tuple=True)
        lat.append(j)
        row.append(r + b)
        val.append(codes[r, j])
    latent, order = torch.cat(lat).sort(stable=True)
    return SparseCodes(latent, torch.cat(row)[order], torch.cat(val)[order], width, len(x))
