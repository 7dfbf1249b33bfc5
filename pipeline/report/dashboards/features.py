"""What a dashboard shows of one latent, computed from an SAE's codes over the store (:mod:`.collect`)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.report.dashboards.collect import SparseCodes, StoreText
from pipeline.report.dashboards.config import DashboardsConfig

#: Why a latent was drawn, in the order the page lists them.
REASONS = ("most used", "autointerp", "included", "random")


@dataclass
class Context:
    """A window of text around one activating token."""

    tokens: list[tuple[str, float]]
    """(token text, this latent's activation there; 0 where it is silent or the position was not stored)."""
    focus: int
    """Index in ``tokens`` of the activating token."""
    value: float
    """The latent's activation on it."""
    where: tuple[int, int] = (0, 0)
    """(context, position) of the activating token among the rows read."""


@dataclass
class LatentView:
    """Everything one latent's dashboard card shows."""

    index: int
    reason: str
    count: int
    """Rows it fires on."""
    frequency: float
    """``count`` / rows read."""
    max_value: float
    mean_value: float
    histogram: list[tuple[float, float, int]]
    """(lower edge, upper edge, rows) of its non-zero activations."""
    top: list[Context]
    intervals: list[tuple[float, float, list[Context]]] = field(default_factory=list)
    """(lower, upper, sampled contexts) per quantile interval of its non-zero activations."""
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    explanation: str | None = None
    """A judge's explanation (autointerp), when one was made."""
    judge_score: float | None = None


def select_latents(
    codes: SparseCodes, cfg: DashboardsConfig, judged: dict[int, dict[str, Any]] | None = None
) -> list[tuple[int, str]]:
    """The latents to draw, with why: the most used, autointerp's judged ones, ``cfg.include``, then random ones
    that fire at least ``cfg.min_count`` times; each once, in that order."""
    chosen: dict[int, str] = {}
    used = torch.argsort(codes.count, descending=True, stable=True)[: cfg.n_most_used]
    for j in used.tolist():
        if codes.count[j] > 0:
            chosen.setdefault(j, "most used")
    for j in sorted(judged or {})[: cfg.from_metrics]:
        if 0 <= j < codes.width:
            chosen.setdefault(j, "autointerp")
    for j in cfg.include:
        if j < codes.width:
            chosen.setdefault(j, "included")
    pool = [j for j in (codes.count >= max(cfg.min_count, 1)).nonzero().squeeze(1).tolist() if j not in chosen]
    for j in random.Random(cfg.seed).sample(pool, min(cfg.n_random, len(pool))):
        chosen[j] = "random"
    return sorted(chosen.items(), key=lambda item: (REASONS.index(item[1]), item[0]))


class TokenText:
    """Token id -> display text, decoded one token at a time (cached)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self._cache:
            self._cache[token_id] = self.tokenizer.decode([token_id])
        return self._cache[token_id]


def latent_view(
    j: int,
    reason: str,
    codes: SparseCodes,
    text: StoreText,
    decode: TokenText,
    cfg: DashboardsConfig,
    rng: random.Random,
) -> LatentView:
    """Latent ``j``'s card without its logits (:func:`add_logits` fills them)."""
    rows, values = codes.of(j)
    L = text.context_length
    keys = text.ctx[rows] * L + text.pos[rows]
    order = torch.argsort(keys)
    keys, by_key = keys[order], values[order]

    def context(r: int) -> Context:
        c, p = int(text.ctx[r]), int(text.pos[r])
        lo, hi = max(p - cfg.window_before, 0), min(p + cfg.window_after + 1, L)
        want = c * L + torch.arange(lo, hi)
        at = torch.searchsorted(keys, want).clamp(max=max(len(keys) - 1, 0))
        acts = torch.where(keys[at] == want, by_key[at], 0.0) if len(keys) else torch.zeros(len(want))
        ids = text.token_ids[c, lo:hi].tolist()
        return Context([(decode(t), float(a)) for t, a in zip(ids, acts.tolist())], p - lo, float(acts[p - lo]), (c, p))

    count = len(rows)
    view = LatentView(
        j,
        reason,
        count,
        count / codes.n_rows,
        float(values.max()) if count else 0.0,
        float(values.mean()) if count else 0.0,
        histogram(values, cfg.histogram_bins),
        [],
    )
    if count == 0:
        return view
    view.top = [context(r) for r in top_rows(rows, values, text, cfg)]
    qs = torch.quantile(values, torch.linspace(0, 1, cfg.n_intervals + 1)) if count > 1 else values.repeat(2)
    for k in range(len(qs) - 1):
        lo, hi = float(qs[k]), float(qs[k + 1])
        inside = ((values >= lo) & ((values < hi) if k < len(qs) - 2 else (values <= hi))).nonzero().squeeze(1)
        picks = rng.sample(inside.tolist(), min(cfg.n_per_interval, len(inside)))
        view.intervals.append((lo, hi, [context(int(rows[i])) for i in sorted(picks, key=lambda i: -values[i])]))
    return view


def top_rows(rows: torch.Tensor, values: torch.Tensor, text: StoreText, cfg: DashboardsConfig) -> list[int]:
    """The rows of the ``cfg.n_top`` largest activations whose windows do not overlap (a latent that fires on
    neighbouring tokens would otherwise show one passage several times), largest first."""
    span = cfg.window_before + cfg.window_after
    order = torch.argsort(values, descending=True, stable=True)[: 64 * cfg.n_top].tolist()
    chosen: list[int] = []
    taken: dict[int, list[int]] = {}
    for i in order:
        r = int(rows[i])
        c, p = int(text.ctx[r]), int(text.pos[r])
        if any(abs(p - q) <= span for q in taken.get(c, [])):
            continue
        chosen.append(r)
        taken.setdefault(c, []).append(p)
        if len(chosen) == cfg.n_top:
            break
    return chosen


def histogram(values: torch.Tensor, bins: int) -> list[tuple[float, float, int]]:
    """(lower edge, upper edge, count) of ``bins`` equal bins spanning ``values`` (empty for no values)."""
    if len(values) == 0:
        return []
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return [(lo, hi, len(values))]
    counts = torch.histc(values, bins=bins, min=lo, max=hi).long().tolist()
    step = (hi - lo) / bins
    return [(lo + i * step, lo + (i + 1) * step, c) for i, c in enumerate(counts)]


@torch.no_grad()
def logit_weights(W_dec: torch.Tensor, model: Any) -> torch.Tensor:
    """The direct effect of each decoder direction on the logits: ``W_dec · diag(g) · W_U`` with ``g`` the final
    norm's scale when the model has one (transformer-lens ``ln_final.w``). ``W_dec: (m, d)`` -> ``(m, vocab)``."""
    W = W_dec.float()
    ln = getattr(model, "ln_final", None)
    scale = getattr(ln, "w", None)
    if scale is not None:
        W = W * scale.detach().float().to(W.device)
    return W @ model.W_U.detach().float().to(W.device)


def add_logits(views: list[LatentView], W_dec: torch.Tensor, model: Any, decode: TokenText, n: int) -> None:
    """Fill each view's top ``n`` promoted and suppressed tokens (``W_dec: (width, d)``)."""
    if not views or n == 0:
        return
    weights = logit_weights(W_dec[[v.index for v in views]], model)  # (m, vocab)
    up, down = torch.topk(weights, n, dim=1), torch.topk(-weights, n, dim=1)
    for v, ui, uv, di, dv in zip(
        views, up.indices.tolist(), up.values.tolist(), down.indices.tolist(), down.values.tolist()
    ):
        v.promoted = [(decode(t), w) for t, w in zip(ui, uv)]
        v.suppressed = [(decode(t), -w) for t, w in zip(di, dv)]
