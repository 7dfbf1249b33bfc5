"""``frozen_heap``: what was alive on entry is left out of collections until the exit; cycles made inside are
still freed; the freeze is given back on exit, exception or not, and by the outermost block only."""

from __future__ import annotations

import gc
import weakref

import pytest

from pipeline.utils.heap import frozen_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def _nothing_frozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_a_cycle_alive_on_entry_waits_for_the_exit_one_made_inside_is_freed():
    before = _Node()
    old = weakref.ref(before)
    del before  # still alive: the collector has not run
    with frozen_heap():
        assert old() is None  # frozen_heap collected first: garbage alive on entry is not frozen
        kept = _Node()
        kept_ref = weakref.ref(kept)
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        del kept  # garbage now, but frozen: a collection inside leaves it
        gc.collect()
        assert kept_ref() is not None
        inside = _Node()
        new = weakref.ref(inside)
        del inside
        gc.collect()
        assert new() is None  # made inside: collected as usual
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert kept_ref() is None  # given back on exit


def test_the_freeze_is_given_back_on_an_exception_and_by_the_outer_block_only():
    keep = [_Node() for _ in range(3)]  # something alive to freeze
    with pytest.raises(RuntimeError):
        with frozen_heap():
            raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        with frozen_heap():
            pass
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    assert keep


def test_run_metrics_runs_every_metric_inside_one_freeze(monkeypatch):
    from pipeline.evals.metrics import registry

    seen: list[int] = []
    monkeypatch.setattr(registry, "run_metric", lambda ctx, name, outcome: seen.append(gc.get_freeze_count()))
    registry.run_metrics(None, ["core", "absorption"])
    assert len(seen) == 2 and all(n > 0 for n in seen)
    assert gc.get_freeze_count() == 0
