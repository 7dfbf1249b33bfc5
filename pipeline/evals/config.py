"""Typed schema of the ``eval`` config node (``conf/eval/*.yaml``).

The defaults here are SAEBench's own full sizes (its ``run_all_evals`` settings and each eval's defaults), what
``eval=paper`` runs; each ``conf/eval/*.yaml`` lists only what its preset changes. A metric's ``config:`` block
stays a plain mapping; it is handed to SAEBench's own config dataclass of that metric, whose field names
:func:`pipeline.evals.metrics.check_metric_configs` checks (that one imports SAEBench; nothing here does, so every
stage's config check stays cheap).

    e = parse_eval_config(cfg.eval)      # unknown key / wrong type / unset value -> ValueError naming eval.<key>
    validate_eval_config(e)              # metric names, SAE entries, sizes
    check_metric_configs(e)              # each metric's config: keys against SAEBench's (pipeline.evals.metrics)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig

from pipeline.saes.export_forms import SPLIT, check_signed_export
from pipeline.utils.redact import is_loopback_host, redact_url
from pipeline.utils.typed_config import as_dict, typed_node

METRICS: tuple[str, ...] = ("core", "absorption", "sparse_probing", "scr", "tpp", "autointerp", "ravel", "unlearning")
"""Every SAEBench metric the pipeline runs, in order: its ``eval.metrics`` entry, its node of :class:`EvalConfig`
and its runner in :data:`pipeline.evals.metrics.REGISTRY`."""

#: What ``eval.saes`` may name besides a baseline's name: the dictionary, and every trained baseline.
FIT_SAES = ("dictionary", "baselines")


@dataclass
class HubBaseline:
    """One of SAEBench's published SAEs (baseline b): ``release`` + ``sae_id``, or ``results_dir``."""

    release: str | None = None
    """sae-lens release of the SAE (with ``sae_id``): loaded from the hub and run through the same metrics."""
    sae_id: str | None = None
    """The SAE's id inside ``release``."""
    architecture: str = "sae-lens"
    """Architecture label in ``saes.json`` and the plots (topk, matryoshka_batch_topk, ...)."""
    results_dir: str | None = None
    """Instead of an SAE: a local folder of SAEBench's published result files (``<metric>/*_eval_results.json``),
    copied into this run's results."""


@dataclass
class LabelledConfig:
    """The labelled passages built for sparse probing / SCR / TPP (column1 = document, column2 = dialogue)."""

    min_words: int = 12
    """Paragraphs shorter than this many words are left out."""
    test_every: int = 5
    """Every ``test_every``-th kept paragraph of a document goes to the test split."""
    jsonl: str | None = None
    """A jsonl file of ``{"title", "text"}`` documents (None: Jane Austen's six novels)."""


@dataclass
class CoreConfig:
    """SAEBench's core metrics (reconstruction, loss recovered, sparsity)."""

    dataset: str | None = "Skylion007/openwebtext"
    """Hub dataset of the eval text (None: the harvest text after the harvested contexts, never seen by the fit)."""
    context_size: int = 128
    """Tokens per eval context."""
    batch_size_prompts: int = 16
    """Contexts per batch."""
    n_eval_reconstruction_batches: int = 200
    """Batches for the reconstruction / CE metrics (3 LLM forwards each: the costly part)."""
    n_eval_sparsity_variance_batches: int = 2000
    """Batches for the sparsity / variance metrics."""
    positions: str = "both"
    """Positions the numbers cover: ``all`` (SAEBench's core as published, ``eval_results/core/``), ``fit`` (the
    positions the fit used: those the harvest left out, special tokens and, with ``harvest.outlier_norm_factor``,
    norm outliers, pass through unreconstructed and out of every mean; ``eval_results/core_fit_positions/``) or
    ``both`` (about twice core's cost)."""
    reuse_forwards_mb: float = 2048.0
    """Memory (MiB, on the eval device) for the LLM forwards that do not depend on the SAE (clean logits, hook
    activations, the zero-ablated CE and KL), computed once and reused by every SAE and position set
    (:mod:`pipeline.evals.metrics.shared_forwards`, :mod:`pipeline.evals.metrics.recons_loss`); results that
    would overflow it are recomputed. 0: none kept (and SAEBench's own ``get_recons_loss`` runs)."""

    def __post_init__(self) -> None:
        if self.positions not in ("all", "fit", "both"):
            raise ValueError(f"eval.core.positions={self.positions!r} must be one of all, fit, both")
        if self.reuse_forwards_mb < 0:
            raise ValueError(f"eval.core.reuse_forwards_mb={self.reuse_forwards_mb} must be >= 0 (0: keep none)")


@dataclass
class CacheConfig:
    """The persistent cache of SAEBench's SAE-independent work (LLM activations, probes), shared by every run
    on one model and hook (``docs/eval-cache.md``; :mod:`pipeline.evals.artifact_cache`). It serves core's
    SAE-independent forwards and the residual its splices start from, absorption's first-letter probe and the
    activations and LLM probes of sparse probing, SCR and TPP, and RAVEL's filtered prompts; results equal an
    uncached run's bit for bit."""

    enabled: bool = True
    """Use the cache: read a verified entry instead of recomputing, publish what a cold run computed. False:
    every run computes its own, in its own ``artifacts/`` folder."""
    root: str | None = None
    """Folder of the cache. None: ``eval_cache/`` beside the activation store (inside the harvest stage folder,
    so every dictionary, baseline and sweep point on that harvest shares it)."""
    max_gb: float = 20.0
    """Cap on the cache's total size (GiB); the least recently used entries are removed past it, and an entry
    larger than the cap on its own is not kept."""

    def __post_init__(self) -> None:
        if self.max_gb <= 0:
            raise ValueError(f"eval.cache.max_gb={self.max_gb} must be > 0 (eval.cache.enabled=false turns it off)")


@dataclass
class MetricConfig:
    """A metric whose settings are SAEBench's own config dataclass."""

    config: dict[str, Any] = field(default_factory=dict)
    """Fields of SAEBench's config dataclass of the metric (unknown keys fail); ``{}`` = SAEBench's defaults.
    ``model_name``, ``llm_dtype`` and ``llm_batch_size`` are set by the stage."""


@dataclass
class AbsorptionConfig(MetricConfig):
    """SAEBench's feature absorption (first-letter probes)."""

    vocab_size: int | None = None
    """Alphabetic tokens subsampled from the vocabulary (None: all of them)."""
    min_words_per_letter: int = 12
    """Words of every first letter kept in the subsample (SAEBench needs each letter in its train split)."""
    low_confidence_below_params: float = 2.0e9
    """Models with fewer parameters get a low-confidence note in the report."""
    seed: int = 0
    """Seed of the vocabulary subsample and of SAEBench's train/test split of it."""
    reuse_activations_mb: float = 512.0
    """Memory (MiB) for the activations at the hook of absorption's prompts, run once for every SAE and kept in
    the eval cache (:mod:`pipeline.evals.metrics.prompt_activations`); 0: SAEBench runs the LLM for every SAE."""

    def __post_init__(self) -> None:
        if self.reuse_activations_mb < 0:
            raise ValueError(
                f"eval.absorption.reuse_activations_mb={self.reuse_activations_mb} must be >= 0 (0: keep none)"
            )


@dataclass
class AutointerpConfig(MetricConfig):
    """SAEBench's automated interpretability: a judge LLM explains latents from their top activations, then
    scores the explanations. The judge is any OpenAI-compatible endpoint (:mod:`pipeline.evals.judge`)."""

    api_key_env: str | None = None
    """Environment variable holding the judge's API key. None: ``$OPENAI_API_KEY`` for OpenAI's API (no
    ``base_url``; unset, the metric is skipped with the reason), and no key at all for a ``base_url``. A custom
    endpoint gets a key only when this names its variable (unset, the metric is skipped with the reason), and
    never over plain HTTP to a host other than this machine (``http://localhost``, 127.0.0.0/8, ``[::1]``): the
    config check refuses that; use ``https://``."""
    base_url: str | None = None
    """The judge's OpenAI-compatible endpoint, an ``http(s)://`` URL, e.g. ``http://localhost:8000/v1`` (vLLM,
    llama.cpp's ``llama-server``, ``transformers serve``). None: OpenAI's API. What the stage writes of it
    (``eval_info.json``, the report, ``config.yaml``, ``.hydra/``) has its user-info and query string redacted."""
    model: str = "gpt-4o-mini"
    """The judge model name sent with every request (SAEBench hard-codes gpt-4o-mini, the judge of its published
    scores); for a local server, the name it serves (vLLM: the model path or ``--served-model-name``)."""
    stream: bool = False
    """Ask for streamed completions and join them (for servers that only stream, e.g. ``transformers serve``)."""
    timeout_s: float = 120.0
    """Seconds one judge request may take (the client retries twice)."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """Server-specific options added to every judge request (e.g. ``{temperature: 0}``). Fields whose name looks
    like a secret (``api_key``, ``Authorization``, ``*_token``, ...: :func:`pipeline.utils.redact.is_secret_name`)
    are sent, and redacted in everything the pipeline writes (as are those of ``scoring_extra_body``)."""
    scoring_extra_body: dict[str, Any] = field(default_factory=dict)
    """Options added to the scoring requests only, where SAEBench parses comma-separated example numbers or
    "None": constrained decoding for a small judge, e.g. llama.cpp's ``{grammar: ...}`` or vLLM's
    ``{guided_regex: ...}`` (:data:`pipeline.evals.judge.SCORING_GRAMMAR` / ``SCORING_REGEX``)."""
    low_confidence: bool | None = None
    """Flag the scores low-confidence in the report. None: flagged whenever the judge is not gpt-4o-mini (scores
    are then not comparable with SAEBench's published ones, and a small judge explains and predicts poorly)."""


@dataclass
class RavelConfig(MetricConfig):
    """SAEBench's RAVEL (attribute disentanglement through an MDBM trained on the SAE's latents)."""

    data_dir: str | None = None
    """Local RAVEL prompts, instead of SAEBench's download of ``adamkarvonen/ravel_prompts``: a folder holding
    ``base/`` or the ``base/`` folder itself, with ``ravel_<entity>_{attribute_to_prompts, prompt_to_split,
    entity_attributes, entity_to_split}.json`` for every entity type of ``config.entity_attribute_selection``.
    Copied into the run's artifacts (never written to). None: the hub."""
    model_dir: str | None = None
    """The HF model RAVEL loads, as a ``save_pretrained`` folder (config.json, weights, tokenizer). None:
    ``model.path`` if set, else the converted folder of an offline model (smollm2-135m, gemma-3-270m), else
    SAEBench's hub name (gemma-2-2b, pythia-160m-deduped only)."""
    low_confidence_below_params: float = 2.0e9
    """Models with fewer parameters get a low-confidence note (SAEBench's RAVEL targets >= 2B models)."""

    def __post_init__(self) -> None:
        if self.low_confidence_below_params < 0:
            raise ValueError(f"eval.ravel.low_confidence_below_params={self.low_confidence_below_params} must be >= 0")


@dataclass
class EvalConfig:
    """The ``eval`` node: which SAEs go through which SAEBench metrics, at which sizes."""

    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    """SAEBench metrics to run, in order (core, absorption, sparse_probing, scr, tpp, autointerp, ravel,
    unlearning); one whose requirements are missing here is skipped with the reason."""
    saes: list[str] = field(default_factory=lambda: list(FIT_SAES))
    """SAEs to evaluate: ``dictionary``, ``baselines`` (every trained baseline) and/or baselines by name."""
    hub_baselines: list[HubBaseline] = field(default_factory=list)
    """SAEBench's published suites (baseline b)."""
    device: str | None = None
    """Device of the evals (None: ``model.device``)."""
    llm_batch_size: int = 32
    """LLM batch size handed to every SAEBench metric."""
    force_rerun: bool = False
    """False: an existing SAEBench result file is kept, not recomputed."""
    local_datasets: dict[str, str] = field(default_factory=dict)
    """SAEBench hub dataset name -> local copy (folder of parquet/jsonl/csv files, or a save_to_disk folder)."""
    encode_cache_mb: int = 2048
    """MiB of codes the dictionary SAE keeps for repeated batches (SCR/TPP re-encode them)."""
    signed_export: str = SPLIT
    """How a signed dictionary (``dictionary.coder.nonnegative=false``, e.g. ``dictionary=reference``) is handed
    to SAEBench (:mod:`pipeline.saes.export_forms`): ``split`` = 2K non-negative latents, ``W_dec = [D; -D]``,
    codes ``[relu(x), relu(-x)]``, read correctly by every metric; ``signed`` = K latents with signed codes,
    ``W_dec = D``, as the DB-KSVD authors' SAEBench wrapper: core, sparse_probing, scr and ravel run on it, and
    absorption, tpp, autointerp and unlearning (whose SAEBench code reads a latent as active only where it is
    > 0) skip it with the reason (``MetricRunner.signed_codes``). A non-negative dictionary has one form (K
    latents) and ignores this."""
    labelled: LabelledConfig = field(default_factory=LabelledConfig)
    """The labelled passages for sparse probing / SCR / TPP."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The cache of SAE-independent work shared across runs (not part of the stage hash: it changes no
    result)."""
    core: CoreConfig = field(default_factory=CoreConfig)
    """Core metrics."""
    absorption: AbsorptionConfig = field(default_factory=AbsorptionConfig)
    """Feature absorption."""
    sparse_probing: MetricConfig = field(default_factory=MetricConfig)
    """Sparse probing (SAEBench's SparseProbingEvalConfig)."""
    scr: MetricConfig = field(default_factory=MetricConfig)
    """Spurious correlation removal (SAEBench's ScrAndTppEvalConfig)."""
    tpp: MetricConfig = field(default_factory=MetricConfig)
    """Targeted probe perturbation (SAEBench's ScrAndTppEvalConfig)."""
    autointerp: AutointerpConfig = field(default_factory=AutointerpConfig)
    """Automated interpretability."""
    ravel: RavelConfig = field(default_factory=RavelConfig)
    """RAVEL (SAEBench's RAVELEvalConfig, local data / model folders)."""
    unlearning: MetricConfig = field(default_factory=MetricConfig)
    """Unlearning (SAEBench's UnlearningEvalConfig)."""


def parse_eval_config(node: DictConfig | dict[str, Any] | None) -> EvalConfig:
    """The ``eval`` node as a typed :class:`EvalConfig`.

    An unknown key, a value of the wrong type or an unset value raises ``ValueError`` naming ``eval.<key>``.
    """
    if node is None:
        raise ValueError("config has no `eval` node; add `- eval: offline_small` to the defaults list")
    data = as_dict(node)
    for i, entry in enumerate(data.get("hub_baselines") or []):  # OmegaConf's errors in a list item lose its path
        typed_node(entry, HubBaseline, f"eval.hub_baselines[{i}]")
    return typed_node(data, EvalConfig, "eval")


def validate_eval_config(e: EvalConfig) -> None:
    """Check what the schema's types cannot: metric names, the SAE entries, the hub baselines, the signed export
    form, positive sizes. ``ValueError`` names the key. Each metric's ``config:`` keys are checked by
    :func:`pipeline.evals.metrics.check_metric_configs`."""
    unknown = [m for m in e.metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"eval.metrics has unknown metric(s) {unknown}; choose from {list(METRICS)}")
    if len(set(e.saes)) != len(e.saes):
        raise ValueError(f"eval.saes={e.saes} names an SAE twice")
    for i, b in enumerate(e.hub_baselines):
        if b.results_dir is None and (b.release is None or b.sae_id is None):
            raise ValueError(
                f"eval.hub_baselines[{i}] needs release and sae_id (an SAE on the hub) or results_dir "
                "(published result files)"
            )
    if e.llm_batch_size < 1:
        raise ValueError(f"eval.llm_batch_size={e.llm_batch_size} must be at least 1")
    check_signed_export(e.signed_export)
    if e.encode_cache_mb < 0:
        raise ValueError(f"eval.encode_cache_mb={e.encode_cache_mb} must be >= 0 (0 = no cache)")
    if e.labelled.test_every < 2:
        raise ValueError(f"eval.labelled.test_every={e.labelled.test_every} must be at least 2 (train and test)")
    check_judge_endpoint(e.autointerp.base_url, e.autointerp.api_key_env)


def check_judge_endpoint(base_url: str | None, api_key_env: str | None) -> None:
    """``ValueError`` naming ``eval.autointerp.base_url`` when it is not an ``http(s)://host...`` URL, and naming
    ``eval.autointerp.api_key_env`` when a key would go over plain HTTP to a host that is not this machine."""
    if base_url is None:
        return
    shown = redact_url(base_url)
    try:
        parts = urlsplit(base_url)
        host = parts.hostname
    except ValueError:
        parts, host = None, None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise ValueError(
            f"eval.autointerp.base_url={shown!r} is not an http(s) URL; write the server's OpenAI-compatible "
            "endpoint in full, e.g. http://localhost:8000/v1 (a server on this machine) or https://host/v1"
        )
    if api_key_env and parts.scheme == "http" and not is_loopback_host(host):
        raise ValueError(
            f"eval.autointerp.api_key_env={api_key_env!r} would send the key over plain HTTP to {host}, which is not "
            f"this machine; use https:// in eval.autointerp.base_url ({shown}), or api_key_env=null for a server "
            "that needs no key"
        )
