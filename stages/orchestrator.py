"""The orchestrator: run the stages in order for one config, harvest → fit → baselines → evaluate → dashboards →
report.

    python -m pipeline                                   # the embedded offline default (CPU, real small LM)
    python -m pipeline experiment=gemma2b_paper          # a paper setup (hub + GPU)
    python -m pipeline -m experiment=smoke dictionary.coder.k=4,8     # a sweep; the report gathers it
    python -m pipeline stage=fit dictionary.coder.k=40  # one stage, the rest reused
    python -m pipeline -m experiment=smoke dictionary.coder.k=4,8 until=baselines   # a sweep, up to its baselines
    python -m pipeline experiment=smoke stage=evaluate_sweep   # then every point's SAEs evaluated together

With ``stage=all`` a stage whose folder holds its completion marker is skipped, and every stage after one that
ran runs again (each resumes from what it wrote: harvest from its last complete shard, fit from its checkpoint,
evaluate keeps finished result files). ``stage=<name>`` runs that stage's ``run(cfg)`` whatever its marker
says (a finished harvest then re-checks its shards; a finished fit is reused); its inputs must exist.
``until=<stage>`` ends a ``stage=all`` run after that stage. ``stage=evaluate_sweep`` evaluates every point of the
experiment that has finished its baselines together, into each point's evaluate folder
(:mod:`pipeline.runs.sweep_eval`, through ``stages/evaluate_sweep.py``); a later run of a point then finds its
evaluate stage done.

Under ``torchrun`` (:mod:`pipeline.runs.distributed`) every rank runs this loop: the harvest and the fit on all
ranks (whether the fit runs is rank 0's decision, broadcast), the stages after them on rank 0 alone; only rank 0
removes markers. Jobs running at once (the points of a sweep on a
launcher) take each stage folder's lock (:func:`~pipeline.runs.layout.stage_lock`) while they decide and run it,
so a shared harvest is made once and the other points wait for it.

The orchestrator is the only module that imports the stages; the library (``pipeline/``) never does, and
``python -m pipeline`` (``pipeline/__main__.py``, where Hydra's ``@hydra.main`` must stand for ``python -m`` to
find ``conf/``) is a thin wrapper over :func:`run_pipeline` here.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.report.index_page import INDEX_FILE
from pipeline.report.markdown import REPORT_FILE
from pipeline.runs.config import EVALUATE_SWEEP, check_config, register_configs
from pipeline.runs.distributed import ALL_RANK_STAGES, agree, ranks
from pipeline.runs.layout import DONE_MARKER, STAGES, is_done, stage_dir, stage_lock
from pipeline.utils.redact import redact_config
from stages import baselines, dashboards, evaluate, evaluate_sweep, fit, harvest, report

log = logging.getLogger(__name__)

#: Each stage's plain ``run(cfg) -> folder``.
RUNNERS: dict[str, Callable[[DictConfig], Path]] = {
    "harvest": harvest.run,
    "fit": fit.run,
    "baselines": baselines.run,
    "evaluate": evaluate.run,
    "dashboards": dashboards.run,
    "report": report.run,
}


#: Stages that write the whole config they are given into their output (the report's "Config" section): they get
#: it redacted (:func:`redacted`); stage folders are the same, their hash covers the redacted config anyway.
PRINTS_CONFIG = ("report",)


def redacted(cfg: DictConfig) -> DictConfig:
    """``cfg`` resolved, with the secrets :func:`pipeline.utils.redact.redact_config` knows replaced."""
    return OmegaConf.create(redact_config(OmegaConf.to_container(cfg, resolve=True)))


def stage_runner(stage: str) -> Callable[[DictConfig], Path]:
    """The plain ``run(cfg)`` of ``stages/<stage>.py``."""
    return RUNNERS[stage]


def selected_stages(cfg: DictConfig) -> tuple[str, ...]:
    """The stages ``cfg`` runs: ``stage=<name>`` that one; ``stage=all`` every stage, up to ``until`` when set."""
    if cfg.stage != "all":
        return (cfg.stage,)
    until = cfg.get("until")
    return STAGES[: STAGES.index(until) + 1] if until else STAGES


def run_pipeline(cfg: DictConfig) -> dict[str, Path]:
    """Check the config, then run the selected stages; returns each stage's folder (``stage=evaluate_sweep``:
    each point's evaluate folder, as ``evaluate <n>``)."""
    check_config(cfg)
    alone = cfg.stage != "all"
    if cfg.stage in ("all", "evaluate", EVALUATE_SWEEP):
        evaluate.check(cfg)  # SAEBench's config keys of each metric, before the first stage's work
    me = ranks()
    if cfg.stage == EVALUATE_SWEEP:
        folders = evaluate_sweep.run(cfg) if me.is_main else []
        return {f"evaluate {i}": folder for i, folder in enumerate(folders, 1)}
    out: dict[str, Path] = {}
    rerun_later = False
    for stage in selected_stages(cfg):
        folder = stage_dir(cfg, stage)
        if me.distributed and stage not in ALL_RANK_STAGES and not me.is_main:
            log.info("%-8s runs on rank 0 (this is rank %d)", stage, me.rank)
            continue
        # one job at a time per stage folder (sweep points share them); ranks > 0 follow rank 0's decisions
        with stage_lock(folder) if me.is_main else contextlib.nullcontext():
            if rerun_later and me.is_main:  # an earlier stage ran again: this one must follow (it resumes)
                (folder / DONE_MARKER).unlink(missing_ok=True)
            skip = is_done(folder) and not alone
            if me.distributed and stage == "fit":  # the harvest needs no agreement: its marker is never removed
                skip = agree(fit.join_ranks(cfg), skip)
            if skip:
                log.info("%-8s done already: %s", stage, folder)
                out[stage] = folder
                continue
            rerun_later = True
            t = time.perf_counter()
            log.info("%-8s running -> %s", stage, folder)
            out[stage] = stage_runner(stage)(redacted(cfg) if stage in PRINTS_CONFIG else cfg)
            log.info("%-8s finished in %.1f s", stage, time.perf_counter() - t)
    return out


def print_outputs(folders: dict[str, Path]) -> None:
    """Tell the user where each stage's folder, and the report, are."""
    print("\nOutputs:")
    for stage, folder in folders.items():
        print(f"  {stage:<10} {folder}")
    if "report" in folders and (folders["report"] / REPORT_FILE).exists():
        print(f"\nReport: {folders['report'] / REPORT_FILE}")
        print(f"In a browser (report, plots, feature dashboards): {folders['report'] / INDEX_FILE}")


register_configs()
