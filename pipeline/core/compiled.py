"""The numba-compiled CPU loops (``mp_numba``: matching pursuit; ``update_numba``: non-negative atom refits),
imported lazily: numba's import and its cache load cost ~1 s, paid only by the first CPU fit or encode."""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

log = logging.getLogger(__name__)


@functools.cache
def module(name: str) -> ModuleType | None:
    """``pipeline.core.<name>``, or None when numba cannot be imported (logged once; the torch loops run)."""
    try:
        return importlib.import_module(f"pipeline.core.{name}")
    except ImportError as err:  # pragma: no cover - numba is a dependency; this is the documented fallback
        log.warning("numba is not importable (%s): the CPU fit and coder use the slower torch loops.", err)
        return None


def available() -> bool:
    """Whether the compiled loops can run here (numba importable)."""
    return module("mp_numba") is not None and module("update_numba") is not None
