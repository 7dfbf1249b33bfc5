"""A sweep evaluated together: every fitted SAE of an experiment (each point's dictionary, each baseline) in one
pass, each point's results written where its own evaluate stage would have written them.

    python -m pipeline -m experiment=smoke dictionary.coder.k=4,8 until=baselines   # each point up to its baselines
    python -m pipeline experiment=smoke stage=evaluate_sweep                        # every point's SAEs, one pass
    python -m pipeline -m experiment=smoke dictionary.coder.k=4,8                   # each point: dashboards, report

The points are found on disk (:func:`~pipeline.runs.sweep_points.discover_points`) and grouped by activation
store. Per group, the model is loaded once and each metric runs once over every distinct SAE of the points whose
evaluate folder is not done yet (all of them with ``eval.force_rerun``), so SAEBench's sharing inside one run and
core's shared forwards cover all of them. The combined run works in ``<experiment>/evaluate_sweep-<hash>/`` (the
hash of the store folder and the ``eval`` node): ``artifacts/`` and ``data/labelled/`` as in an evaluate folder,
``points.json`` (each combined-run name and the points holding that SAE under their own names), and
``eval_results/``, a staging folder emptied at the start, into which the points' kept results are linked under the
combined names, so SAEBench skips them exactly as each point's own run would.

Each point's evaluate folder gets everything its own evaluate stage writes: its results are checked, and stale
ones dropped, as there (:func:`~pipeline.runs.evaluation.point_saes`); after each metric, each result file the
combined run wrote goes to every point holding that SAE, under the point's name (inside the JSON too), and into
that point's ``result_weights.json`` (:class:`CopyBack`); at the end ``saes.json``, ``skipped.json``,
``failed.json``, ``eval_info.json`` (the combined run's, with the point's names, plus ``evaluated_together``) and,
when no metric failed, ``DONE.json``. A later ``python -m pipeline`` of the same sweep (same ``eval`` settings)
finds evaluate done. Interrupted, a re-run keeps every result already delivered and computes the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from pipeline.evals import results as layout
from pipeline.evals.config import EvalConfig
from pipeline.evals.metrics import MetricOutcome
from pipeline.evals.sae_records import SAERecord
from pipeline.runs.evaluation import (
    EvalSetup,
    check_eval,
    eval_setup,
    load_eval_model,
    point_saes,
    run_records,
    write_point,
)
from pipeline.runs.layout import experiment_dir, is_done, stage_config, stage_lock
from pipeline.runs.sweep_points import (
    CombinedSAE,
    SweepPoint,
    by_store,
    combine,
    discover_points,
    point_names,
    rename_values,
)
from pipeline.utils.atomic import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

#: Prefix of the combined run's work folder in the experiment folder (not ``evaluate-``: the report gathers those).
WORK_PREFIX = "evaluate_sweep-"
#: The combined run's name map, in its work folder.
POINTS_FILE = "points.json"
#: ``eval_info.json``'s record of the joint evaluation.
TOGETHER_KEY = "evaluated_together"


def work_dir(cfg: DictConfig | dict, harvest_dir: Path) -> Path:
    """``<experiment>/evaluate_sweep-<hash of the store folder and the eval node>``."""
    blob = json.dumps({"harvest": harvest_dir.name, "eval": stage_config(cfg, "evaluate").get("eval")}, sort_keys=True)
    return experiment_dir(cfg) / f"{WORK_PREFIX}{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _file_id(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_dev


def stage_kept(results: Path, combined: Iterable[CombinedSAE]) -> dict[Path, tuple[int, int]]:
    """Link each point's existing result files into the staging folder ``results`` under the combined names (the
    first point's where several hold one SAE); returns each staged file's identity (a file SAEBench rewrites
    gets a new one)."""
    kept: dict[Path, tuple[int, int]] = {}
    for c in combined:
        for point, own in c.members:
            if not point.results_dir.is_dir():
                continue
            for folder in sorted(p for p in point.results_dir.iterdir() if p.is_dir()):
                src = own.result_path(point.results_dir, folder.name)
                dst = c.record.result_path(results, folder.name)
                if src.is_file() and dst not in kept:
                    _link_or_copy(src, dst)
                    kept[dst] = _file_id(dst)
    return kept


def deliver(src: Path, dst: Path, names: dict[str, str]) -> None:
    """Write the staged result ``src`` to a point's ``dst`` (atomically), its combined names replaced by the
    point's (``names``)."""
    if names:
        data = rename_values(json.loads(src.read_text(encoding="utf-8")), names)
        atomic_write_text(dst, json.dumps(data, indent=2, default=str))
    else:
        atomic_write(dst, lambda p: shutil.copy2(src, p))


class CopyBack:
    """The combined run's results ledger (what :func:`~pipeline.runs.evaluation.run_records` hands each metric's
    result files to): each file the metric wrote goes to every point holding its SAE, and a kept one to a point
    that lacks it; each point's :class:`~pipeline.evals.kept_results.ResultLedger` records them."""

    def __init__(self, combined: list[CombinedSAE], kept: dict[Path, tuple[int, int]]):
        self.by_record = {id(c.record): c for c in combined}
        self.kept = kept

    def note(self, records: Iterable[SAERecord], files: Callable[[SAERecord], list[Path]]) -> None:
        for record in records:
            c = self.by_record.get(id(record))
            if c is None:  # not one of the combined run's records
                continue
            produced = [p for p in files(record) if p.is_file()]
            for point, own in c.members:
                names = {record.selected[0]: own.selected[0]} if own.selected[0] != record.selected[0] else {}
                delivered = []
                for src in produced:
                    dst = own.result_path(point.results_dir, src.parent.name)
                    if self.kept.get(src) != _file_id(src) or not dst.is_file():
                        deliver(src, dst, names)
                    delivered.append(dst)
                point.ledger.note([own], lambda _r, d=delivered: d)


def evaluate_sweep(cfg: DictConfig | dict, *, model: Any = None) -> list[Path]:
    """Evaluate every point of ``cfg``'s experiment together (module docstring) with ``cfg``'s ``eval`` node;
    returns every point's evaluate folder. ``model``: the model already loaded (else loaded once per store).
    ``FileNotFoundError`` when no point has finished its baselines stage."""
    e = check_eval(cfg)
    points, left_out = discover_points(cfg)
    for why in left_out:
        log.warning("evaluate_sweep leaves out %s", why)
    if not points:
        raise FileNotFoundError(
            f"no sweep point under {experiment_dir(cfg)} has finished its baselines stage: run the sweep up to "
            "them first, e.g. `python -m pipeline -m experiment=... dictionary.coder.k=4,8 until=baselines`."
        )
    grad = torch.is_grad_enabled()
    try:
        for harvest_dir, group in by_store(points).items():
            _evaluate_group(cfg, e, harvest_dir, group, model)
    finally:
        torch.set_grad_enabled(grad)  # SAEBench's SCR/TPP switch autograd off globally
    return [p.evaluate_dir for p in points]


def _pending(group: list[SweepPoint], e: EvalConfig) -> list[SweepPoint]:
    return [p for p in group if e.force_rerun or not is_done(p.evaluate_dir)]


def _evaluate_group(
    cfg: DictConfig | dict, e: EvalConfig, harvest_dir: Path, group: list[SweepPoint], model: Any
) -> None:
    """The points of one store: their SAEs in one run of each metric, each point's outputs written."""
    work = work_dir(cfg, harvest_dir)
    folders = sorted({p.evaluate_dir for p in _pending(group, e)})
    with contextlib.ExitStack() as locks:  # one job at a time per folder, taken in one order (no deadlock)
        for folder in [work, *folders]:
            locks.enter_context(stage_lock(folder))
        pending = _pending(group, e)  # another job may have finished some while this one waited
        for p in group:
            if p not in pending:
                log.info("evaluate done already: %s", p.evaluate_dir)
        if not pending:
            return
        evaluate_together(e, eval_setup(pending[0].cfg, e), pending, work, model)


def evaluate_together(e: EvalConfig, setup: EvalSetup, pending: list[SweepPoint], work: Path, model: Any) -> None:
    """The SAEs of the points ``pending`` (one store: ``setup``'s) in one run of each metric in the work folder
    ``work``, each point's outputs written into its ``evaluate_dir`` (module docstring). ``model``: the model
    already loaded, or None. The caller holds the folders' locks."""
    points = [point_saes(p.cfg, setup, p.evaluate_dir, p.fit_dir, p.baselines_dir) for p in pending]
    combined = combine(points)
    results = work / layout.RESULTS_SUBDIR
    shutil.rmtree(results, ignore_errors=True)  # the staging folder: only what is linked in below is kept
    kept = {} if e.force_rerun else stage_kept(results, combined)
    layout.write_json(work / POINTS_FILE, _name_map(combined))
    log.info("evaluating %d SAEs of %d points together in %s", len(combined), len(points), work)
    if model is None and e.metrics:
        model = load_eval_model(setup)
    outcome, info = run_records(setup, [c.record for c in combined], work, model, CopyBack(combined, kept))
    together = {"folder": str(work), "points": [str(p.folder) for p in points], "saes": len(combined)}
    for point in points:
        names, foreign = point_names(combined, point)
        own = MetricOutcome(
            skipped=[rename_values(s, names) for s in outcome.skipped if s.get("sae") not in foreign],
            failed=list(outcome.failed),
            timings=dict(outcome.timings),
        )
        write_point(point, e.metrics, own, {**rename_values(info, names, foreign), TOGETHER_KEY: together})


def _name_map(combined: list[CombinedSAE]) -> list[dict[str, Any]]:
    """``points.json``: each combined-run SAE and the points holding it, under their own names."""
    return [
        {"name": c.name, "points": [{"folder": str(point.folder), "name": own.name} for point, own in c.members]}
        for c in combined
    ]


__all__ = ["CopyBack", "deliver", "evaluate_sweep", "evaluate_together", "stage_kept", "work_dir"]
