"""Stand-in ranks for data-parallel tests: :class:`ThreadCollective` runs N ranks as threads of one process
(fast, no process group), :func:`run_ranks` runs a function on each and returns their results."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pipeline.core.collective import Collective


class _Exchange:
    """What the ranks share: one slot per rank and a barrier (a rank that skips a call breaks it, not hangs)."""

    def __init__(self, world: int):
        self.slots: list[Any] = [None] * world
        self.barrier = threading.Barrier(world, timeout=120)
        self.calls = 0


class ThreadCollective(Collective):
    """Rank ``rank`` of ``world`` threads: sums add the ranks' tensors in rank order, so every rank gets the same
    bits (as an all-reduce does)."""

    def __init__(self, exchange: _Exchange, rank: int):
        self.ex, self.rank, self.world = exchange, rank, len(exchange.slots)

    def _swap(self, value: Any) -> list[Any]:
        self.ex.slots[self.rank] = value
        self.ex.barrier.wait()  # every rank has put its part
        parts = list(self.ex.slots)
        self.ex.barrier.wait()  # every rank has read before the next call overwrites a slot
        if self.rank == 0:
            self.ex.calls += 1
        return parts

    def sum(self, *tensors: Tensor):
        parts = self._swap([t.clone() for t in tensors])
        out = []
        for i in range(len(tensors)):
            total = parts[0][i].clone()
            for p in parts[1:]:
                total += p[i]
            out.append(total)
        return out[0] if len(out) == 1 else tuple(out)

    def max(self, t: Tensor) -> Tensor:
        return torch.stack(self._swap(t.clone())).amax(0)

    def all_gather(self, t: Tensor) -> list[Tensor]:
        return [p.clone() for p in self._swap(t.clone())]


def run_ranks(world: int, fn: Callable[[ThreadCollective], Any]) -> list[Any]:
    """``fn(comm)`` on ``world`` thread ranks; their results in rank order (the first error is re-raised)."""
    ex = _Exchange(world)
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            results[r] = fn(ThreadCollective(ex, r))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            ex.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# ------------------------------------------------------------------------------------------ process ranks
def fit_worker(
    rank: int, world: int, init_file: str, data_file: str, runs: list[dict], out_file: str, timeout_s: float = 60.0
) -> None:
    """One rank of a real ``torch.distributed`` (gloo) data-parallel fit, started by a test in a fresh process:
    joins the group, fits ``learn_dictionary(Y, process_group=WORLD, **run)`` for each of ``runs`` (each a dict
    with ``n_atoms``, ``k`` and options; ``fail_at`` = (rank, iteration) raises there) and saves rank-tagged
    (atoms, history) pairs to ``out_file`` + ``.<rank>``; an error is saved there instead (then re-raised)."""
    from datetime import timedelta

    import torch.distributed as dist

    from pipeline.core.learner import learn_dictionary

    torch.set_num_threads(1)
    out = f"{out_file}.{rank}"
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
        )
        Y = torch.load(data_file)
        results = []
        for run in runs:
            run = dict(run)
            n_atoms, k, fail_at = run.pop("n_atoms"), run.pop("k"), run.pop("fail_at", None)

            def callback(it, rec, atoms, fail_at=fail_at):
                if fail_at is not None and fail_at == (rank, it):
                    raise RuntimeError(f"rank {rank} fails on purpose at iteration {it}")

            D = learn_dictionary(
                Y, n_atoms, k, process_group=dist.group.WORLD, callback=callback, progress=False, **run
            )
            results.append((D.atoms.clone(), D.history, D.metadata.get("ranks")))
        torch.save(results, out)
    except BaseException as exc:
        torch.save({"error": f"{type(exc).__name__}: {exc}"}, out)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
