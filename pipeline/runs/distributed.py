"""Runs launched by ``torchrun``: which rank this process is, its device, the process group, and which stages
run on every rank.

    torchrun --nproc_per_node=8 -m pipeline                       # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m pipeline

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process; a plain ``python -m pipeline`` has none
and is one rank. The harvest runs on every rank (each makes every world-th shard; rank 0 merges them into one
store); the fit runs on every rank (data parallel, exact: :mod:`pipeline.core.collective`); the baselines,
evaluation and report run once, on rank 0. Every rank must see the same ``output_root`` (a shared filesystem
across nodes).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from pipeline.core.collective import RankPlace
from pipeline.runs.layout import is_done

log = logging.getLogger(__name__)

#: Stages every rank runs; the others (all after these) run on rank 0 only.
ALL_RANK_STAGES = ("harvest", "fit")


@dataclass
class DistributedConfig:
    """The ``distributed`` node: how a ``torchrun`` launch joins its ranks (ignored by a one-process run).
    Not part of any stage hash: N ranks compute what one process computes."""

    backend: str = "auto"
    """``auto`` (NCCL when the ranks fit on CUDA devices, else gloo), ``nccl`` or ``gloo``."""
    timeout_s: float = 600.0
    """Timeout of every collective: a rank that dies or raises ends the others with an error after at most
    this long (torchrun usually stops them sooner), instead of leaving them hanging."""
    wait_s: float = 7 * 24 * 3600.0
    """How long rank 0 waits for the other ranks' parts of the harvest, and they for rank 0 to merge them."""
    pin_job_gpu: bool = False
    """Sweeps on one machine (``launcher=local_gpus``): job n of a multirun makes GPU n mod (number of GPUs) its
    current device, so the jobs running at once use different GPUs wherever their devices are ``auto``."""

    def validate(self) -> None:
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"distributed.backend = {self.backend!r} is not one of auto, nccl, gloo.")
        for key in ("timeout_s", "wait_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"distributed.{key} = {getattr(self, key)} must be > 0.")


@dataclass(frozen=True)
class Ranks(RankPlace):
    """This process's place in a launch."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1


def ranks() -> Ranks:
    """From torchrun's environment variables (one rank without them)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    if world <= 1:
        return Ranks()
    return Ranks(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1)))


def rank_device(device: torch.device) -> torch.device:
    """A CUDA device without an index becomes this rank's GPU (``cuda:LOCAL_RANK``); anything else is kept."""
    r = ranks()
    if device.type == "cuda" and device.index is None and r.distributed:
        if r.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"rank {r.rank} is local rank {r.local_rank} but only {torch.cuda.device_count()} GPU(s) "
                f"are visible: launch at most that many processes per node (--nproc_per_node)."
            )
        return torch.device("cuda", r.local_rank)
    return device


def join(cfg: DistributedConfig, device: torch.device):
    """The process group of a torchrun launch (initialised once, on first use; ``None`` for one process)."""
    import torch.distributed as dist

    r = ranks()
    if not r.distributed:
        return None
    if not dist.is_initialized():
        cfg.validate()
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s))
        log.info("rank %d of %d joined (%s, %s)", r.rank, r.world, backend, device)
    return dist.group.WORLD


def leave() -> None:
    """Destroy the process group, if this process joined one (the end of a torchrun launch)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agree(group, value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank: decisions taken from files (is a stage done?)
    must be one decision, or the ranks would run different collectives."""
    if group is None:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def agree_all(group, value: bool) -> bool:
    """True on every rank when ``value`` is true on every rank: one decision that no rank can veto alone
    (e.g. whether every rank has the memory to hold the store), the same on all, so they run the same collectives."""
    if group is None:
        return value
    import torch.distributed as dist

    views: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(views, bool(value), group=group)
    return all(views)


def gpu_count() -> int:
    """GPUs visible here, at least 1 (the ``${gpu_count:}`` config resolver: jobs at once on a launcher)."""
    return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def pin_job_gpu(cfg: DistributedConfig) -> torch.device | None:
    """With ``pin_job_gpu`` in a multirun job: make GPU ``job.num mod count`` this process's current device (index-
    less ``cuda`` devices, i.e. ``auto``, then mean it); returns it, or None when nothing was pinned."""
    if not cfg.pin_job_gpu or not torch.cuda.is_available():
        return None
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().job.get("num") is None:
        return None
    device = torch.device("cuda", int(HydraConfig.get().job.num) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    log.info("sweep job %s pinned to %s", HydraConfig.get().job.num, device)
    return device


def wait_for(folder: Path, stage: str, cfg: DistributedConfig, poll_s: float = 5.0) -> None:
    """Ranks > 0: wait until rank 0 has finished ``stage`` (its completion marker in ``folder``)."""
    t = time.monotonic()
    logged = False
    while not is_done(folder):
        if time.monotonic() - t > cfg.wait_s:
            raise TimeoutError(
                f"rank {ranks().rank} waited {cfg.wait_s:.0f} s for rank 0 to finish the {stage} stage "
                f"({folder}); raise distributed.wait_s, or check rank 0's log."
            )
        if not logged:
            log.info("rank %d waits for rank 0's %s stage: %s", ranks().rank, stage, folder)
            logged = True
        time.sleep(poll_s)
