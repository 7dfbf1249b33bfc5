"""Token contexts of the harvest text, for the metrics that read local text instead of a hub dataset (core's
eval text, offline autointerp)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any


def text_after(
    documents: Iterator[str], tokenizer: Any, context_length: int, bos: int | None, skip: int, n: int
) -> list[list[int]]:
    """``n`` token contexts (``n`` lists of ``context_length`` ids) of ``documents``, after the first ``skip``
    ones (text the harvest never saw when ``skip`` covers the harvested contexts)."""
    from pipeline.data.text import iter_contexts

    out = []
    for i, ctx in enumerate(iter_contexts(documents, tokenizer, context_length, bos)):
        if i < skip:
            continue
        out.append(ctx)
        if len(out) >= n:
            break
    if len(out) < n:
        raise ValueError(
            f"the text holds only {len(out)} contexts of {context_length} tokens after the {skip} "
            f"harvested ones, {n} are needed; lower eval.core.n_eval_reconstruction_batches / "
            "n_eval_sparsity_variance_batches / batch_size_prompts (or eval.autointerp.config."
            "total_tokens), or point eval.core.dataset at more text"
        )
    return out


def harvested_contexts(manifest: dict[str, Any], context_length: int) -> int:
    """How many contexts of ``context_length`` tokens the harvest recorded in a store ``manifest`` consumed
    (rounded up): the contexts to skip for text the fit never saw. 0 for a store without that record."""
    harvested = int(manifest.get("n_contexts", 0)) * int(manifest.get("context_length") or context_length)
    return int(math.ceil(harvested / context_length))
