"""``python -m pipeline``: the whole pipeline (harvest → fit → evaluate → report) for the selected config.

    python -m pipeline                                   # the embedded offline default (CPU, real small LM)
    python -m pipeline experiment=gemma2b_paper          # a paper setup (hub + GPU)
    python -m pipeline -m dictionary.k=20,40,80          # a sweep; the report gathers it
    python -m pipeline stage=fit dictionary.k=40         # one stage, the rest reused
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from stages.orchestrator import run_pipeline

log = logging.getLogger("pipeline")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    folders = run_pipeline(cfg)
    print("\nOutputs:")
    for stage, folder in folders.items():
        print(f"  {stage:<9} {folder}")
    report = folders.get("report")
    if report is not None and (report / "report.md").exists():
        print(f"\nReport: {report / 'report.md'}")


if __name__ == "__main__":
    main()
