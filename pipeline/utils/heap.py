"""Keep the long-lived Python heap out of the cyclic garbage collector while a loop that collects often runs.

SAEBench's absorption, sparse probing and SCR/TPP call ``gc.collect()`` once per SAE. A full collection walks
every tracked object alive, and an evaluation holds millions (the model's modules, the tokenizer, the datasets,
SAEBench's and sae-lens's imports): about 0.3 s per call on 2 CPU cores, three times per SAE, none of it freeing
anything that was alive before the loop began. :func:`frozen_heap` moves everything alive on entry to the
interpreter's permanent generation (``gc.freeze``), so each later collection walks only what was made since,
and gives it back on exit (``gc.unfreeze``). Collections still free every cycle made meanwhile (an SAE's tensors,
a metric's frames); only a cycle among objects that were alive on entry waits until the exit to be freed. No
value computed changes: the collector decides when memory is freed, never what a computation returns.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Collect once, then leave every object alive out of later collections until the block ends (module
    docstring). Nested use is safe: an inner block keeps what an outer one froze frozen until the outer exits."""
    outer = gc.get_freeze_count() > 0
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if not outer:
            gc.unfreeze()
