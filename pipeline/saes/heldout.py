"""Statistics of an SAE on held-out activations, and the coherence of its decoder: the numbers ``saes.json``
(and the fit stage's ``metrics.json``) record beside SAEBench's."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


@torch.no_grad()
def mean_max_abs_cos(W: Tensor, block: int = 4096) -> float:
    """Coherence of a decoder: the mean over rows of the largest |cosine| with any other row.

    ``W: (K, d)``, one atom per row (any norms: rows are normalised first, a zero row stays zero). Computed in
    blocks of ``block`` rows, so memory is ``(block, K)``. Returns a float in [0, 1].
    """
    W = W.float()
    W = W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)
    out = []
    for s in range(0, W.shape[0], block):
        c = (W[s : s + block] @ W.T).abs()
        rows = torch.arange(c.shape[0], device=W.device)
        c[rows, rows + s] = 0
        out.append(c.max(dim=1).values)
    return float(torch.cat(out).mean())


@torch.no_grad()
def heldout_stats(sae: Any, Y: Tensor, chunk: int = 4096) -> dict[str, float]:
    """L0, FVU and dead fraction of ``sae`` on held-out activations, and the coherence of its decoder.

    ``sae`` has ``encode: (n, d) -> (n, d_sae)`` and ``decode: (n, d_sae) -> (n, d)`` (an SAEBench SAE). A
    latent is used where its code is non-zero (either sign: a signed-form
    :class:`~pipeline.saes.dictionary_sae.DictionarySAE` has ``d_sae = K`` signed codes); a ± split one
    (``sae.split``, ``d_sae = 2K``) counts an atom as used when either half fires. A dictionary's coherence is
    over its K atoms (``sae.atoms``), not ``W_dec = [D; -D]``. Both forms of a signed dictionary give the same
    numbers.
    ``Y: (n, d)`` is encoded in chunks of ``chunk`` rows. Returns ``heldout_rows``, ``l0`` (mean non-zeros per
    row), ``fvu`` (‖Y − Ŷ‖² / ‖Y − mean(Y)‖²), ``dead_fraction`` (latents never non-zero) and
    ``mean_max_abs_cos``.
    """
    Y = Y.float()
    err, l0, used = 0.0, 0.0, None
    for s in range(0, Y.shape[0], chunk):
        y = Y[s : s + chunk]
        f = sae.encode(y)
        err += float((y - sae.decode(f)).pow(2).sum())
        l0 += float((f != 0).sum())
        u = (f != 0).any(dim=0)
        used = u if used is None else used | u
    var = float((Y - Y.mean(0)).pow(2).sum())
    W = getattr(sae, "atoms", sae.W_dec)
    if used is not None and getattr(sae, "split", False):
        K = used.shape[0] // 2
        used = used[:K] | used[K:]
    return {
        "heldout_rows": int(Y.shape[0]),
        "l0": l0 / max(Y.shape[0], 1),
        "fvu": err / max(var, 1e-30),
        "dead_fraction": float(1 - used.float().mean()) if used is not None else math.nan,
        "mean_max_abs_cos": mean_max_abs_cos(W),
    }
