"""The harvest loop: model + text -> activation store.

:func:`harvest` runs a loaded ``HookedTransformer`` over fixed-length contexts and writes the activations of
one or more hooks (one forward pass, ``stop_at_layer`` just above the deepest hook) into a resumable
:class:`~pipeline.data.store.StoreWriter`. With ``part=(rank, world)`` several processes (torchrun ranks) share
the work: each makes every world-th shard, rank 0 merges, and the store lists the shards, rows and held-out
split a one-process harvest lists. A NaN or Inf activation stops it, naming the hook, context, shard and position.

One module (~470 lines) because the one-process loop, the ranks' parts and the repair of damaged shards all run
the same shard runner (the per-batch forward pass, masking and checks), which :func:`harvest` binds to its
settings.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.data.models import describe_model
from pipeline.data.store import (
    CONTEXTS_TENSOR,
    DTYPES,
    POSITIONS_TENSOR,
    SHARD_TENSOR,
    TOKENS_TENSOR,
    check_disk_space,
    dtype_name,
    heldout_mask,
)
from pipeline.data.store_writer import StoreWriter, shard_rows_count
from pipeline.data.text import iter_contexts

log = logging.getLogger(__name__)

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
FP16_MAX = 65504.0


@dataclass
class MaskingOptions:
    """Which token positions are left out of the store (recorded in the manifest)."""

    mask_bos: bool = True
    """Drop BOS positions (the first token of each context and document separators)."""
    mask_special_tokens: bool = True
    """Drop every special token of the tokenizer (BOS, EOS, PAD, UNK, ...)."""
    outlier_norm_factor: float | None = None
    """Drop rows whose norm exceeds this multiple of the batch's median row norm (per hook); None = off."""


def hook_names(layers: Sequence[int], hook_point: str = "hook_resid_post") -> list[str]:
    """``[3, 5], "hook_resid_post"`` -> ``["blocks.3.hook_resid_post", "blocks.5.hook_resid_post"]``."""
    return [f"blocks.{int(layer)}.{hook_point}" for layer in layers]


def hook_layer(hook: str) -> int | None:
    m = _BLOCK_HOOK.match(hook)
    return int(m.group(1)) if m else None


def stop_layer(hooks: Sequence[str]) -> int | None:
    """The ``stop_at_layer`` that still computes every hook (None when one lies past the blocks)."""
    layers = [hook_layer(h) for h in hooks]
    if all(h in ("hook_embed", "hook_pos_embed") for h in hooks):
        return 0
    if any(layer is None and h not in ("hook_embed", "hook_pos_embed") for h, layer in zip(hooks, layers)):
        return None
    return max(layer for layer in layers if layer is not None) + 1


def validate(model: Any, hooks: Sequence[str], context_length: int) -> None:
    """Fail early (ValueError) on an unknown hook or a context longer than the model's window."""
    if not hooks:
        raise ValueError("no hook given; set harvest.layers (or harvest.hooks)")
    unknown = [h for h in hooks if h not in model.hook_dict]
    if unknown:
        layers = model.cfg.n_layers
        raise ValueError(
            f"hook(s) {unknown} do not exist in {model.cfg.model_name} ({layers} layers: "
            f"valid layers 0..{layers - 1}, e.g. blocks.{layers // 2}.hook_resid_post)"
        )
    if context_length > model.cfg.n_ctx:
        raise ValueError(
            f"harvest.context_length={context_length} exceeds the model's n_ctx={model.cfg.n_ctx}; "
            "lower it (the paper uses 128) or load the model with a larger model.n_ctx"
        )
    if model.tokenizer is None:
        raise ValueError(f"{model.cfg.model_name} has no tokenizer; load it with one")


def harvest(
    model: Any,
    documents: Iterable[str] | Callable[[], Iterable[str]],
    out_dir: str | os.PathLike,
    *,
    hooks: Sequence[str],
    n_tokens: int,
    context_length: int = 128,
    batch_size: int = 8,
    dtype: str = "float32",
    shard_rows: int = 65536,
    heldout_fraction: float = 0.05,
    masking: MaskingOptions | None = None,
    identity: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    verify: bool = True,
    part: tuple[int, int] | None = None,
    wait_s: float = 7 * 24 * 3600.0,
) -> Path:
    """Harvest ``ceil(n_tokens / context_length)`` contexts of ``documents`` into a store at ``out_dir``.

    Every hook's rows are (tokens, d) with masked positions left out; contexts are split between ``train``
    and ``heldout`` by :func:`~pipeline.data.store.heldout_mask`. ``identity`` (default: built from the
    model, hooks and settings; pass the text's identity in ``meta["text"]``) decides resume vs refusal when
    ``out_dir`` already has a store. Returns ``out_dir``.

    Re-running into a folder that holds a store with the same identity reuses it: with ``verify`` (default)
    every listed shard is first checked against its sha256 and exactly the missing or corrupted ones are
    re-made from their contexts (good shards keep their bytes and mtime; the manifest is rewritten
    atomically); then a complete store is returned, a partial one resumed.

    ``part=(rank, world)``: this process makes shard indices ``i ≡ rank (mod world)`` (every rank reads the text
    and skips the others' contexts), listing them in its own ledger; rank 0 then waits up to ``wait_s`` for the
    other ranks' ledgers and merges them into the manifest. A complete store is verified and repaired by rank 0
    alone (the others return at once). Other ranks return once their part is written.
    """
    masking = masking or MaskingOptions()
    if dtype not in DTYPES:
        raise ValueError(f"harvest.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    if context_length < 2:
        raise ValueError(
            f"harvest.context_length={context_length} must be at least 2 (BOS and one token; the paper uses 128)"
        )
    if masking.outlier_norm_factor is not None and not masking.outlier_norm_factor > 0:
        raise ValueError(f"harvest.outlier_norm_factor={masking.outlier_norm_factor} must be > 0 (None: off)")
    if n_tokens < context_length:
        raise ValueError(f"harvest.n_tokens={n_tokens} is less than one context ({context_length} tokens)")
    validate(model, hooks, context_length)
    store_dtype, tok = DTYPES[dtype], model.tokenizer
    bos = tok.bos_token_id if model.cfg.default_prepend_bos else None
    masked_ids = sorted(
        {
            *(tok.all_special_ids if masking.mask_special_tokens else []),
            *([bos] if masking.mask_bos and bos is not None else []),
        }
    )
    n_contexts = math.ceil(n_tokens / context_length)
    per_shard = max(batch_size, shard_rows // context_length // batch_size * batch_size)
    n_shards = math.ceil(n_contexts / per_shard)
    meta = dict(meta or {})
    meta.setdefault("model", describe_model(model, model.cfg.model_name))
    meta.setdefault("text", {"kind": "documents passed in by the caller"})
    settings = {
        "hooks": list(hooks),
        "n_tokens": n_tokens,
        "context_length": context_length,
        "batch_size": batch_size,
        "dtype": dtype,
        "shard_rows": shard_rows,
        "heldout_fraction": heldout_fraction,
        "masking": asdict(masking),
    }
    identity = identity or {"model": meta["model"], "text": meta.get("text"), **settings}
    header = {
        "identity": identity,
        **meta,
        **settings,
        "contexts_per_shard": per_shard,
        "prepend_bos": bos is not None,
        "bos_token_id": bos,
        "token_ids": True,
        "masking": {
            **asdict(masking),
            "masked_token_ids": masked_ids,
            "masked_tokens": tok.convert_ids_to_tokens(masked_ids),
        },
    }
    d_of = {h: _hook_width(model, h) for h in hooks}
    writer = StoreWriter(
        out_dir,
        header=header,
        dtype=store_dtype,
        hooks={h: {"layer": hook_layer(h), "d": d_of[h]} for h in hooks},
        part=part,
    )
    if writer.part is not None and writer.complete and part[0] > 0:
        return writer.path  # rank 0 verifies and repairs a finished store

    docs = documents() if callable(documents) else documents
    contexts = iter_contexts(docs, tok, context_length, bos)
    ids_masked = torch.tensor(masked_ids, dtype=torch.long)

    def run_shard(batch_ctx: list[list[int]], first: int, shard_hooks: Sequence[str], bar: Any):
        return _harvest_shard(
            model,
            batch_ctx,
            first,
            shard_hooks,
            batch_size,
            heldout_fraction,
            ids_masked,
            masking.outlier_norm_factor,
            store_dtype,
            bar,
            shard=first // per_shard,
        )

    if writer.part is not None and not writer.complete:
        return _harvest_part(
            writer, contexts, run_shard, hooks, n_contexts, per_shard, context_length, progress, wait_s
        )
    bad = writer.bad_shards() if verify else {}
    if writer.complete and not bad:
        log.info("store %s is complete and every shard matches its sha256; nothing to do", out_dir)
        return Path(out_dir)
    start = writer.done_shards
    item = torch.finfo(store_dtype).bits // 8
    check_disk_space(Path(out_dir), (n_contexts - start * per_shard) * context_length * sum(d_of.values()) * item)
    _skip_done_shards(writer, contexts, start, bad, run_shard, context_length, progress)
    if writer.complete:
        log.info("re-made %d damaged shard index(es) of %s", len(bad), out_dir)
        return writer.path
    bar = tqdm(
        total=n_contexts * context_length,
        initial=start * per_shard * context_length,
        unit="tok",
        unit_scale=True,
        desc="harvest",
        disable=not progress,
    )
    done, t0 = start * per_shard, time.perf_counter()
    for index in range(start, n_shards):
        want = min(per_shard, n_contexts - index * per_shard)
        batch_ctx = list(itertools.islice(contexts, want))
        if not batch_ctx:
            if index == 0:
                raise _empty_text(context_length)
            break
        rows, counts = run_shard(batch_ctx, index * per_shard, hooks, bar)
        writer.add_shard(index, rows, (index * per_shard, index * per_shard + len(batch_ctx)), counts)
        done = index * per_shard + len(batch_ctx)
        if len(batch_ctx) < want:
            break
    bar.close()
    if done < n_contexts:
        log.warning(
            "the text ran out: harvested %d of %d contexts (%d tokens)", done, n_contexts, done * context_length
        )
    elapsed = time.perf_counter() - t0
    log.info(
        "harvested %d tokens in %.1f s (%.0f tok/s) into %s",
        (done - start * per_shard) * context_length,
        elapsed,
        (done - start * per_shard) * context_length / max(elapsed, 1e-9),
        out_dir,
    )
    return writer.finish(n_contexts=done, n_tokens_harvested=done * context_length)


def _empty_text(context_length: int) -> ValueError:
    return ValueError(
        "the text source yielded no complete context of "
        f"{context_length} tokens (empty text?); check data.* or lower context_length"
    )


def _harvest_part(
    writer: StoreWriter,
    contexts: Iterator[list[int]],
    run_shard: Callable,
    hooks: Sequence[str],
    n_contexts: int,
    per_shard: int,
    context_length: int,
    progress: bool,
    wait_s: float,
) -> Path:
    """This rank's shards of a store several processes harvest (see :func:`harvest`): ``contexts`` is the whole
    text's context stream (the other ranks' contexts are skipped), ``run_shard`` harvest's shard runner."""
    rank, world = writer.part
    start, n_shards = writer.done_shards, math.ceil(n_contexts / per_shard)
    mine = [i for i in range(start, n_shards) if i % world == rank and not writer.part_has(i)]
    bar = tqdm(
        total=len(mine) * per_shard * context_length,
        unit="tok",
        unit_scale=True,
        desc=f"harvest (rank {rank}/{world})",
        disable=not progress or rank != 0,
    )
    pos = sum(1 for _ in itertools.islice(contexts, start * per_shard))  # shards the manifest lists already
    for index in mine:
        lo = index * per_shard
        pos += sum(1 for _ in itertools.islice(contexts, lo - pos))  # the other ranks' contexts
        want = min(per_shard, n_contexts - lo)
        batch_ctx = list(itertools.islice(contexts, want)) if pos == lo else []
        pos += len(batch_ctx)
        if not batch_ctx:
            if index == 0:
                raise _empty_text(context_length)
            break  # the text ran out before this shard
        rows, counts = run_shard(batch_ctx, lo, hooks, bar)
        writer.add_part_shard(index, rows, (lo, lo + len(batch_ctx)), counts)
        if len(batch_ctx) < want:
            break
    bar.close()
    writer.finish_part()
    if rank != 0:
        log.info("rank %d wrote its part of %s", rank, writer.path)
        return writer.path
    return writer.merge_parts(world, context_length=context_length, wait_s=wait_s)


def _skip_done_shards(
    writer: StoreWriter,
    contexts: Iterable[list[int]],
    n_done: int,
    bad: dict[int, dict[str, list[str]]],
    run_shard: Callable,
    context_length: int,
    progress: bool,
) -> None:
    """Consume the contexts of the ``n_done`` shards the store lists, re-making the ``bad`` ones
    (``{index: {hook: [split, ...]}}``; only those hooks are run and only those files written)."""
    expected = writer.span(n_done - 1)[1] if n_done else 0
    pos = 0
    n_tokens = sum(writer.span(i)[1] - writer.span(i)[0] for i in bad) * context_length
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="repair", disable=not progress or not bad)
    for index, splits_of in bad.items():
        lo, hi = writer.span(index)
        pos += sum(1 for _ in itertools.islice(contexts, lo - pos))
        batch_ctx = list(itertools.islice(contexts, hi - lo))
        pos += len(batch_ctx)
        if pos < hi:
            break
        rows, _ = run_shard(batch_ctx, lo, list(splits_of), bar)
        remade = {h: {split: rows[h][split] for split in splits} for h, splits in splits_of.items()}
        # a re-made shard keeps the positions of the old one; only outlier masking can move with numerics
        old_rows = {
            h: sum(writer.manifest["hooks"][h][split]["shards"][index]["rows"] for split in splits)
            for h, splits in splits_of.items()
        }
        counts = {h: {"masked_outlier": old_rows[h] - sum(map(shard_rows_count, remade[h].values()))} for h in remade}
        writer.replace_shard(index, remade, counts)
    bar.close()
    pos += sum(1 for _ in itertools.islice(contexts, max(expected - pos, 0)))
    if pos < expected:
        raise ValueError(
            f"the text now yields fewer contexts ({pos}) than the store already holds ({expected}); "
            "the text source changed since that harvest: use a fresh output folder"
        )


@torch.inference_mode()
def _harvest_shard(
    model: Any,
    contexts: list[list[int]],
    first: int,
    hooks: Sequence[str],
    batch_size: int,
    heldout_fraction: float,
    ids_masked: torch.Tensor,
    outlier: float | None,
    store_dtype: torch.dtype,
    bar: Any,
    shard: int | None = None,
) -> tuple[dict, dict]:
    """Run ``contexts`` (global index from ``first``) through the model; per hook and split, the rows and their
    token ids (a dict of the shard file's tensors, :class:`~pipeline.data.store.ShardTokens`). A NaN or Inf
    activation at a position the store would keep (before outlier masking, which would drop it silently: its norm
    compares false with every bound) raises ``ValueError`` naming the hook, the context, the shard (index
    ``shard``) and the position (:func:`_check_finite`)."""
    parts: dict[str, dict[str, list[torch.Tensor]]] = {h: {"train": [], "heldout": []} for h in hooks}
    where: dict[str, dict[str, list[torch.Tensor]]] = {h: {"train": [], "heldout": []} for h in hooks}
    counts = {h: {"positions": 0, "masked_special": 0, "masked_outlier": 0} for h in hooks}
    stop = stop_layer(hooks)
    all_tokens = torch.tensor(contexts, dtype=torch.long).reshape(len(contexts), -1)
    index = torch.arange(first, first + len(contexts))
    held_all = torch.from_numpy(heldout_mask(index.numpy(), heldout_fraction))
    for b in range(0, len(contexts), batch_size):
        tokens = all_tokens[b : b + batch_size]
        held = held_all[b : b + batch_size]
        before = {"train": int((~held_all[:b]).sum()), "heldout": int(held_all[:b].sum())}  # earlier contexts
        keep_tok = ~torch.isin(tokens, ids_masked)
        _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=list(hooks), stop_at_layer=stop)
        for h in hooks:
            acts = cache[h]  # (b, L, d) on the model's device
            keep = keep_tok.to(acts.device)
            _check_finite(acts, keep, h, first + b, shard)
            if outlier is not None and bool(keep.any()):
                norms = acts.float().norm(dim=-1)
                keep = keep & (norms <= outlier * norms[keep].median())
            if store_dtype == torch.float16 and bool(keep.any()) and float(acts[keep].abs().max()) > FP16_MAX:
                raise ValueError(f"activations of {h} exceed the float16 range; use harvest.dtype=bfloat16")
            keep = keep.cpu()
            c = counts[h]
            c["positions"] += tokens.numel()
            c["masked_special"] += int((~keep_tok).sum())
            c["masked_outlier"] += int((keep_tok & ~keep).sum())
            for split, sel in (("train", ~held), ("heldout", held)):
                rows_mask = (keep & sel[:, None]).to(acts.device)
                parts[h][split].append(acts[rows_mask].to(store_dtype).cpu())
                # row order = row-major over this split's contexts, as acts[rows_mask] takes them
                flat = keep[sel].reshape(-1).nonzero().squeeze(1)
                where[h][split].append(flat + before[split] * tokens.shape[1])
        bar.update(tokens.numel())
    rows = {
        h: {
            s: {
                SHARD_TENSOR: torch.cat(v),
                TOKENS_TENSOR: all_tokens[~held_all if s == "train" else held_all].to(torch.int32),
                CONTEXTS_TENSOR: index[~held_all if s == "train" else held_all],
                POSITIONS_TENSOR: torch.cat(where[h][s]).to(torch.int64),
            }
            for s, v in per.items()
        }
        for h, per in parts.items()
    }
    return rows, counts


def _check_finite(acts: torch.Tensor, keep: torch.Tensor, hook: str, first: int, shard: int | None) -> None:
    """``ValueError`` naming the first context (global index ``first`` + row), shard and position where ``acts:
    (b, L, d)`` holds a NaN or Inf at a ``keep: (b, L)`` position."""
    bad = keep & ~torch.isfinite(acts).all(dim=-1)
    if not bool(bad.any()):
        return
    row, pos = (int(i) for i in bad.nonzero()[0])
    n_bad = int(bad.sum())
    where = f"shard {shard}" if shard is not None else "this shard"
    raise ValueError(
        f"non-finite activations (NaN or Inf) at {hook}: context {first + row} ({where}), position {pos}, and "
        f"{n_bad - 1} more position(s) of this batch; the model overflowed or is broken: load it in float32 "
        "(model.dtype=float32) or check its weights. The harvest stops rather than store or drop them."
    )


def _hook_width(model: Any, hook: str) -> int:
    """Width d of a (batch, pos, d) hook, from a one-token forward pass."""
    with torch.inference_mode():
        tokens = torch.zeros(1, 1, dtype=torch.long, device=model.cfg.device)
        _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=stop_layer([hook]))
    shape = tuple(cache[hook].shape)
    if len(shape) != 3:
        raise ValueError(
            f"hook {hook} has activations of shape {shape}; only (batch, pos, d) hooks can be "
            "stored (e.g. hook_resid_post, hook_mlp_out, hook_attn_out)"
        )
    return shape[-1]


def identity_hash(identity: dict[str, Any]) -> str:
    """Short stable hash of an identity dict (folder names)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


__all__ = ["MaskingOptions", "harvest", "hook_names", "stop_layer", "validate", "identity_hash", "dtype_name"]
