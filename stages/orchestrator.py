"""Run the stages in order for one config: harvest → fit → evaluate → report.

A stage whose folder holds its completion marker is skipped; an unfinished one resumes (each stage resumes
from what it wrote: harvest from its last complete shard, fit from its checkpoint, evaluate keeps finished
result files). ``stage=<name>`` runs that stage alone (its inputs must exist).
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from pipeline.runs.config import check_config
from pipeline.runs.layout import DONE_MARKER, STAGES, is_done, stage_dir

log = logging.getLogger(__name__)


def stage_runner(stage: str):
    """The plain ``run(cfg)`` of ``stages/<stage>.py``."""
    return importlib.import_module(f"stages.{stage}").run


def run_pipeline(cfg: DictConfig) -> dict[str, Path]:
    """Run the selected stages; returns each stage's folder."""
    check_config(cfg)
    selected = STAGES if cfg.stage == "all" else (cfg.stage,)
    out: dict[str, Path] = {}
    rerun_later = False
    for stage in selected:
        folder = stage_dir(cfg, stage)
        if rerun_later:  # an earlier stage ran again: this one must follow (it resumes from what it has)
            (folder / DONE_MARKER).unlink(missing_ok=True)
        if is_done(folder):
            log.info("%-8s done already: %s", stage, folder)
            out[stage] = folder
            continue
        rerun_later = True
        t = time.perf_counter()
        log.info("%-8s running -> %s", stage, folder)
        if stage == "harvest":
            stage_runner(stage)(cfg, run_dir=folder)
            _mark_harvest(cfg, folder)
        else:
            stage_runner(stage)(cfg)
        log.info("%-8s finished in %.1f s", stage, time.perf_counter() - t)
        out[stage] = folder
    return out


def _mark_harvest(cfg: DictConfig, folder: Path) -> None:
    from pipeline.runs.layout import mark_done, prepare

    prepare(folder, cfg, "harvest")
    mark_done(folder, store=str(folder / "store"))
