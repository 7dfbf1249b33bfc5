"""The compiled CPU path (pipeline.core.cpu): the spin barrier and atomics that let the sweep's threads meet
without Python, the thread runner around them (runtime.run_threads), and the layout that lets numba's own cache
check see every change (each kernel file holds all it calls)."""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest

from pipeline.core.cpu import runtime
from pipeline.core.cpu.sweep_kernel import ABORT, SYNC_SLOTS, barrier, fetch_add


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

    runtime.run_threads(work, threads, sync[ABORT : ABORT + 1])
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
            runtime.run_threads(work, 3, sync[ABORT:])

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


def test_each_kernel_file_holds_every_function_it_calls():
    """numba re-compiles a cached function only when the file that defines it changes. So every compiled kernel's
    callees live in its own file: a kernel module imports numba and numpy, and nothing of this project."""
    import ast
    from pathlib import Path

    folder = Path(runtime.__file__).parent
    kernels = sorted(folder.glob("*_kernel.py"))
    assert [p.name for p in kernels] == ["mp_kernel.py", "sweep_kernel.py"]
    for path in kernels:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert imported <= {"__future__", "numba", "numpy"}, (path.name, imported)


# ------------------------------------------------------------------------------------------- CPU quota, yielding
def _cgroup(tmp_path, monkeypatch, files: dict[str, str], membership: str) -> None:
    """A fake cgroup tree (``files``: path under the root -> content) and ``/proc/self/cgroup`` (``membership``),
    pointed at by the runtime's module constants."""
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(membership)
    monkeypatch.setattr(runtime, "CGROUP_ROOT", root)
    monkeypatch.setattr(runtime, "PROC_CGROUP", proc)


@pytest.mark.parametrize(
    "files, membership, quota",
    [
        ({"job/cpu.max": "200000 100000\n"}, "0::/job\n", 2.0),
        ({"job/cpu.max": "max 100000\n"}, "0::/job\n", None),
        ({"a/cpu.max": "150000 100000\n", "a/b/cpu.max": "max 100000\n"}, "0::/a/b\n", 1.5),  # an ancestor's
        ({"cpu.max": "100000 100000\n"}, "0::/\n", 1.0),  # a container's own namespace
        (
            {"cpu,cpuacct/job/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"},
            "4:cpu,cpuacct:/job\n",
            3.0,
        ),
        ({"cpu/job/cpu.cfs_quota_us": "-1\n", "cpu/job/cpu.cfs_period_us": "100000\n"}, "3:cpu:/job\n", None),
        ({}, "0::/job\n", None),
    ],
)
def test_cpu_quota_is_read_from_the_cgroup(tmp_path, monkeypatch, files, membership, quota):
    _cgroup(tmp_path, monkeypatch, files, membership)
    assert runtime.cpu_quota() == quota


def test_a_compiled_fit_under_a_one_cpu_quota_runs_one_thread(tmp_path, monkeypatch):
    """A quota of one CPU (cgroup v2 ``cpu.max``; sched_getaffinity still lists every core): one thread, and the
    compiled fit finishes."""
    import torch

    from pipeline.core.learner import learn_dictionary
    from pipeline.core.synthetic import planted_problem

    _cgroup(tmp_path, monkeypatch, {"job/cpu.max": "100000 100000\n"}, "0::/job\n")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert runtime.threads() == 1
    started = []
    run_threads = runtime.run_threads

    def counted(work, n, abort=None):
        started.append(n)
        return run_threads(work, n, abort)

    monkeypatch.setattr(runtime, "run_threads", counted)
    p = planted_problem(seed=1)
    d = learn_dictionary(p.Y, 50, 3, max_iters=3, tol=None, progress=False, kernel="numba", device="cpu")
    assert d.metadata["iterations"] == 3 and started and set(started) == {1}


@numba.njit(nogil=True)
def _meet(sync, threads, rounds):
    generation = 0
    for _ in range(rounds):
        generation = barrier(sync, threads, generation)
    return generation


def test_waiters_yield_their_core_after_a_bounded_spin():
    """Three threads pinned to one core: a waiter that spun SPIN_ROUNDS times yields, so the thread it waits for
    gets the core at once instead of after the scheduler's time slice (without yielding, 300 such barriers took
    about 4 s on this one core)."""
    import os
    import time

    from pipeline.core.cpu.sweep_kernel import SPIN_ROUNDS, YIELDS

    assert 0 < SPIN_ROUNDS < 1_000_000
    _meet(np.zeros(SYNC_SLOTS, dtype=np.int64), 1, 1)  # compile outside the timing
    before = os.sched_getaffinity(0)
    sync = np.zeros(SYNC_SLOTS, dtype=np.int64)
    os.sched_setaffinity(0, {min(before)})  # this thread, and the threads it starts
    try:
        t0 = time.perf_counter()
        runtime.run_threads(lambda t: _meet(sync, 3, 300), 3, sync[ABORT : ABORT + 1])
        seconds = time.perf_counter() - t0
    finally:
        os.sched_setaffinity(0, before)
    assert sync[YIELDS] > 0
    assert seconds < 2.0
