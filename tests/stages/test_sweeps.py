"""Sweeps on Hydra launchers: the `launcher=local_gpus` (joblib) and `launcher=slurm` (submitit) presets compose,
two sweep points run at once on joblib sharing one harvest, and the stage lock makes concurrent jobs take turns."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.runs.layout import DONE_MARKER, stage_dir, stage_lock
from tests.conftest import REPO, compose_config


def _hydra(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset,target,keys",
    [
        ("local_gpus", "hydra_joblib_launcher.joblib_launcher.JoblibLauncher", ["n_jobs: ${gpu_count:}"]),
        ("slurm", "hydra_submitit_launcher.submitit_launcher.SlurmLauncher", ["gpus_per_node: 1", "tasks_per_node: 1"]),
    ],
)
def test_launcher_presets_compose(preset, target, keys):
    hydra_cfg = _hydra(f"launcher={preset}", "experiment=smoke", "--cfg", "hydra")
    assert target in hydra_cfg
    for key in keys:
        assert key in hydra_cfg
    job = _hydra(f"launcher={preset}", "experiment=smoke", "--cfg", "job")
    assert ("pin_job_gpu: true" in job) == (preset == "local_gpus")


@pytest.mark.parametrize(
    "preset,target,pinned",
    [
        ("local_gpus", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", True),
        ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", False),
    ],
)
def test_launcher_presets_choose_hydras_launcher(preset, target, pinned):
    """In-process (the fast lane's): the preset sets Hydra's launcher and the job's GPU pinning; the command-line
    check above runs the same through ``python -m pipeline``."""
    from hydra import compose, initialize_config_dir

    from pipeline.runs.config import register_configs
    from tests.conftest import CONF

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"launcher={preset}", "experiment=smoke"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
    assert cfg.distributed.pin_job_gpu is pinned


def test_gpu_count_resolver_counts_at_least_one_job():
    from omegaconf import OmegaConf

    from pipeline.runs.config import register_configs

    register_configs()
    expected = max(1, torch.cuda.device_count())
    assert OmegaConf.create({"n": "${gpu_count:}"}).n == expected


def _hold(folder: str, seconds: float, log: str) -> None:
    with stage_lock(Path(folder)):
        with open(log, "a") as fh:
            fh.write(f"in {time.time()}\n")
        time.sleep(seconds)
        with open(log, "a") as fh:
            fh.write(f"out {time.time()}\n")


def test_the_stage_lock_makes_concurrent_jobs_take_turns(tmp_path):
    ctx = mp.get_context("spawn")
    log = tmp_path / "log"
    procs = [ctx.Process(target=_hold, args=(str(tmp_path / "stage"), 1.5, str(log))) for _ in range(2)]
    for p in procs:
        p.start()
        time.sleep(0.2)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert events == ["in", "out", "in", "out"]  # never both inside


@pytest.mark.slow
def test_a_joblib_sweep_of_two_points_shares_one_harvest(tmp_path):
    """Two fits at once (n_jobs=2) on one harvest that neither has yet: one job harvests, the other waits on the
    lock and reuses the store; both fits finish."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "-m",
        "launcher=local_gpus",
        "hydra.launcher.n_jobs=2",
        "experiment=smoke",
        f"output_root={tmp_path}",
        "dictionary.coder.k=4,8",
        "baseline=[]",
        "eval.metrics=[]",
    ]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    harvests = sorted(tmp_path.glob("smoke/harvest-*"))
    assert len(harvests) == 1 and (harvests[0] / DONE_MARKER).is_file()
    assert json.loads((harvests[0] / "store" / "manifest.json").read_text())["complete"]
    for k in (4, 8):
        cfg = compose_config("experiment=smoke", f"output_root={tmp_path}", f"dictionary.coder.k={k}")
        assert (stage_dir(cfg, "fit") / DONE_MARKER).is_file()
    logs = "".join(p.read_text() for p in tmp_path.glob("smoke/.hydra/multirun-*/*/*.log"))
    # one job ran the harvest, the other found it done (the orchestrator's "<stage> running" / "done already" lines,
    # whatever their padding)
    ran, reused = re.findall(r"\bharvest\s+running\b", logs), re.findall(r"\bharvest\s+done already\b", logs)
    assert (len(ran), len(reused)) == (1, 1), logs
