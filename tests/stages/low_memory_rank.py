"""``python -m tests.stages.low_memory_rank ARGS``: ``python -m pipeline ARGS`` in which the ranks listed in
``$LOW_MEMORY_RANKS`` (comma-separated; a plain run is rank 0) see no free memory, as a full node would: for the
test that data-parallel ranks still make one choice between holding the store in memory and streaming it."""

from __future__ import annotations

import os
import runpy

from pipeline.data import loader

if os.environ.get("RANK", "0") in os.environ.get("LOW_MEMORY_RANKS", "").split(","):
    loader.free_memory = lambda device: 0

if __name__ == "__main__":  # as `python -m pipeline` runs it (Hydra finds conf/ from a __main__ module)
    runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
