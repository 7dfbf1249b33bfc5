"""Whole-config validation before any heavy work: unknown keys, impossible combinations, missing pieces.

Each failure is a ``ValueError`` naming the key and the fix. The harvest nodes are checked by
:func:`pipeline.data.config.parse_harvest_config`; the dictionary node against
:class:`pipeline.core.learner.LearnerConfig`; model shapes (d, n_layers) come from :data:`KNOWN_SHAPES` when the model
is known without loading it, else they are checked after loading, before the harvest starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.core.learner import LearnerConfig
from pipeline.data.config import parse_harvest_config
from pipeline.runs.layout import STAGES
from pipeline.evals.topk_sae import TopKConfig

#: (d_model, n_layers) of the models we know by name.
KNOWN_SHAPES: dict[str, tuple[int, int]] = {
    "smollm2-135m": (576, 30),
    "gemma-3-270m": (640, 18),
    "gemma-2-2b": (2304, 26),
    "pythia-160m-deduped": (768, 12),
    "pythia-160m": (768, 12),
    "pythia-70m-deduped": (512, 6),
}

TOP_LEVEL = {"model", "data", "harvest", "dictionary", "baseline", "eval", "report", "experiment_name",
             "output_root", "stage", "run_dir"}


def check_config(cfg: DictConfig) -> None:
    """Raise ``ValueError`` for the first problem found in ``cfg``."""
    unknown = set(cfg.keys()) - TOP_LEVEL
    if unknown:
        raise ValueError(f"unknown top-level config key(s) {sorted(unknown)}; valid keys: {sorted(TOP_LEVEL)}.")
    if cfg.stage not in ("all", *STAGES):
        raise ValueError(f"stage={cfg.stage!r} is not one of all, {', '.join(STAGES)}.")
    model, _, harvest = parse_harvest_config(cfg)
    learner = _learner(cfg.dictionary)
    _typed_keys(cfg.baseline, TopKConfig, "baseline", extra={"topk"}, skip={"n_latents", "k"})
    shape = KNOWN_SHAPES.get(model.name) if not model.path else None
    if shape is not None:
        d, n_layers = shape
        layers = harvest.layers if harvest.layers is not None else [model.layer]
        for layer in layers:
            if not 0 <= layer < n_layers:
                raise ValueError(f"layer {layer} does not exist: {model.name} has {n_layers} layers (0..{n_layers - 1}); "
                                 f"set model.layer / harvest.layers accordingly.")
        _prefixed(learner.validate, d)
    elif learner.n_atoms < learner.k or learner.k < 1:
        _prefixed(learner.validate, max(learner.k, 1))


def _prefixed(check, *args) -> None:
    """Re-raise a learner validation error with the config path of the keys."""
    try:
        check(*args)
    except ValueError as exc:
        raise ValueError(f"dictionary: {exc} (set dictionary.k / dictionary.n_atoms)") from None


def _learner(node: Any) -> LearnerConfig:
    opts = _typed_keys(node, LearnerConfig, "dictionary")
    missing = [k for k in ("n_atoms", "k") if opts.get(k) is None]
    if missing:
        raise ValueError(f"dictionary.{missing[0]} must be set (e.g. dictionary.{missing[0]}=...).")
    cfg = LearnerConfig(**opts)
    choices = dict(method=("mp", "omp"), init=("data", "uniform"), reseed=("worst", "random", None),
                   precision=("fp32", "tf32", "bf16"))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"dictionary.{key}={getattr(cfg, key)!r} is not one of {allowed}.")
    return cfg


def _typed_keys(node: Any, schema: type, key: str, extra: set[str] = frozenset(),
                skip: set[str] = frozenset()) -> dict[str, Any]:
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    valid = {f.name for f in dataclasses.fields(schema)} - set(skip) | set(extra)
    unknown = set(data) - valid
    if unknown:
        raise ValueError(f"unknown key(s) {[f'{key}.{u}' for u in sorted(unknown)]}; valid keys under `{key}`: "
                         f"{sorted(valid)}.")
    return {k: v for k, v in data.items() if k not in extra}
