"""What the compiled CPU loops need at run time: the ``kernel`` choice (:func:`use`), their modules, imported
lazily (:func:`module`: numba's import and its cache load cost ~1 s, paid only by the first CPU fit or encode),
and the threads that run them (:func:`threads`, :func:`run_threads`).

Cores: the CPUs this process may run on (``sched_getaffinity``) and, below that, its CPU quota
(:func:`cpu_quota`: a container's or SLURM job's cgroup ``cpu.max``, or cgroup v1's ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``), which ``sched_getaffinity`` does not show: threads beyond the quota would be throttled
while the others wait for them at a barrier.

numba caches each compiled function beside its source and re-compiles it when that file changes; every compiled
function's callees live in its own file (:mod:`pipeline.core.cpu`), so that check is enough."""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

log = logging.getLogger(__name__)

#: The ``kernel`` choices: "numba" (the compiled loops), "torch" (batched tensor ops) or "auto" (numba wherever
#: it applies).
KERNELS = ("auto", "torch", "numba")


@functools.cache
def module(name: str) -> ModuleType | None:
    """``pipeline.core.cpu.<name>``, or None when numba cannot be imported (logged once; the torch loops run)."""
    try:
        return importlib.import_module(f"pipeline.core.cpu.{name}")
    except ImportError as err:  # pragma: no cover - numba is a dependency; this is the documented fallback
        log.warning("numba is not importable (%s): the CPU fit and coder use the slower torch loops.", err)
        return None


def available() -> bool:
    """Whether the compiled loops can run here (numba importable)."""
    return module("mp_kernel") is not None and module("sweep_kernel") is not None


def use(kernel: str, fits: bool, unfit: str) -> bool:
    """Whether a loop runs compiled for ``kernel`` (one of :data:`KERNELS`, checked by the caller): never with
    "torch"; with "auto" where it ``fits`` and numba imports; with "numba" where it fits (else ``ValueError``
    with the message ``unfit``) and numba imports (else ``RuntimeError``)."""
    if kernel == "torch":
        return False
    if not fits:
        if kernel == "numba":
            raise ValueError(unfit)
        return False
    if available():
        return True
    if kernel == "numba":
        raise RuntimeError(
            "kernel='numba' needs numba (pip install numba, a dependency of this package); "
            "kernel='torch' runs without it."
        )
    return False


#: Where the cgroup file systems are mounted, and this process's cgroup membership (module constants: a test
#: points them at a fake tree).
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def cpu_quota() -> float | None:
    """The CPU quota of this process's cgroup, in CPUs (``"200000 100000"`` in ``cpu.max`` = 2.0), the smallest
    of its cgroup's and every ancestor's up to :data:`CGROUP_ROOT`; None when there is none (``max``) or it cannot
    be read. cgroup v2 (``0::<path>`` in :data:`PROC_CGROUP`, ``cpu.max``) or v1 (the ``cpu`` controller's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, -1 = none)."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        names = controllers.split(",")
        if controllers == "":
            quotas += _quotas(CGROUP_ROOT, path, _read_cpu_max)
        elif "cpu" in names:
            for mount in (",".join(names), "cpu", "cpu,cpuacct", "cpuacct,cpu"):
                if (CGROUP_ROOT / mount).is_dir():
                    quotas += _quotas(CGROUP_ROOT / mount, path, _read_cfs)
                    break
    return min(quotas) if quotas else None


def _quotas(root: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """``read(folder)`` of the cgroup folder ``root/path`` and of each ancestor up to ``root`` (those that set one)."""
    folder = root / path.strip("/")
    out = []
    while True:
        quota = read(folder)
        if quota is not None:
            out.append(quota)
        if folder == root or root not in folder.parents:
            return out
        folder = folder.parent


def _read_cpu_max(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _read_cfs(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError, ZeroDivisionError):
        return None


def cores() -> int:
    """CPUs this process may use: the cores it may run on, at most its CPU quota rounded down (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        n = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        n = min(n, math.floor(quota + 1e-9))
    return max(1, n)


def threads() -> int:
    """Threads for a compiled loop whose threads wait for each other at spin barriers: torch's thread count,
    at most :func:`cores` (a spinning thread holds its core; under a CPU quota, a thread beyond it is throttled
    while the others wait for it)."""
    import torch

    return max(1, min(torch.get_num_threads(), cores()))


def run_threads(work: Callable[[int], object], n: int, abort: np.ndarray | None = None) -> None:
    """``work(t)`` for t = 0 … n − 1, each on its own thread (t = 0 on the calling one), all at once: compiled
    ``nogil`` calls, which may meet at spin barriers. If one raises, ``abort`` (a one-element int64 array: the
    barriers' abort flag, :mod:`pipeline.core.cpu.sweep_kernel`) is set to 1 so the others leave their barriers, and the
    first error is raised once all have returned."""
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            work(t)
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the other threads are released
            _set(abort)
            errors.append(err)

    if n == 1:
        run(0)
    else:
        started = []
        try:
            for t in range(1, n):
                thread = threading.Thread(target=run, args=(t,), name=f"compiled-{t}")
                thread.start()
                started.append(thread)
        except BaseException:  # a thread that cannot start: release the started ones from their barriers
            _set(abort)
            for thread in started:
                thread.join()
            raise
        run(0)
        for thread in started:
            thread.join()
    if errors:
        raise errors[0]


def _set(flag: np.ndarray | None) -> None:
    if flag is not None:
        flag[0] = 1
