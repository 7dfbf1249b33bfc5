"""The activation store: import, reader (exactly-once shuffled epochs), checksums, dtypes, disk check."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.data import loader
from pipeline.data.loader import ActivationLoader, fits_in_memory, training_data
from pipeline.data.store import (
    MANIFEST_NAME,
    ActivationStore,
    BadShard,
    ChecksumError,
    check_disk_space,
    find_bad_shards,
    heldout_mask,
)
from pipeline.data.store_writer import import_array
from pipeline.runs.distributed import agree_all

N, D = 1000, 8


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    """(N, D) float32 rows whose first column is the row index (to track identity)."""
    x = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
    x[:, 0] = np.arange(N)
    return x


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, rows):
    src = tmp_path_factory.mktemp("src") / "emb.npy"
    np.save(src, rows)
    return import_array(src, tmp_path_factory.mktemp("store") / "s", shard_rows=128, heldout_fraction=0.1)


def test_import_splits_rows(store_path, rows):
    store = ActivationStore(store_path)
    held = heldout_mask(np.arange(N), 0.1)
    assert store.n_rows("heldout") == held.sum() == 100 and store.n_rows() == 900
    np.testing.assert_array_equal(store.load_all().numpy(), rows[~held])
    np.testing.assert_array_equal(store.heldout().numpy(), rows[held])
    assert store.mean_norm() == pytest.approx(float(np.linalg.norm(rows[~held], axis=1).mean()), rel=1e-6)
    # an imported array has no token ids (feature dashboards then say so instead of guessing text)
    assert not store.has_tokens() and store.read_tokens(store.shards()[0]) is None


def test_every_row_once_per_epoch_shuffled(store_path):
    store = ActivationStore(store_path)
    loader = store.loader(64, seed=3, shuffle_shards=2)
    assert len(loader) == 15
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert all(b.shape == (64, D) and b.dtype == torch.float32 for b in batches[:-1])
        assert batches[-1].shape == (900 - 14 * 64, D)
        ids = torch.cat(batches)[:, 0].long()
        assert sorted(ids.tolist()) == sorted(store.load_all()[:, 0].long().tolist())  # exactly once
        assert not torch.equal(ids, ids.sort().values)  # shuffled
        epochs.append(ids)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled per epoch
    again = torch.cat(list(store.loader(64, seed=3, shuffle_shards=2, prefetch=0)))[:, 0].long()
    assert torch.equal(again, epochs[0])  # seeded; prefetching does not change the order


def test_loader_options(store_path):
    store = ActivationStore(store_path)
    ordered = torch.cat(list(store.loader(100, shuffle=False)))
    assert torch.equal(ordered, store.load_all())
    dropped = list(store.loader(64, drop_last=True, dtype=torch.bfloat16))
    assert len(dropped) == 14 and all(b.shape == (64, D) and b.dtype == torch.bfloat16 for b in dropped)
    held = torch.cat(list(store.loader(32, split="heldout")))
    assert held.shape == (100, D)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_storage(tmp_path, rows, dtype):
    src = tmp_path / "emb.safetensors"
    save_file({"emb": torch.from_numpy(rows), "other": torch.zeros(2)}, src)
    with pytest.raises(ValueError, match="key="):
        import_array(src, tmp_path / "bad")
    store = ActivationStore(import_array(src, tmp_path / "s", key="emb", dtype=dtype, shard_rows=300))
    assert store.dtype == getattr(torch, dtype) and store.n_rows() == N
    torch.testing.assert_close(store.load_all(), torch.from_numpy(rows).to(store.dtype).float())
    assert not list((tmp_path / "s").rglob(".*.tmp-*"))  # no temp files (atomic.py's names) left behind


def test_corrupted_shard_is_named_and_a_rerun_repairs_just_it(tmp_path, rows):
    src = tmp_path / "emb.npy"
    np.save(src, rows)
    path = import_array(src, tmp_path / "s", shard_rows=256, heldout_fraction=0.1)
    files = {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    bad = manifest["hooks"]["emb"]["train"]["shards"][2]["file"]
    data = bytearray((path / bad).read_bytes())
    data[-5] ^= 0xFF
    (path / bad).write_bytes(bytes(data))
    assert find_bad_shards(path) == [BadShard("emb", "train", 2, bad, "sha256 mismatch")]
    store = ActivationStore(path)
    with pytest.raises(ChecksumError, match=bad) as err:
        store.verify_all()
    assert "re-run the harvest" in str(err.value) and "import_array" in str(err.value)
    with pytest.raises(ChecksumError, match=bad):
        list(store.loader(100))

    past = 10**18  # ns; a file the re-run writes gets a later mtime
    for p in files:
        os.utime(p, ns=(past, past))
    assert import_array(src, tmp_path / "s", shard_rows=256, heldout_fraction=0.1) == path
    assert {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} == files
    assert {p.relative_to(path).as_posix() for p in files if p.stat().st_mtime_ns != past} == {bad, MANIFEST_NAME}
    assert find_bad_shards(path) == []
    ActivationStore(path).verify_all()
    held = heldout_mask(np.arange(N), 0.1)
    np.testing.assert_array_equal(ActivationStore(path).load_all().numpy(), rows[~held])


def test_missing_shard_is_found(store_path, tmp_path):
    import shutil

    copy = shutil.copytree(store_path, tmp_path / "copy")
    shard = json.loads((copy / MANIFEST_NAME).read_text())["hooks"]["emb"]["heldout"]["shards"][0]["file"]
    (copy / shard).unlink()
    assert find_bad_shards(copy) == [BadShard("emb", "heldout", 0, shard, "missing")]
    with pytest.raises(FileNotFoundError, match="re-run the harvest"):
        ActivationStore(copy).heldout()


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an activation store"):
        ActivationStore(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((3, 4, 5), np.float32))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        import_array(tmp_path / "x.npy", tmp_path / "s")
    with pytest.raises(OSError, match="not enough disk"):
        check_disk_space(tmp_path, 1 << 62)
    with pytest.raises(ValueError, match="heldout_fraction"):
        heldout_mask(np.arange(3), 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loader_matches_cpu(store_path):
    store = ActivationStore(store_path)
    cpu = torch.cat(list(store.loader(64, seed=5)))
    gpu = list(store.loader(64, seed=5, device="cuda"))
    assert gpu[0].device.type == "cuda" and gpu[0].dtype == torch.float32
    assert torch.equal(torch.cat(gpu).cpu(), cpu)


def test_training_data_follows_the_agreed_choice(store_path, monkeypatch):
    """Data-parallel ranks pass one agreed ``in_memory``; only ``None`` lets free memory decide here."""
    store = ActivationStore(store_path)
    cpu = torch.device("cpu")
    assert isinstance(training_data(store, 64, cpu, 0, in_memory=True), torch.Tensor)
    assert isinstance(training_data(store, 64, cpu, 0, in_memory=False), ActivationLoader)  # plenty free, streams
    monkeypatch.setattr(loader, "free_memory", lambda device: 0)
    assert not fits_in_memory(store, cpu)
    assert isinstance(training_data(store, 64, cpu, 0), ActivationLoader)
    assert isinstance(training_data(store, 64, cpu, 0, in_memory=True), torch.Tensor)  # the agreed choice wins
    need = store.n_rows() * D * 4
    monkeypatch.setattr(loader, "free_memory", lambda device: 4 * need)  # exactly IN_MEMORY_SHARE of it
    assert fits_in_memory(store, cpu) and not fits_in_memory(store, cpu, readers=2)
    assert agree_all(None, True) and not agree_all(None, False)  # one process: its own view
