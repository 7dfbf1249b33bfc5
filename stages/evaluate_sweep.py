"""Evaluate a sweep together: every point of the experiment that has finished its baselines, each point's
dictionary and baselines in one pass (the model loaded once, one SAEBench run per metric over all SAEs), each
point's results written into its own evaluate folder, complete and marked done as its own evaluate stage would.

    python -m pipeline -m experiment=smoke dictionary.coder.k=4,8 until=baselines   # the sweep, up to its baselines
    python -m pipeline experiment=smoke stage=evaluate_sweep                        # or python -m stages.evaluate_sweep
    python -m pipeline -m experiment=smoke dictionary.coder.k=4,8                   # each point: dashboards and report

Give it the same ``eval`` settings as the sweep (they name each point's evaluate folder). Interrupted, a re-run
keeps the results already written and computes the rest. How: :mod:`pipeline.runs.sweep_eval`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline.runs.config import check_config_or_exit, register_configs
from pipeline.runs.layout import is_done
from pipeline.runs.sweep_eval import evaluate_sweep

log = logging.getLogger(__name__)


def run(cfg: DictConfig | dict, *, model: Any = None) -> list[Path]:
    """Evaluate every point of ``cfg``'s experiment together; returns each point's evaluate folder."""
    return evaluate_sweep(cfg, model=model)


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    check_config_or_exit(cfg)
    for folder in run(cfg):
        print(f"evaluation: {folder} ({'done' if is_done(folder) else 'incomplete: see failed.json'})")


if __name__ == "__main__":
    main()
