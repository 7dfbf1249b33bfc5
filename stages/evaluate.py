"""Evaluate stage: the fitted dictionary and its baselines through SAEBench's own eval code.

    python -m stages.evaluate                              # the configured experiment's fit + harvest outputs
    python -m stages.evaluate eval=paper                   # SAEBench's full sizes (hub data, GPU)
    python -m stages.evaluate eval.metrics=[core,sparse_probing]

Inputs: the fit stage's dictionary, the baselines stage's sae-lens SAEs, the harvest stage's activation store.
Outputs in the stage folder (layout: :mod:`pipeline.evals.results`): SAEBench's result files ``eval_results/<metric>/``,
``saes.json``, ``skipped.json``, ``failed.json``, ``eval_info.json``, ``result_weights.json`` and
``sae_lens/<name>/``. The config: :class:`pipeline.evals.config.EvalConfig`; the metrics:
:mod:`pipeline.evals.metrics`. An existing result file is kept unless ``eval.force_rerun``, it does not parse, or
its SAE's weights changed since it was computed (:mod:`pipeline.evals.kept_results`); SAEBench's result writes are
atomic. The stage is marked done only when no metric failed, so a re-run retries just the failed ones.

The steps (a point's SAEs, the metrics over them, the point's outputs) are :mod:`pipeline.runs.evaluation`'s,
which the joint evaluation of a sweep (``stage=evaluate_sweep``, :mod:`pipeline.runs.sweep_eval`) shares.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from pipeline.evals.config import EvalConfig
from pipeline.runs.config import check_config_or_exit, register_configs
from pipeline.runs.evaluation import check_eval, eval_setup, load_eval_model, point_saes, run_records, write_point
from pipeline.runs.layout import finished_stage_dir, is_done, stage_dir

log = logging.getLogger(__name__)


def run(
    cfg: DictConfig | dict,
    *,
    run_dir: str | Path | None = None,
    fit_dir: str | Path | None = None,
    baselines_dir: str | Path | None = None,
    store_dir: str | Path | None = None,
    model: Any = None,
) -> Path:
    """Evaluate the configured experiment's dictionary (and baselines); returns the stage folder.

    ``run_dir`` / ``fit_dir`` / ``baselines_dir`` / ``store_dir`` default to the run layout's folders; ``model`` may be
    passed in already loaded (else it is loaded from ``cfg.model``). SAEBench switches autograd off globally (SCR/TPP
    call ``torch.set_grad_enabled(False)``); the caller's mode is restored, so later work in the same process
    (the next job of a sweep) can still train.
    """
    grad = torch.is_grad_enabled()
    try:
        return _run(cfg, run_dir, fit_dir, baselines_dir, store_dir, model)
    finally:
        torch.set_grad_enabled(grad)


def check(cfg: DictConfig | dict) -> EvalConfig:
    """The ``eval`` node, typed and checked, SAEBench's config keys of each metric included (the orchestrator calls
    this before the first stage of a run that will evaluate)."""
    return check_eval(cfg)


def _run(
    cfg: DictConfig | dict,
    run_dir: str | Path | None,
    fit_dir: str | Path | None,
    baselines_dir: str | Path | None,
    store_dir: str | Path | None,
    model: Any,
) -> Path:
    e = check(cfg)
    fit = Path(fit_dir) if fit_dir else finished_stage_dir(cfg, "fit")
    setup = eval_setup(cfg, e, store_dir)
    folder = Path(run_dir) if run_dir else stage_dir(cfg, "evaluate")
    point = point_saes(cfg, setup, folder, fit, Path(baselines_dir) if baselines_dir else None)
    if model is None and e.metrics:
        model = load_eval_model(setup)
    outcome, info = run_records(setup, point.records, point.folder, model, point.ledger)
    write_point(point, e.metrics, outcome, info)
    return point.folder


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    check_config_or_exit(cfg)
    folder = run(cfg)
    print(f"evaluation: {folder} ({'done' if is_done(folder) else 'incomplete: see failed.json'})")


if __name__ == "__main__":
    main()
