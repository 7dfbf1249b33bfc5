"""One store harvested by several processes (``part=(rank, world)``, what torchrun ranks do): each makes every
world-th shard and lists it in its ledger, rank 0 merges; the store is the one-process store, byte for byte."""

from __future__ import annotations

import pytest

from pipeline.data.store import ActivationStore
from pipeline.data.store_writer import PART_PATTERN, StoreWriter
from tests.data.test_harvest import HOOKS, _files, _run


def _parts(model, docs, out, world, **kw):
    for rank in [*range(1, world), 0]:  # rank 0 last: it merges what the others listed
        _run(model, docs, out, part=(rank, world), wait_s=5, **kw)


@pytest.mark.parametrize("world", [2, 3])
def test_parts_make_the_one_process_store(tiny_hooked_model, text_files, tmp_path, world):
    docs = text_files["docs"]
    whole = _run(tiny_hooked_model, docs, tmp_path / "whole")
    _parts(tiny_hooked_model, docs, tmp_path / "parts", world)
    assert _files(whole) == _files(tmp_path / "parts")  # shards, rows, held-out split, manifest; no ledgers left
    assert len(ActivationStore(whole, HOOKS[0]).shards()) >= 2 * world  # every rank made several shards


def test_text_running_out_mid_part(tiny_hooked_model, text_files, tmp_path):
    docs = text_files["docs"]
    whole = _run(tiny_hooked_model, docs, tmp_path / "whole", n_tokens=10**6)  # far more than the text has
    _parts(tiny_hooked_model, docs, tmp_path / "parts", 2, n_tokens=10**6)
    assert _files(whole) == _files(tmp_path / "parts")


def test_a_killed_rank_resumes_its_part(tiny_hooked_model, text_files, tmp_path, monkeypatch):
    docs = text_files["docs"]
    whole = _run(tiny_hooked_model, docs, tmp_path / "whole")
    original = StoreWriter.add_part_shard
    made = []

    def dying(self, index, *args, **kwargs):
        if index == 5:
            raise KeyboardInterrupt("killed")
        made.append(index)
        return original(self, index, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "add_part_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_hooked_model, docs, tmp_path / "parts", part=(1, 2))
    assert made == [1, 3]
    # damage one listed shard: the resumed rank re-makes it and only it, then carries on
    (tmp_path / "parts" / HOOKS[1] / "train-00003.safetensors").write_bytes(b"torn")
    made.clear()
    monkeypatch.setattr(
        StoreWriter, "add_part_shard", lambda self, index, *a, **k: made.append(index) or original(self, index, *a, **k)
    )
    _run(tiny_hooked_model, docs, tmp_path / "parts", part=(1, 2))
    assert made[:2] == [3, 5] and 1 not in made
    _run(tiny_hooked_model, docs, tmp_path / "parts", part=(0, 2), wait_s=5)
    assert _files(whole) == _files(tmp_path / "parts")


def test_rank_zero_does_not_wait_forever_for_a_missing_rank(tiny_hooked_model, text_files, tmp_path):
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish"):
        _run(tiny_hooked_model, text_files["docs"], tmp_path / "parts", part=(0, 2), wait_s=0.5)
    assert (tmp_path / "parts" / PART_PATTERN.format(rank=0, world=2)).is_file()  # its own part is kept
