"""Report stage: ``report.md`` (table of every metric, fit curve, SAEBench-style plots, config) in its folder, and
``index.html`` beside it (the report as HTML, the plots, and links to every SAE's feature dashboards).

    python -m stages.report

Gathers every finished or partial evaluate folder of the experiment (``<output_root>/<experiment>/evaluate-*``),
so a sweep (Hydra multirun over dictionary settings) gets one combined table and plot, and the finished dashboards
folders (``dashboards-*``), so its index links every point's dashboards.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.evals.results import SAES_FILE
from pipeline.report.escape import md_code
from pipeline.report.index_page import INDEX_FILE, write_index
from pipeline.report.markdown import REPORT_FILE, SUMMARY_FILE, write_report
from pipeline.runs.config import check_config_or_exit, open_stage_tracker, register_configs
from pipeline.runs.layout import experiment_dir, is_done, mark_done, prepare, stage_dir
from pipeline.utils.redact import redact_config

log = logging.getLogger(__name__)


def run(cfg: DictConfig | dict, *, eval_folders: list[str | Path] | None = None) -> Path:
    """Write the report; returns its folder. ``eval_folders`` defaults to every ``evaluate-*`` folder of the
    experiment."""
    folder = prepare(stage_dir(cfg, "report"), cfg, "report")
    if eval_folders is None:
        eval_folders = sorted(p for p in experiment_dir(cfg).glob("evaluate-*") if (p / SAES_FILE).exists())
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    cfg_yaml = OmegaConf.to_yaml(OmegaConf.create(redact_config(plain)))  # no judge secrets in the report
    title = f"DB-KSVD report: experiment {cfg['experiment_name']}"  # the pages' (autoescaped)
    md_title = f"DB-KSVD report: experiment {md_code(cfg['experiment_name'])}"
    path = write_report([Path(p) for p in eval_folders], folder, cfg_yaml, title=md_title)
    dashboards = sorted(p for p in experiment_dir(cfg).glob("dashboards-*") if is_done(p))
    index = write_index(folder, path, dashboards, title)
    with open_stage_tracker(cfg, "report", folder.name) as tracker:
        rows = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
        tracker.log_table("summary", rows)
        for row in rows:
            tracker.log_metrics(f"sae/{row['name']}", {k: v for k, v in row.items() if isinstance(v, (int, float))})
    mark_done(folder, report=str(path), index=str(index), evaluations=[str(p) for p in eval_folders])
    log.info("report: %s (open %s in a browser)", path, index)
    return folder


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    check_config_or_exit(cfg)
    folder = run(cfg)
    print(f"report: {folder / REPORT_FILE}\nin a browser: {folder / INDEX_FILE}")


if __name__ == "__main__":
    main()
