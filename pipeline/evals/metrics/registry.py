"""Metric name -> runner, and the loop that runs the selected metrics, recording skips and failures."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.evals.config import METRICS, EvalConfig, MetricConfig
from pipeline.evals.labelled_data import registered_labelled_dataset
from pipeline.evals.metrics.absorption import AbsorptionRunner
from pipeline.evals.metrics.autointerp import AutointerpRunner
from pipeline.evals.metrics.base import EvalContext, MetricRunner
from pipeline.evals.metrics.core import CoreRunner
from pipeline.evals.metrics.probing import ScrTppRunner, SparseProbingRunner
from pipeline.evals.metrics.ravel import RavelRunner
from pipeline.evals.metrics.unlearning import UnlearningRunner
from pipeline.evals.results import format_exception
from pipeline.evals.sae_records import SAERecord
from pipeline.evals.saebench_patches import atomic_result_writes, local_datasets
from pipeline.utils.heap import frozen_heap

log = logging.getLogger(__name__)

REGISTRY: dict[str, MetricRunner] = {
    r.name: r
    for r in (
        CoreRunner(),
        AbsorptionRunner(),
        SparseProbingRunner(),
        ScrTppRunner("scr"),
        ScrTppRunner("tpp"),
        AutointerpRunner(),
        RavelRunner(),
        UnlearningRunner(),
    )
}
"""Every SAEBench metric the pipeline runs, by name (its ``eval.metrics`` entry and result folder)."""
if tuple(REGISTRY) != METRICS:
    raise RuntimeError(f"the metric registry {tuple(REGISTRY)} and the eval schema's {METRICS} must name the same")


def check_metric_configs(e: EvalConfig) -> None:
    """Each metric's ``config:`` keys against SAEBench's config dataclass of that metric (imports SAEBench's
    ``eval_config`` modules); ``ValueError`` names ``eval.<metric>.config.<key>``."""
    for name, runner in REGISTRY.items():
        node = getattr(e, name)
        if isinstance(node, MetricConfig):
            runner.check_config_keys(node.config)


@dataclass
class MetricOutcome:
    """What the loop records: ``skipped.json`` / ``failed.json`` entries and per-metric wall time."""

    skipped: list[dict[str, Any]] = field(default_factory=list)
    """``{"what": "metric:<name>", "reason"}`` (or with ``"sae"``: one SAE without a result file)."""
    failed: list[dict[str, Any]] = field(default_factory=list)
    """``{"metric", "error"}`` of every metric that raised."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per metric."""


def needs_labelled(metrics: list[str]) -> bool:
    """Whether any of ``metrics`` reads the labelled passages."""
    return any(REGISTRY[m].needs_labelled for m in metrics)


def result_files(runner: MetricRunner, ctx: EvalContext, record: SAERecord) -> list[Path]:
    """The result files ``runner`` writes for ``record``: its ``result_paths`` when it has one (core: one per
    ``eval.core.positions`` run), else ``<results_dir>/<metric>/<file>``."""
    paths = getattr(runner, "result_paths", None)
    return paths(ctx, record) if paths is not None else [record.result_path(ctx.results_dir, runner.name)]


def has_signed_codes(record: SAERecord) -> bool:
    """Whether ``record``'s SAE hands SAEBench signed codes (a signed dictionary with
    ``eval.signed_export=signed``)."""
    return bool(getattr(record.sae, "signed_codes", False))


def signed_codes_skip(runner: MetricRunner, record: SAERecord) -> dict[str, Any]:
    """The skip record of an SAE with signed codes for a metric that cannot read them
    (:attr:`MetricRunner.signed_codes`)."""
    return {
        "what": f"metric:{runner.name}",
        "sae": record.selected[0],
        "reason": (
            f"eval.signed_export=signed hands this SAE's signed codes to SAEBench, which {runner.name} cannot "
            f"read: {runner.signed_codes} Evaluate it with eval.signed_export=split (the default: the ± split, "
            "2K non-negative latents) for this metric."
        ),
    }


def run_metric(ctx: EvalContext, name: str, outcome: MetricOutcome) -> None:
    """Run one metric with SAEBench pointed at the local data; a missing requirement or a missing result file
    becomes a skip record, an exception a failure record (the other metrics still run). An SAE with signed codes
    (:func:`has_signed_codes`) is left out of a metric that cannot read them, with a skip record saying why
    (:func:`signed_codes_skip`); the metric still runs for the other SAEs. SAEBench's result writes are atomic
    meanwhile (:func:`~pipeline.evals.saebench_patches.atomic_result_writes`), and the result files are then
    recorded with their SAE's weights' sha256 in ``ctx.results_ledger`` (when set)."""
    runner = REGISTRY[name]
    if runner.signed_codes is not None and any(has_signed_codes(r) for r in ctx.saes):
        outcome.skipped.extend(signed_codes_skip(runner, r) for r in ctx.saes if has_signed_codes(r))
        ctx = dataclasses.replace(ctx, saes=[r for r in ctx.saes if not has_signed_codes(r)])
        if not ctx.saes:
            outcome.timings[name] = 0.0
            return
    local = dict(ctx.eval.local_datasets)
    if ctx.labelled is not None:
        local[ctx.labelled.base_name] = ctx.labelled.path
    labelled = registered_labelled_dataset(ctx.labelled) if ctx.labelled is not None else contextlib.nullcontext()
    t0 = time.perf_counter()
    try:
        with local_datasets(local), labelled, atomic_result_writes():
            reason = runner.requirements(ctx)
            if reason is None:
                config = runner.config(ctx)
                runner.run(ctx, config)
        if reason is not None:
            outcome.skipped.append({"what": f"metric:{name}", "reason": reason})
        else:
            for record in ctx.saes:
                if not all(path.exists() for path in result_files(runner, ctx, record)):
                    outcome.skipped.append(
                        {
                            "what": f"metric:{name}",
                            "sae": record.selected[0],
                            "reason": runner.no_result_reason(ctx, config),
                        }
                    )
    except Exception as exc:  # noqa: BLE001 - recorded, the other metrics still run
        log.exception("metric %s failed", name)
        outcome.failed.append({"metric": name, "error": format_exception(exc)})
    if getattr(ctx, "results_ledger", None) is not None:  # what now exists was computed from these weights
        ctx.results_ledger.note(ctx.saes, lambda record: result_files(runner, ctx, record))
    outcome.timings[name] = time.perf_counter() - t0
    log.info("%s took %.1f s", name, outcome.timings[name])


def run_metrics(ctx: EvalContext, names: list[str]) -> MetricOutcome:
    """Run ``names`` in order (:func:`run_metric`), with the heap alive beforehand (the model, the datasets, the
    imports) left out of the per-SAE garbage collections SAEBench makes (:func:`~pipeline.utils.heap.frozen_heap`)."""
    outcome = MetricOutcome()
    with frozen_heap():
        for name in names:
            run_metric(ctx, name, outcome)
    return outcome
