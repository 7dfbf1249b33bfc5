"""One evaluation in three steps, shared by the evaluate stage (one point) and the joint evaluation of a sweep
(:mod:`pipeline.runs.sweep_eval`: every point of an experiment in one pass).

1. :func:`point_saes`: a point's evaluate folder prepared, its SAE records built (the dictionary, the baselines,
   the hub suites), described, exported and checked against the results already there (:class:`PointSAEs`);
2. :func:`run_records`: the selected metrics over a list of records, in one work folder (``eval_results/``,
   ``artifacts/``, ``data/labelled/``), with the model loaded once; returns the outcome and ``eval_info.json``;
3. :func:`write_point`: a point's record files (``saes.json``, ``skipped.json``, ``failed.json``,
   ``eval_info.json``) and, when no metric failed, its completion marker.

The layout of the folder: :mod:`pipeline.evals.results`; what is kept on a re-run: :mod:`pipeline.evals.kept_results`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.data.config import ModelConfig, parse_harvest_config
from pipeline.data.harvest import hook_layer
from pipeline.data.hub import hub_reachable
from pipeline.data.models import load_model
from pipeline.data.store import ActivationStore
from pipeline.data.text import TextSource
from pipeline.evals import results as layout
from pipeline.evals.config import EvalConfig, parse_eval_config, validate_eval_config
from pipeline.evals.kept_results import (
    ResultLedger,
    baseline_content,
    drop_unreadable,
    weights_file,
    weights_sha256,
)
from pipeline.evals.labelled_data import build_labelled_text, labelled_documents
from pipeline.evals.metrics import (
    METRICS,
    EvalContext,
    MetricOutcome,
    check_metric_configs,
    needs_labelled,
    run_metrics,
)
from pipeline.evals.sae_records import SAERecord, describe_heldout, export_sae_lens, fit_records, hub_records
from pipeline.runs.config import baseline_specs
from pipeline.runs.layout import DICTIONARY_DIRNAME, finished_stage_dir, mark_done, prepare
from pipeline.runs.layout import store_dir as run_store_dir
from pipeline.utils.devices import resolve_device

log = logging.getLogger(__name__)


def check_eval(cfg: DictConfig | dict) -> EvalConfig:
    """The ``eval`` node, typed and checked, SAEBench's config keys of each metric included."""
    e = parse_eval_config(cfg["eval"] if "eval" in cfg else None)
    validate_eval_config(e)
    check_metric_configs(e)
    return e


@dataclass
class EvalSetup:
    """What every point evaluated on one activation store shares."""

    eval: EvalConfig
    """The typed ``eval`` node."""
    model: ModelConfig
    """The ``model`` node (the model the store was harvested from)."""
    source: TextSource
    """The harvest text (core's eval text follows it)."""
    store: ActivationStore
    """The activation store."""
    device: str
    """Device of the evals."""
    context_length: int
    """The store's context length (the SAEs' ``context_size``)."""
    hub_ok: bool
    """Whether the Hugging Face hub answers."""


def eval_setup(cfg: DictConfig | dict, e: EvalConfig, store_dir: str | Path | None = None) -> EvalSetup:
    """The :class:`EvalSetup` of ``cfg``; ``store_dir`` defaults to the run layout's store."""
    model_cfg, source, harvest = parse_harvest_config(cfg)
    store = ActivationStore(Path(store_dir) if store_dir else run_store_dir(cfg))
    return EvalSetup(
        eval=e,
        model=model_cfg,
        source=source,
        store=store,
        device=str(resolve_device(e.device or model_cfg.device)),
        context_length=int(store.manifest.get("context_length") or harvest.context_length),
        hub_ok=hub_reachable(),
    )


@dataclass
class PointSAEs:
    """One point's SAEs, ready for the metrics, and where its outputs go."""

    folder: Path
    """The point's evaluate folder."""
    dictionary_dir: Path
    """The fit's dictionary folder."""
    records: list[SAERecord]
    """Its SAEs (the dictionary, the baselines, the hub suites SAEBench loads)."""
    skipped: list[dict[str, Any]]
    """``skipped.json``'s entries found while building them."""
    ledger: ResultLedger
    """``result_weights.json`` of the folder (stale results already dropped)."""

    @property
    def results_dir(self) -> Path:
        return self.folder / layout.RESULTS_SUBDIR

    def identity(self, record: SAERecord) -> tuple[str, ...]:
        """What makes two records the same SAE: a baseline's content (its weights and config files' digests,
        :func:`~pipeline.evals.kept_results.baseline_content`), the file holding any other SAE's weights, or a hub
        SAE's ``(release, sae_id)``."""
        if record.hub is not None:
            return ("hub", *record.hub)
        content = baseline_content(record)
        if content is not None:
            return ("baseline", *content)
        path = weights_file(record, self.dictionary_dir)
        return ("weights", str(path.resolve())) if path is not None else ("point", str(self.folder), record.name)


def point_saes(
    cfg: DictConfig | dict,
    setup: EvalSetup,
    folder: Path,
    fit_dir: Path,
    baselines_dir: Path | None = None,
) -> PointSAEs:
    """Prepare the evaluate folder ``folder`` of ``cfg``'s point (its ``config.yaml``; torn result files dropped)
    and build the SAEs its ``eval.saes`` names (``setup``'s when ``cfg`` has no ``eval``): the dictionary of
    ``fit_dir`` and the baselines of ``baselines_dir`` (default: the run layout's, when it asks for any), each
    described on the held-out rows, the dictionary exported in the sae-lens format; results of weights that
    changed since are dropped; the hub suites added."""
    e = setup.eval
    wanted = parse_eval_config(cfg["eval"]).saes if "eval" in cfg else e.saes  # the point's own eval.saes
    folder = prepare(folder, cfg, "evaluate")
    results = folder / layout.RESULTS_SUBDIR
    drop_unreadable(results)  # a result torn by a kill would be kept, and break the report and the dashboards
    names = list(baseline_specs(cfg))
    if baselines_dir is None and names and any(s != "dictionary" for s in wanted):
        baselines_dir = finished_stage_dir(cfg, "baselines")
    dictionary_dir = fit_dir / DICTIONARY_DIRNAME
    saes, skipped = fit_records(
        wanted,
        dictionary_dir,
        baselines_dir,
        names,
        model_name=setup.model.name,
        hook=setup.store.hook,
        layer=hook_layer(setup.store.hook),
        device=setup.device,
        cache_mb=e.encode_cache_mb,
        context_size=setup.context_length,
        prepend_bos=bool(setup.store.manifest.get("prepend_bos", True)),
        signed_export=e.signed_export,
    )
    describe_heldout(saes, setup.store.heldout())
    export_sae_lens(saes, folder / layout.SAE_LENS_SUBDIR)
    ledger = ResultLedger(folder, results, weights_sha256(saes, dictionary_dir))
    ledger.drop_stale(saes)  # results of a re-fitted dictionary / retrained baseline re-run
    hub_saes, hub_skipped = hub_records(e.hub_baselines, setup.hub_ok, results, METRICS)
    return PointSAEs(folder, dictionary_dir, saes + hub_saes, skipped + hub_skipped, ledger)


def load_eval_model(setup: EvalSetup) -> Any:
    """The model of ``setup`` on the eval device."""
    m = setup.model
    return load_model(m.name, path=m.path, device=setup.device, dtype=m.dtype, n_ctx=m.n_ctx)


def run_records(
    setup: EvalSetup, records: list[SAERecord], work: Path, model: Any, ledger: Any = None
) -> tuple[MetricOutcome, dict[str, Any]]:
    """Run ``eval.metrics`` over ``records`` in the folder ``work`` (SAEBench's results in ``eval_results/``, its
    intermediate files in ``artifacts/``, the labelled passages in ``data/labelled/``); each metric's result files
    are then handed to ``ledger.note`` (a :class:`~pipeline.evals.kept_results.ResultLedger`, or anything with its
    ``note``). Returns the outcome and ``eval_info.json`` (model, device, sizes, notes, timings)."""
    e = setup.eval
    n_params = sum(p.numel() for p in model.parameters()) if model is not None else 0
    llm_dtype = str(next(model.parameters()).dtype).replace("torch.", "") if model is not None else "float32"
    info: dict[str, Any] = {
        "model": {"name": setup.model.name, "path": setup.model.path, "hook": setup.store.hook, "n_params": n_params},
        "device": setup.device,
        "sizes": {},
        "notes": [],
    }
    labelled = None
    if needs_labelled(e.metrics):  # the labelled text (document x dialogue) in SAEBench's layout
        labelled = build_labelled_text(
            work / layout.LABELLED_SUBDIR,
            labelled_documents(e.labelled.jsonl),
            min_words=e.labelled.min_words,
            test_every=e.labelled.test_every,
        )
        info["labelled_data"] = labelled.summary()
    ctx = EvalContext(
        model=model,
        model_config=setup.model,
        n_params=n_params,
        saes=records,
        results_dir=work / layout.RESULTS_SUBDIR,
        artifacts_dir=work / layout.ARTIFACTS_SUBDIR,
        device=setup.device,
        llm_dtype=llm_dtype,
        llm_batch_size=e.llm_batch_size,
        force_rerun=e.force_rerun,
        store=setup.store,
        text_source=setup.source,
        labelled=labelled,
        eval=e,
        hub_reachable=setup.hub_ok,
        info=info,
        results_ledger=ledger,
    )
    outcome = run_metrics(ctx, e.metrics)
    info["timings_s"] = outcome.timings
    info["total_eval_s"] = sum(outcome.timings.values())
    return outcome, info


def write_point(point: PointSAEs, metrics: list[str], outcome: MetricOutcome, info: dict[str, Any]) -> bool:
    """Write ``point``'s record files from ``outcome`` and ``info`` (its own names); mark the folder done when no
    metric failed (else a re-run retries the failed ones, keeping what finished). Returns whether it is done."""
    folder = point.folder
    layout.write_json(folder / layout.SAES_FILE, [r.description for r in point.records])
    layout.write_json(folder / layout.SKIPPED_FILE, point.skipped + outcome.skipped)
    layout.write_json(folder / layout.FAILED_FILE, outcome.failed)
    layout.write_json(folder / layout.INFO_FILE, info)
    if outcome.failed:
        log.error(
            "evaluate: %d metric(s) failed (%s); see %s. Re-run to retry them (finished results are kept).",
            len(outcome.failed),
            ", ".join(f["metric"] for f in outcome.failed),
            folder / layout.FAILED_FILE,
        )
        return False
    mark_done(folder, metrics=metrics, saes=[r.selected[0] for r in point.records], seconds=info["total_eval_s"])
    return True
