"""Synchronisation between Python threads that run one long compiled (numba, ``nogil``) call each: an atomic
fetch-and-add on an int64 array element and a spin barrier built on it. Imported only by compiled loops
(:mod:`pipeline.core.update_numba`).

A spin barrier costs well under a microsecond when every thread has its own core, against ~1 ms for a round of
``ThreadPoolExecutor.map`` from Python; callers start at most as many threads as the process has cores
(:func:`pipeline.core.compiled.threads`), since a spinning thread holds its core. The atomics are sequentially
consistent read-modify-writes, so every plain write made before a barrier is seen by every thread after it.

``sync``, the shared state: an int64 array of :data:`SYNC_SLOTS` zeros, ``[arrived, generation, abort]``. A
thread that sees ``abort`` set (the driver sets it when another thread failed before reaching a barrier) leaves
the barrier returning -1 instead of waiting forever.
"""

from __future__ import annotations

import numba
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

#: Length of the ``sync`` array: arrivals at the current barrier, barriers passed, abort flag.
SYNC_SLOTS = 3
_ARRIVED, _GENERATION = 0, 1
#: Index of the abort flag in ``sync``.
ABORT = 2


@intrinsic
def fetch_add(typingctx, array, index, value):
    """``old = array[index]; array[index] += value; return old`` as one atomic step (int64, C-contiguous 1-d)."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64 and array.ndim == 1):
        return None
    sig = types.int64(array, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        index_value = context.cast(builder, args[1], signature.args[1], types.intp)
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [index_value])
        return builder.atomic_rmw("add", pointer, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def load(typingctx, array, index):
    """``array[index]`` read atomically (int64, 1-d): a spinning thread sees other threads' writes."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64 and array.ndim == 1):
        return None
    sig = types.int64(array, types.intp)

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        index_value = context.cast(builder, args[1], signature.args[1], types.intp)
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [index_value])
        return builder.load_atomic(pointer, "seq_cst", 8)

    return sig, codegen


@numba.njit(nogil=True, cache=True)
def barrier(sync, threads, generation):
    """Wait until all ``threads`` threads have called this for barrier number ``generation`` (0, 1, 2, … in
    every thread); returns the next generation, or -1 when the run was aborted."""
    if fetch_add(sync, _ARRIVED, 1) == threads - 1:  # the last to arrive resets the count and releases the rest
        fetch_add(sync, _ARRIVED, -threads)
        fetch_add(sync, _GENERATION, 1)
        return generation + 1
    while load(sync, _GENERATION) == generation:
        if load(sync, ABORT) != 0:
            return -1
    return generation + 1
