"""``python -m pipeline``: the whole pipeline (harvest → fit → evaluate → report) for the selected config.

The command-line entry only (Hydra's ``@hydra.main`` has to stand in the module ``python -m`` runs): the
orchestrator is ``stages/orchestrator.py`` (it imports the stages, which the library never does). See there,
and the README, for the commands.
"""

import hydra
from omegaconf import DictConfig

from pipeline.runs.config import check_config_or_exit, section
from pipeline.runs.distributed import leave, pin_job_gpu, ranks
from stages.orchestrator import print_outputs, run_pipeline


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    check_config_or_exit(cfg)
    pin_job_gpu(section(cfg, "distributed"))
    try:
        folders = run_pipeline(cfg)
    finally:
        leave()
    if ranks().is_main:
        print_outputs(folders)


if __name__ == "__main__":
    main()
