"""Feature dashboards: for a sample of every SAE's latents, the text it fires on, how often, and what it writes.

:func:`build_dashboards` encodes the harvest store's rows with each SAE (:mod:`.collect`; the text comes from the
token ids the store keeps), picks the latents (:func:`.features.select_latents`), computes each card
(:mod:`.features`) and writes static HTML (:mod:`.render`): ``index.html`` and ``<sae name>.html``, plus
``dashboards.json`` (what was drawn, for the report and for scripts).

SAEDashboard (``sae-dashboard`` on PyPI) is the ecosystem's renderer, but its pins (transformers < 4.57,
jaxtyping < 0.3, safetensors < 0.5, rich < 14) cannot stand beside SAEBench 0.6's stack, so the same views are
generated here.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from pipeline.data.store import ActivationStore
from pipeline.report.dashboards.collect import encode_rows, read_store_text
from pipeline.report.dashboards.config import DashboardsConfig
from pipeline.report.dashboards.features import TokenText, add_logits, latent_view, select_latents
from pipeline.report.dashboards.render import INDEX_FILE, write_index, write_sae_page
from pipeline.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

#: What the dashboards folder drew, per SAE (``dashboards.json``).
SUMMARY_FILE = "dashboards.json"


def page_name(sae_name: str) -> str:
    """The file of one SAE's page."""
    return f"{sae_name}.html"


def build_dashboards(
    saes: list[tuple[str, Any]],
    store: ActivationStore,
    model: Any,
    cfg: DashboardsConfig,
    out_dir: Path,
    *,
    device: str = "cpu",
    judged: dict[str, dict[int, dict[str, Any]]] | None = None,
    skipped: list[dict[str, str]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the dashboards of ``saes`` (``(name, SAE)`` pairs; an SAE has ``encode``, ``W_dec`` and ``cfg.d_sae``)
    into ``out_dir``; returns the summary written to :data:`SUMMARY_FILE`.

    ``model``: the transformer-lens model (its tokenizer decodes the store's token ids; ``W_U`` and ``ln_final``
    give the logit weights). ``judged[name][latent]``: autointerp's ``{"explanation", "score"}`` of that SAE's
    latents, shown on their cards and drawn (up to ``cfg.from_metrics``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    x, text = read_store_text(store, cfg.max_rows)
    decode = TokenText(model.tokenizer)
    source = "held-out rows first, then train" if store.n_rows("heldout") < len(x) else "held-out rows"
    pages = []
    for name, sae in saes:
        codes = encode_rows(sae, x, batch_size=cfg.batch_size, device=device, progress=progress, name=name)
        notes = (judged or {}).get(name, {})
        rng = random.Random(cfg.seed)
        views = [latent_view(j, why, codes, text, decode, cfg, rng) for j, why in select_latents(codes, cfg, notes)]
        for v in views:
            if v.index in notes:
                v.explanation = notes[v.index].get("explanation")
                v.judge_score = notes[v.index].get("score")
        add_logits(views, sae.W_dec.detach().cpu(), model, decode, cfg.n_logits)
        summary = {
            "name": name,
            "page": page_name(name),
            "width": codes.width,
            "rows": codes.n_rows,
            "source": source,
            "l0": len(codes.latent) / codes.n_rows,
            "dead": int((codes.count == 0).sum()),
            "drawn": len(views),
            "latents": [{"index": v.index, "reason": v.reason, "count": v.count, "max": v.max_value} for v in views],
        }
        write_sae_page(out_dir / page_name(name), name, views, summary, cfg.n_top)
        pages.append(summary)
        log.info("dashboards: %s, %d latents drawn", name, len(views))
    note = (
        f"Activations of {len(x)} rows of the harvest store ({source}); contexts come from the token ids the "
        "harvest kept (no second forward pass)."
    )
    write_index(out_dir / INDEX_FILE, pages, skipped or [], note)
    result = {"saes": pages, "skipped": skipped or [], "rows": len(x), "note": note}
    atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(result, indent=1))
    return result


__all__ = ["DashboardsConfig", "INDEX_FILE", "SUMMARY_FILE", "build_dashboards", "page_name"]
