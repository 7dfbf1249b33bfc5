"""``python -m tests.stages.fault_child ARGS``: ``python -m pipeline ARGS`` that kills itself with SIGKILL at one
armed point, for the fault-injection test (``tests/stages/test_fault_injection.py``).

The point is chosen by environment variables and found by counting calls, never by timing:

* ``FAULT_KIND=call``, ``FAULT_TARGET=<module>:<qualname>`` (a function or a class's method): the process dies on
  the ``FAULT_CALL``-th call, before the call runs (e.g. ``pipeline.core.atom_update:update_atoms``: the atom
  update of an iteration, after its coding).
* ``FAULT_KIND=write``, ``FAULT_TARGET=<glob>``: on the ``FAULT_CALL``-th atomic write
  (:func:`pipeline.utils.atomic.atomic_write`, which every file the pipeline writes goes through) whose target path
  matches the glob, the data is written to the temporary file, cut to half its length (what a kill mid-write
  leaves), and the process dies before the rename.
* ``FAULT_KIND=torch_save``, ``FAULT_TARGET=<glob>``: the same for the ``FAULT_CALL``-th ``torch.save`` to a
  matching path (SAEBench's cached activations): the file is written, cut to half, and the process dies.

Just before it dies it writes :data:`MARK` and what it hit to stderr, so that the test can tell the armed kill
from a death of another cause. With ``FAULT_KIND`` unset nothing is patched. Library code holds no test hooks: the
patches are made here, before the pipeline runs (functions that modules imported by name are re-bound there too).
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import os
import runpy
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

#: The line the child writes to stderr as it kills itself: ``MARK`` + " " + what it hit.
MARK = "fault injection: SIGKILL at"
#: The packages whose modules get a patched function re-bound where they imported it by name.
OWN_PACKAGES = ("pipeline", "stages")


def die(what: str) -> NoReturn:
    """Say where (unbuffered, to stderr), then SIGKILL this process: no handler, no ``finally``, no flush runs."""
    os.write(2, f"{MARK} {what}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: SIGKILL cannot be caught")


def tear(path: Path) -> None:
    """Cut ``path`` to half its length, as a write interrupted halfway leaves it."""
    os.truncate(path, os.path.getsize(path) // 2)


def rebind(original: Any, replacement: Any) -> None:
    """Point every loaded module of :data:`OWN_PACKAGES` that holds ``original`` under some name at
    ``replacement`` (``from x import f`` copies the function into the importer)."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(OWN_PACKAGES):
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                setattr(module, attr, replacement)


class Countdown:
    """True on the ``n``-th :meth:`hit` only."""

    def __init__(self, n: int) -> None:
        self.left = n

    def hit(self) -> bool:
        self.left -= 1
        return self.left == 0


def arm_call(target: str, countdown: Countdown) -> None:
    """Kill on a call of ``target`` (``module:qualname``), before it runs."""
    module, qualname = target.split(":")
    owner: Any = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if countdown.hit():
            die(f"call of {target}")
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)
    rebind(original, wrapper)


def arm_write(pattern: str, countdown: Countdown) -> None:
    """Kill during an atomic write whose target matches ``pattern``: torn temporary file, no rename."""
    from pipeline.utils import atomic

    original = atomic.atomic_write

    @functools.wraps(original)
    def atomic_write(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
        if not (fnmatch.fnmatch(os.fspath(target), pattern) and countdown.hit()):
            return original(target, write)

        def torn(tmp: Path) -> None:
            write(tmp)
            tear(tmp)
            die(f"write of {target}")

        return original(target, torn)

    atomic.atomic_write = atomic_write
    rebind(original, atomic_write)


def arm_torch_save(pattern: str, countdown: Countdown) -> None:
    """Kill during a ``torch.save`` to a path matching ``pattern``: the file it wrote is left torn."""
    import torch

    original = torch.save

    @functools.wraps(original)
    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        path = os.fspath(f) if isinstance(f, (str, os.PathLike)) else None
        if path is None or not (fnmatch.fnmatch(path, pattern) and countdown.hit()):
            return original(obj, f, *args, **kwargs)
        original(obj, f, *args, **kwargs)
        tear(Path(path))
        die(f"torch.save to {path}")

    torch.save = save


ARMS: dict[str, Callable[[str, Countdown], None]] = {
    "call": arm_call,
    "write": arm_write,
    "torch_save": arm_torch_save,
}


def arm_from_environment() -> None:
    """Arm the kill ``FAULT_KIND`` / ``FAULT_TARGET`` / ``FAULT_CALL`` name (nothing when ``FAULT_KIND`` is unset)."""
    kind = os.environ.get("FAULT_KIND")
    if not kind:
        return
    ARMS[kind](os.environ["FAULT_TARGET"], Countdown(int(os.environ.get("FAULT_CALL", "1"))))


if __name__ == "__main__":  # as `python -m pipeline` runs it (Hydra finds conf/ from a __main__ module)
    arm_from_environment()
    runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
