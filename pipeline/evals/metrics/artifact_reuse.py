"""A metric's SAE-independent SAEBench artifacts served from, and published to, the shared cache.

SAEBench keeps what a metric computes without the SAE in its artifacts folder and reuses it when the file is
there (sparse probing / SCR / TPP: ``<dataset>_activations.pt`` and ``_probes.pkl``; absorption: its probe
folder), keyed only by model name, hook and dataset name. :func:`reused_artifacts` gives each run of a metric
that folder clean, fills it with hard links to a verified cache entry of the full key (:func:`probing_key`,
:func:`absorption_key`) when there is one, and otherwise publishes what SAEBench wrote there once the metric
finished without raising. What it did goes into ``eval_info.json`` under ``eval_cache``
(:data:`INFO_KEY`). Layout, key and guarantees: ``docs/eval-cache.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pipeline.evals.artifact_cache import ArtifactCache, key_hash, link_or_copy
from pipeline.evals.metrics.base import EvalContext
from pipeline.utils.atomic import atomic_write_text

CACHE_DIRNAME = "eval_cache"
"""Name of the default cache folder, beside the activation store."""
INFO_KEY = "eval_cache"
"""Key of ``eval_info.json`` that records the cache's use."""
CODE_VERSION = {"absorption": 2, "sparse_probing": 1, "scr": 1, "tpp": 1, "core": 2, "ravel": 1}
"""Version of this project's code around each metric's SAE-independent part (the RNG pinning of
:mod:`pipeline.evals.metrics.rng_pinning`, the vocabulary subsample); bump one to invalidate its entries."""
SAE_ONLY_FIELDS = {
    "sparse_probing": ("sae_batch_size",),
    "scr": ("sae_batch_size", "n_values"),
    "tpp": ("sae_batch_size", "n_values"),
}
"""Fields of SAEBench's config that its SAE-independent part never reads (left out of the key; every other
field is in it)."""
ABSORPTION_PROBE_FIELDS = ("model_name", "llm_dtype", "prompt_template", "prompt_token_pos")
"""Fields of SAEBench's absorption config its probe depends on (its training sizes are constants of its code)."""
VERSIONED_PACKAGES = ("sae-bench", "torch", "transformer-lens", "transformers", "scikit-learn")
"""Packages whose versions are part of every key."""
LABELLED_DATA = "*.parquet"
"""The files of the built labelled passages that hold the data (train / test)."""
_EDGE = 256
FINISHED_FILE = ".finished.json"
"""Written into a metric's SAE-independent artifacts folder when a run of the metric over it returned, with the
cache off (:func:`reused_artifacts`): a later run reuses the folder only then."""


def cache_root(ctx: EvalContext) -> Path | None:
    """``eval.cache.root``, else ``eval_cache/`` beside the activation store; None with neither (no root set and
    no store)."""
    if ctx.eval.cache.root:
        return Path(ctx.eval.cache.root)
    store = getattr(ctx.store, "path", None)
    return Path(store).parent / CACHE_DIRNAME if store is not None else None


def model_fingerprint(model: Any) -> str:
    """sha256 over every parameter and buffer's name, dtype, shape and first and last 256 values: the same weights
    give the same print, any reload, dtype or fine-tune of them a different one (read in milliseconds)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        for part in (flat[:_EDGE], flat[-_EDGE:]):
            h.update(part.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary (token -> id), the special tokens and the padding side."""
    blob = json.dumps(
        [sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens, tokenizer.padding_side], default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def folder_fingerprint(path: str | Path, content: bool, pattern: str = "*") -> str:
    """sha256 over every file under ``path`` whose name matches ``pattern``: its relative name and size, plus its
    bytes (``content``) or its modification time (large local datasets)."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob(pattern) if p.is_file()) if root.is_dir() else [root]
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root) if root.is_dir() else p.name}|{st.st_size}".encode())
        h.update(p.read_bytes() if content else str(st.st_mtime_ns).encode())
    return h.hexdigest()


def dataset_identity(ctx: EvalContext, name: str) -> Any:
    """What identifies SAEBench dataset ``name`` here: the built labelled passages by content, a local copy
    (``eval.local_datasets``) by file names, sizes and times, a hub dataset by its name."""
    if ctx.labelled is not None and name == ctx.labelled.name:
        lab = ctx.labelled  # its data files by content (its spec.json names the run folder: left out)
        fields = {"column1": lab.column1_mapping, "column2": lab.column2_mapping, "classes": lab.classes}
        return {"labelled": folder_fingerprint(lab.path, True, LABELLED_DATA), **fields, **lab.summary()}
    for base, path in sorted(ctx.eval.local_datasets.items()):
        if name.startswith(base):
            return {"local": base, "files": folder_fingerprint(path, content=False)}
    return {"hub": name}


def common_key(ctx: EvalContext, metric: str, lens_model: bool = True) -> dict[str, Any]:
    """The key's fields every metric shares: model (name, weights, tokenizer, dtype), hook, device type, package
    versions and this project's code version of the metric. ``lens_model=False``: without the TransformerLens
    model's weights and tokenizer (a metric that runs another copy of the model keys that copy itself)."""
    lens = (
        {"weights": model_fingerprint(ctx.model), "tokenizer": tokenizer_fingerprint(ctx.model.tokenizer)}
        if lens_model
        else {}
    )
    return {
        "metric": metric,
        "model": ctx.model_name,
        "model_path": ctx.model_config.path,
        **lens,
        "llm_dtype": ctx.llm_dtype,
        "hook": getattr(ctx.store, "hook", None),
        "device_type": torch.device(ctx.device).type,
        "versions": {p: metadata.version(p) for p in VERSIONED_PACKAGES},
        "code_version": CODE_VERSION[metric],
    }


def probing_key(ctx: EvalContext, metric: str, config: Any) -> dict[str, Any]:
    """Key of sparse probing's / SCR's / TPP's activations and LLM probes: :func:`common_key`, SAEBench's config
    less :data:`SAE_ONLY_FIELDS`, and each dataset's identity."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in SAE_ONLY_FIELDS[metric]}
    datasets = {name: dataset_identity(ctx, name) for name in config.dataset_names}
    return {**common_key(ctx, metric), "config": fields, "datasets": datasets}


def absorption_key(ctx: EvalContext, config: Any) -> dict[str, Any]:
    """Key of absorption's first-letter probe: :func:`common_key`, :data:`ABSORPTION_PROBE_FIELDS` and the
    vocabulary subsample (``eval.absorption.vocab_size``, ``min_words_per_letter``, ``seed``)."""
    node = ctx.eval.absorption
    return {
        **common_key(ctx, "absorption"),
        "config": {k: getattr(config, k) for k in ABSORPTION_PROBE_FIELDS},
        "vocab": {"size": node.vocab_size, "min_words_per_letter": node.min_words_per_letter, "seed": node.seed},
    }


CORE_FORWARD_FIELDS = ("batch_size_prompts", "n_eval_reconstruction_batches", "n_eval_sparsity_variance_batches")
"""Fields of SAEBench's core config that decide which forwards core makes (with the eval text and its shuffle)."""


def core_key(ctx: EvalContext, config: Any, tokens: Any, shuffle_seed: int) -> dict[str, Any]:
    """Key of core's SAE-independent forwards (:mod:`pipeline.evals.metrics.shared_forwards`): :func:`common_key`,
    :data:`CORE_FORWARD_FIELDS`, the context size, the shuffle seed and the eval text: a hub dataset by name, local
    contexts (a ``datasets.Dataset`` with a ``tokens`` column) by the sha256 of their token ids. Each stored
    forward is also filed under its own tokens and arguments, so a key that covered too little would cost misses,
    never a wrong answer."""
    if isinstance(tokens, str):
        text: Any = {"hub": tokens}
    else:
        ids = torch.as_tensor(tokens["tokens"], dtype=torch.int64).contiguous()
        text = {"local_tokens": hashlib.sha256(ids.numpy().tobytes()).hexdigest(), "shape": list(ids.shape)}
    fields = {k: getattr(config, k) for k in CORE_FORWARD_FIELDS}
    return {
        **common_key(ctx, "core"),
        "config": {**fields, "context_size": config.context_size, "shuffle_seed": shuffle_seed},
        "text": text,
    }


RAVEL_SAE_ONLY_FIELDS = ("learning_rate", "num_epochs", "train_mdas", "num_pairs_per_attribute", "train_test_split")
"""Fields of SAEBench's RAVEL config that only its per-SAE MDBM reads (left out of the key; the model's answers
and the filtered dataset depend on every other field)."""


def ravel_key(ctx: EvalContext, config: Any, hf_model: str, data: Any) -> dict[str, Any]:
    """Key of RAVEL's filtered datasets (the prompts the HF model answered right, SAEBench's
    ``*_filtered_dataset.json`` and ``*_unfiltered_full_instance.json``): :func:`common_key`, SAEBench's config
    less :data:`RAVEL_SAE_ONLY_FIELDS` and ``artifact_dir``, the HF model RAVEL generates with (``hf_model``: a
    hub name, or a local folder by its files' names, sizes and times) and the prompt data's identity (``data``)."""
    fields = {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k not in (*RAVEL_SAE_ONLY_FIELDS, "artifact_dir", "force_dataset_recompute")
    }
    local = Path(hf_model)
    model = {"local": folder_fingerprint(local, content=False)} if local.is_dir() else {"hub": hf_model}
    return {**common_key(ctx, "ravel", lens_model=False), "config": fields, "hf_model": model, "data": data}


def cache_enabled(ctx: EvalContext) -> bool:
    """Whether this evaluation uses the shared cache (``eval.cache.enabled`` and a root: :func:`cache_root`)."""
    return bool(ctx.eval.cache.enabled) and cache_root(ctx) is not None


def _record(ctx: EvalContext, root: Path | None, metric: str, entry: dict[str, Any]) -> None:
    """Add ``metric``'s entry to ``info["eval_cache"]`` and update its totals."""
    info = ctx.info.setdefault(
        INFO_KEY,
        {
            "enabled": ctx.eval.cache.enabled,
            "root": str(root) if root else None,
            "max_gb": ctx.eval.cache.max_gb,
            "hits": 0,
            "misses": 0,
            "bytes_read": 0,
            "bytes_written": 0,
            "metrics": {},
        },
    )
    info["metrics"][metric] = entry
    if entry["status"] == "hit":
        info["hits"] += 1
        info["bytes_read"] += entry["bytes"]
    elif entry["status"] == "miss":
        info["misses"] += 1
        info["bytes_written"] += entry["bytes"]
    if "total_bytes" in entry:
        info["total_bytes"] = entry["total_bytes"]


@contextlib.contextmanager
def reused_artifacts(
    ctx: EvalContext, metric: str, part: Path, make_key: Callable[[], dict[str, Any]]
) -> Iterator[None]:
    """Run the body with ``part`` (the SAE-independent part of the metric's artifacts folder) served from the cache.

    Enabled (``eval.cache.enabled`` and a root, :func:`cache_root`): ``part`` is emptied (nothing another key or a
    killed run left is ever read), then filled with hard links to the verified entry of ``make_key()`` (a hit); on
    a miss the body computes it and, if it returns without raising, ``part`` is published as that key's entry.
    Disabled: the body runs on what ``part`` holds when a run of the metric finished there (its
    :data:`FINISHED_FILE`), and on an emptied ``part`` otherwise; the key is not built. SAEBench checks one file of
    a set before loading the others (SCR/TPP: the activations, then the probes' pickle; absorption: the probe, then
    ``data.npz``), so what a killed run left there would fail the metric on every re-run."""
    root = cache_root(ctx)
    if not ctx.eval.cache.enabled or root is None:
        why = "eval.cache.enabled=false" if not ctx.eval.cache.enabled else "no cache root (no store)"
        record: dict[str, Any] = {"status": "off", "why": why, "bytes": 0}
        if part.exists() and not (part / FINISHED_FILE).is_file():
            shutil.rmtree(part, ignore_errors=True)
            record["emptied"] = "no finished run of the metric left it"
        _record(ctx, root, metric, record)
        yield
        if part.is_dir():
            atomic_write_text(part / FINISHED_FILE, json.dumps({"metric": metric}) + "\n")
        return
    t0 = time.perf_counter()
    key = make_key()
    cache = ArtifactCache(root, int(ctx.eval.cache.max_gb * 2**30))
    shutil.rmtree(part, ignore_errors=True)
    entry, why = cache.lookup(metric, key)
    record = {"key": key_hash(key)[:16]}
    if entry is not None:
        try:
            for rel in entry.files:
                link_or_copy(entry.files_dir / rel, part / rel)
            record.update(status="hit", bytes=entry.n_bytes, files=len(entry.files))
        except OSError as exc:  # evicted between the check and the links: compute it
            shutil.rmtree(part, ignore_errors=True)
            entry, why = None, f"entry vanished while linking ({exc.__class__.__name__})"
    if entry is None:
        record.update(status="miss", why=why, bytes=0)
    record["lookup_s"] = round(time.perf_counter() - t0, 3)
    try:
        yield
    except BaseException:
        record["published"] = False  # a failed run publishes nothing
        _record(ctx, root, metric, record)
        raise
    if entry is None:
        files = sorted(p.relative_to(part).as_posix() for p in part.rglob("*") if p.is_file()) if part.is_dir() else []
        record["bytes"] = cache.publish(metric, key, part, files)
        record.update(published=record["bytes"] > 0, files=len(files), total_bytes=cache.total_bytes())
    _record(ctx, root, metric, record)
