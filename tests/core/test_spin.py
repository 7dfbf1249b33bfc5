"""The spin barrier and atomics that let compiled threads meet without Python (pipeline.core.spin), and the
thread runner around them (pipeline.core.compiled.run_threads)."""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest

from pipeline.core import compiled
from pipeline.core.spin import ABORT, SYNC_SLOTS, barrier, fetch_add


@numba.njit(nogil=True)
def _phases(sync, threads, t, seen, rounds, counter):
    """Each round: write this thread's slot, meet, check every slot holds this round, meet again."""
    generation = 0
    wrong = 0
    for r in range(rounds):
        seen[t] = r
        fetch_add(counter, 0, 1)
        generation = barrier(sync, threads, generation)
        for s in range(threads):
            wrong += seen[s] != r
        wrong += counter[0] != (r + 1) * threads
        generation = barrier(sync, threads, generation)
    return wrong


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_barrier_orders_every_thread_s_writes(threads):
    """After a barrier every thread sees every write made before it, round after round (3 threads on a 2-core
    machine: a waiter spins while the thread it waits for is off its core, so each barrier can cost a scheduler
    time slice; 300 such rounds, 600 barriers, still cross many preemptions)."""
    sync = np.zeros(SYNC_SLOTS, dtype=np.int64)
    seen = np.full(threads, -1, dtype=np.int64)
    counter = np.zeros(1, dtype=np.int64)
    wrong = np.zeros(threads, dtype=np.int64)
    rounds = 2000 if threads < 3 else 300

    def work(t):
        wrong[t] = _phases(sync, threads, t, seen, rounds, counter)

    compiled.run_threads(work, threads, sync[ABORT : ABORT + 1])
    assert wrong.sum() == 0 and counter[0] == rounds * threads


@numba.njit(nogil=True)
def _wait(sync, threads):
    return barrier(sync, threads, 0)


def test_a_failing_thread_releases_the_others():
    """A thread that raises before its barrier would leave the others spinning forever: run_threads sets the
    abort flag, the waiters return, and the error is raised."""
    sync = np.zeros(SYNC_SLOTS, dtype=np.int64)
    returned = []

    def work(t):
        if t == 1:
            raise ValueError("thread 1 failed")
        returned.append(_wait(sync, 3))

    def run():
        with pytest.raises(ValueError, match="thread 1 failed"):
            compiled.run_threads(work, 3, sync[ABORT:])

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout=60)
    assert not runner.is_alive(), "the waiting threads were not released"
    assert returned == [-1, -1]


def test_fetch_add_returns_the_old_value():
    @numba.njit
    def twice(a):
        return fetch_add(a, 1, 5), fetch_add(a, 1, -2)

    a = np.array([0, 10, 0], dtype=np.int64)
    assert twice(a) == (10, 15) and a[1] == 13


def test_cached_machine_code_is_dropped_when_any_compiled_source_changes(tmp_path):
    """numba re-checks only the source file of the function it loads: a change to refit_numba.py alone would
    leave update_numba.sweep's cache (which inlines the refits) stale. compiled.fresh_cache drops the cached code
    of every compiled module when any of their sources changed, and nothing else."""
    from pathlib import Path

    src = Path(compiled.__file__).parent
    for name in compiled.COMPILED_MODULES:
        (tmp_path / f"{name}.py").write_bytes((src / f"{name}.py").read_bytes())
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    ours = [cache / "update_numba.sweep-33.py311.nbi", cache / "update_numba.sweep-33.py311.1.nbc"]
    theirs = cache / "coders.helper-10.py311.nbi"
    check = compiled.fresh_cache.__wrapped__  # uncached: called here once per state
    for path in [*ours, theirs]:
        path.write_bytes(b"")
    check(tmp_path)  # no stamp yet: the cache is of unknown sources
    assert not any(p.exists() for p in ours) and theirs.exists()
    for path in ours:
        path.write_bytes(b"")
    check(tmp_path)  # same sources: kept
    assert all(p.exists() for p in ours)
    (tmp_path / "refit_numba.py").write_text((src / "refit_numba.py").read_text() + "\n# changed\n")
    check(tmp_path)
    assert not any(p.exists() for p in ours) and theirs.exists()
