"""What the compiled CPU loops need at run time: the ``kernel`` choice (:func:`use`), their modules, imported
lazily (:func:`module`: numba's import and its cache load cost ~1 s, paid only by the first CPU fit or encode),
and the threads that run them (:func:`threads`, :func:`run_threads`).

numba caches each compiled function beside its source and re-compiles it when that file changes; every compiled
function's callees live in its own file (:mod:`pipeline.core.cpu`), so that check is enough."""

from __future__ import annotations

import functools
import importlib
import logging
import os
import threading
from collections.abc import Callable
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


def threads() -> int:
    """Threads for a compiled loop whose threads wait for each other at spin barriers: torch's thread count,
    at most the cores this process may run on (a spinning thread holds its core)."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores))


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
