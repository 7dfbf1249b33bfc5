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
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from pipeline.data.config import parse_harvest_config
from pipeline.data.harvest import hook_layer
from pipeline.data.hub import hub_reachable
from pipeline.data.models import load_model
from pipeline.data.store import ActivationStore
from pipeline.evals import results as layout
from pipeline.evals.config import EvalConfig, parse_eval_config, validate_eval_config
from pipeline.evals.kept_results import ResultLedger, drop_unreadable, weights_sha256
from pipeline.evals.labelled_data import build_labelled_text, labelled_documents
from pipeline.evals.metrics import METRICS, EvalContext, check_metric_configs, needs_labelled, run_metrics
from pipeline.evals.sae_records import describe_heldout, export_sae_lens, fit_records, hub_records
from pipeline.runs.config import baseline_specs, check_config_or_exit, register_configs
from pipeline.runs.layout import DICTIONARY_DIRNAME, finished_stage_dir, is_done, mark_done, prepare, stage_dir
from pipeline.runs.layout import store_dir as run_store_dir
from pipeline.utils.devices import resolve_device

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
    e = parse_eval_config(cfg["eval"] if "eval" in cfg else None)
    validate_eval_config(e)
    check_metric_configs(e)
    return e


def _run(
    cfg: DictConfig | dict,
    run_dir: str | Path | None,
    fit_dir: str | Path | None,
    baselines_dir: str | Path | None,
    store_dir: str | Path | None,
    model: Any,
) -> Path:
    e = check(cfg)
    model_cfg, source, harvest = parse_harvest_config(cfg)
    device = str(resolve_device(e.device or model_cfg.device))
    fit = Path(fit_dir) if fit_dir else finished_stage_dir(cfg, "fit")
    store = ActivationStore(Path(store_dir) if store_dir else run_store_dir(cfg))
    context_length = int(store.manifest.get("context_length") or harvest.context_length)
    folder = prepare(Path(run_dir) if run_dir else stage_dir(cfg, "evaluate"), cfg, "evaluate")
    results = folder / layout.RESULTS_SUBDIR
    drop_unreadable(results)  # a result torn by a kill would be kept, and break the report and the dashboards
    hub_ok = hub_reachable()

    names = list(baseline_specs(cfg))
    if baselines_dir is None and names and any(s != "dictionary" for s in e.saes):
        baselines_dir = finished_stage_dir(cfg, "baselines")
    saes, skipped = fit_records(
        e.saes,
        fit / DICTIONARY_DIRNAME,
        Path(baselines_dir) if baselines_dir else None,
        names,
        model_name=model_cfg.name,
        hook=store.hook,
        layer=hook_layer(store.hook),
        device=device,
        cache_mb=e.encode_cache_mb,
        context_size=context_length,
        prepend_bos=bool(store.manifest.get("prepend_bos", True)),
        signed_export=e.signed_export,
    )
    describe_heldout(saes, store.heldout())
    export_sae_lens(saes, folder / layout.SAE_LENS_SUBDIR)
    ledger = ResultLedger(folder, results, weights_sha256(saes, fit / DICTIONARY_DIRNAME))
    ledger.drop_stale(saes)  # results of a re-fitted dictionary / retrained baseline re-run
    hub_saes, hub_skipped = hub_records(e.hub_baselines, hub_ok, results, METRICS)
    saes, skipped = saes + hub_saes, skipped + hub_skipped

    if model is None and e.metrics:
        model = load_model(
            model_cfg.name, path=model_cfg.path, device=device, dtype=model_cfg.dtype, n_ctx=model_cfg.n_ctx
        )
    n_params = sum(p.numel() for p in model.parameters()) if model is not None else 0
    llm_dtype = str(next(model.parameters()).dtype).replace("torch.", "") if model is not None else "float32"
    info: dict[str, Any] = {
        "model": {"name": model_cfg.name, "path": model_cfg.path, "hook": store.hook, "n_params": n_params},
        "device": device,
        "sizes": {},
        "notes": [],
    }
    labelled = None
    if needs_labelled(e.metrics):  # the labelled text (document x dialogue) in SAEBench's layout
        labelled = build_labelled_text(
            folder / layout.LABELLED_SUBDIR,
            labelled_documents(e.labelled.jsonl),
            min_words=e.labelled.min_words,
            test_every=e.labelled.test_every,
        )
        info["labelled_data"] = labelled.summary()

    ctx = EvalContext(
        model=model,
        model_config=model_cfg,
        n_params=n_params,
        saes=saes,
        results_dir=results,
        artifacts_dir=folder / layout.ARTIFACTS_SUBDIR,
        device=device,
        llm_dtype=llm_dtype,
        llm_batch_size=e.llm_batch_size,
        force_rerun=e.force_rerun,
        store=store,
        text_source=source,
        labelled=labelled,
        eval=e,
        hub_reachable=hub_ok,
        info=info,
        results_ledger=ledger,
    )
    outcome = run_metrics(ctx, e.metrics)

    info["timings_s"] = outcome.timings
    info["total_eval_s"] = sum(outcome.timings.values())
    layout.write_json(folder / layout.SAES_FILE, [r.description for r in saes])
    layout.write_json(folder / layout.SKIPPED_FILE, skipped + outcome.skipped)
    layout.write_json(folder / layout.FAILED_FILE, outcome.failed)
    layout.write_json(folder / layout.INFO_FILE, info)
    if outcome.failed:
        log.error(
            "evaluate: %d metric(s) failed (%s); see %s. Re-run to retry them (finished results are kept).",
            len(outcome.failed),
            ", ".join(f["metric"] for f in outcome.failed),
            folder / layout.FAILED_FILE,
        )
    else:
        mark_done(folder, metrics=e.metrics, saes=[r.selected[0] for r in saes], seconds=info["total_eval_s"])
    return folder


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    check_config_or_exit(cfg)
    folder = run(cfg)
    print(f"evaluation: {folder} ({'done' if is_done(folder) else 'incomplete: see failed.json'})")


if __name__ == "__main__":
    main()
