"""The shared cache of SAE-independent eval artifacts: keying, verification on read, atomic publishing, the size
cap, the wiring that serves a metric's artifacts folder, and the random state pinned at each dataset's split."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.evals.artifact_cache import (
    FILES_DIR,
    KEY_FILE,
    MANIFEST_FILE,
    TMP_PREFIX,
    ArtifactCache,
    key_hash,
)
from pipeline.evals.config import CacheConfig, EvalConfig, parse_eval_config
from pipeline.evals.metrics.artifact_reuse import FINISHED_FILE, INFO_KEY, reused_artifacts
from pipeline.evals.metrics.rng_pinning import (
    _Split,
    probing_activations_name,
    rng_path,
    rng_state,
    set_rng_state,
)

KEY = {"model": "tiny", "hook": "blocks.1.hook_resid_post", "config": {"k_values": [1, 2]}}


def _src(tmp_path: Path, files: dict[str, bytes]) -> Path:
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return src


def _publish(cache: ArtifactCache, tmp_path: Path, key=KEY, files=None, metric="sparse_probing") -> int:
    files = files or {"sp/tiny/a_activations.pt": b"a" * 100, "sp/tiny/a_rng.pt": b"r" * 10}
    return cache.publish(metric, key, _src(tmp_path / key_hash(key)[:8], files), sorted(files))


def test_key_hash_is_canonical_and_sensitive():
    assert key_hash(KEY) == key_hash(dict(reversed(list(KEY.items()))))
    assert key_hash(KEY) != key_hash({**KEY, "config": {"k_values": [1]}})
    assert key_hash(KEY) != key_hash({**KEY, "hook": "blocks.0.hook_resid_post"})


def test_publish_then_lookup_serves_the_same_bytes(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", max_bytes=10_000)
    assert _publish(cache, tmp_path) == 110
    entry, why = cache.lookup("sparse_probing", KEY)
    assert why is None and entry.n_bytes == 110
    assert entry.files == ["sp/tiny/a_activations.pt", "sp/tiny/a_rng.pt"]
    assert (entry.files_dir / "sp/tiny/a_activations.pt").read_bytes() == b"a" * 100
    stored = json.loads((cache.entry_dir("sparse_probing", KEY) / KEY_FILE).read_text())
    assert stored["hook"] == KEY["hook"] and stored["config"] == KEY["config"]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(TMP_PREFIX)]
    assert _publish(cache, tmp_path) == 0  # already there: not written twice


def test_changed_key_or_metric_misses(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", max_bytes=10_000)
    _publish(cache, tmp_path)
    assert cache.lookup("sparse_probing", {**KEY, "config": {"k_values": [1]}}) == (None, "absent")
    assert cache.lookup("scr", KEY) == (None, "absent")


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda e: (e / FILES_DIR / "sp/tiny/a_activations.pt").write_bytes(b"b" * 100), "sha256"),
        (lambda e: (e / FILES_DIR / "sp/tiny/a_rng.pt").write_bytes(b"r" * 9), "size"),
        (lambda e: (e / FILES_DIR / "sp/tiny/a_rng.pt").unlink(), "missing"),
        (lambda e: (e / KEY_FILE).write_text(json.dumps({**KEY, "hook": "other"})), "key fields differ"),
        (lambda e: (e / MANIFEST_FILE).write_text("{not json"), "unreadable"),
    ],
)
def test_an_entry_that_does_not_verify_is_dropped(tmp_path, damage, needle):
    cache = ArtifactCache(tmp_path / "cache", max_bytes=10_000)
    _publish(cache, tmp_path)
    folder = cache.entry_dir("sparse_probing", KEY)
    damage(folder)
    entry, why = cache.lookup("sparse_probing", KEY)
    assert entry is None and needle in why
    assert not folder.exists()
    assert cache.lookup("sparse_probing", KEY) == (None, "absent")


def test_a_torn_entry_is_invisible_and_replaced(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", max_bytes=10_000)
    torn = cache.entry_dir("sparse_probing", KEY)
    (torn / FILES_DIR).mkdir(parents=True)
    (torn / FILES_DIR / "half.pt").write_bytes(b"x")  # killed before the manifest: never served
    assert cache.lookup("sparse_probing", KEY) == (None, "absent")
    assert _publish(cache, tmp_path) == 110
    assert not (torn / FILES_DIR / "half.pt").exists()
    assert cache.lookup("sparse_probing", KEY)[0] is not None


def test_least_recently_used_entries_go_past_the_cap(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", max_bytes=250)
    keys = [{**KEY, "n": i} for i in range(3)]
    _publish(cache, tmp_path, keys[0])
    _publish(cache, tmp_path, keys[1])
    old = cache.entry_dir("sparse_probing", keys[0]) / KEY_FILE
    os.utime(old, (1, 1))  # keys[0] last used long ago ...
    os.utime(cache.entry_dir("sparse_probing", keys[1]) / KEY_FILE, (2, 2))
    assert cache.lookup("sparse_probing", keys[0])[0] is not None  # ... until this hit
    _publish(cache, tmp_path, keys[2])  # 330 bytes > 250: the least recently used (keys[1]) goes
    assert cache.lookup("sparse_probing", keys[1]) == (None, "absent")
    assert cache.lookup("sparse_probing", keys[0])[0] is not None
    assert cache.lookup("sparse_probing", keys[2])[0] is not None
    assert cache.total_bytes() == 220


def test_an_entry_over_the_cap_on_its_own_is_not_kept(tmp_path):
    cache = ArtifactCache(tmp_path / "cache", max_bytes=50)
    assert _publish(cache, tmp_path) == 0
    assert cache.lookup("sparse_probing", KEY) == (None, "absent")


def _ctx(tmp_path: Path, **cache) -> SimpleNamespace:
    e = EvalConfig(cache=CacheConfig(**cache))
    store = SimpleNamespace(path=tmp_path / "harvest" / "store", hook="blocks.1.hook_resid_post")
    return SimpleNamespace(eval=e, store=store, info={})


def _run_metric(ctx, part: Path, make_key, fail: bool = False) -> list[str]:
    """What the body finds in ``part`` when it starts; it writes a file when the part is empty (a cold run)."""
    with reused_artifacts(ctx, "sparse_probing", part, make_key):
        found = sorted(p.name for p in part.rglob("*") if p.is_file()) if part.is_dir() else []
        if not found:
            (part / "sparse_probing" / "m").mkdir(parents=True, exist_ok=True)
            (part / "sparse_probing" / "m" / "d_activations.pt").write_bytes(b"acts")
        if fail:
            raise RuntimeError("metric failed")
    return found


def test_reused_artifacts_miss_publish_hit_and_record(tmp_path):
    ctx = _ctx(tmp_path)
    part = tmp_path / "run1" / "artifacts" / "sparse_probing"
    (part / "stale.pt").parent.mkdir(parents=True)
    (part / "stale.pt").write_bytes(b"left by another key")
    assert _run_metric(ctx, part, lambda: KEY) == []  # emptied first: nothing stale is read
    rec = ctx.info[INFO_KEY]
    assert rec["misses"] == 1 and rec["hits"] == 0 and rec["bytes_written"] == 4
    assert rec["root"] == str(tmp_path / "harvest" / "eval_cache")
    assert rec["metrics"]["sparse_probing"]["status"] == "miss"
    ctx2 = _ctx(tmp_path)
    part2 = tmp_path / "run2" / "artifacts" / "sparse_probing"
    assert _run_metric(ctx2, part2, lambda: KEY) == ["d_activations.pt"]
    assert (part2 / "sparse_probing" / "m" / "d_activations.pt").read_bytes() == b"acts"
    assert ctx2.info[INFO_KEY]["hits"] == 1 and ctx2.info[INFO_KEY]["bytes_read"] == 4
    other = _ctx(tmp_path)
    assert _run_metric(other, tmp_path / "run3", lambda: {**KEY, "config": {"k_values": [5]}}) == []
    assert other.info[INFO_KEY]["metrics"]["sparse_probing"]["why"] == "absent"


def test_reused_artifacts_publishes_nothing_from_a_failed_run_and_off_reuses_only_a_finished_run(tmp_path):
    ctx = _ctx(tmp_path)
    with pytest.raises(RuntimeError):
        _run_metric(ctx, tmp_path / "run1", lambda: KEY, fail=True)
    assert ctx.info[INFO_KEY]["metrics"]["sparse_probing"]["published"] is False
    assert ArtifactCache(tmp_path / "harvest" / "eval_cache", 10**6).lookup("sparse_probing", KEY)[0] is None
    off = _ctx(tmp_path, enabled=False)
    part = tmp_path / "run2"
    (part / "kept.pt").parent.mkdir(parents=True)
    (part / "kept.pt").write_bytes(b"x")

    def no_key():
        raise AssertionError("the key is not built when the cache is off")

    assert _run_metric(off, part, no_key) == []  # off, and no finished run left the folder: emptied first
    record = off.info[INFO_KEY]["metrics"]["sparse_probing"]
    assert record["status"] == "off" and record["emptied"] == "no finished run of the metric left it"
    assert json.loads((part / FINISHED_FILE).read_text()) == {"metric": "sparse_probing"}
    again = _ctx(tmp_path, enabled=False)
    assert _run_metric(again, part, no_key) == [FINISHED_FILE, "d_activations.pt"]  # a finished run's: reused
    assert "emptied" not in again.info[INFO_KEY]["metrics"]["sparse_probing"]
    with pytest.raises(RuntimeError):  # a failed run leaves no mark: the next one starts from an empty folder
        _run_metric(_ctx(tmp_path, enabled=False), tmp_path / "run3", no_key, fail=True)
    assert not (tmp_path / "run3" / FINISHED_FILE).exists()
    assert _run_metric(_ctx(tmp_path, enabled=False), tmp_path / "run3", no_key) == []


def test_cache_config_is_checked_and_left_out_of_the_stage_hash(tmp_path):
    from pipeline.runs.layout import stage_hash

    with pytest.raises(ValueError, match="eval.cache.max_gb"):
        parse_eval_config({"cache": {"max_gb": 0}})
    assert parse_eval_config({"cache": {"root": str(tmp_path)}}).cache.root == str(tmp_path)
    base = {"output_root": str(tmp_path), "experiment_name": "x", "eval": {"metrics": ["core"]}}
    off = {**base, "eval": {"metrics": ["core"], "cache": {"enabled": False}}}
    assert stage_hash(base, "evaluate") == stage_hash(off, "evaluate")


def test_rng_state_round_trip():
    random.seed(1)
    torch.manual_seed(1)
    state = rng_state()
    first = (random.random(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), torch.rand(3))
    assert first[0] == again[0] and torch.equal(first[1], again[1])


def test_split_saves_when_computed_and_restores_when_loaded(tmp_path):
    path = rng_path(tmp_path / "d_activations.pt")
    assert path.name == "d_activations_rng.pt"
    split = _Split()
    torch.manual_seed(3)
    split.path, split.cached = path, False
    split.at_split()  # computed: the state the SAE part starts from is saved
    expected = torch.rand(4)
    torch.manual_seed(99)  # a loaded run arrives with another state ...
    split.path, split.cached = path, True
    split.at_split()  # ... and starts its SAE part from the saved one
    assert torch.equal(torch.rand(4), expected)
    split.at_split()  # only the first call of a dataset counts
    assert split.path is None


def test_probing_activation_names_follow_saebench():
    assert probing_activations_name("a/b_set1", False, None) == "a_b_set1_activations.pt"
    assert probing_activations_name("a/b_set1", None, None) == "a_b_set1_activations.pt"
    assert probing_activations_name("d", True, ("x", "y")) == "d_x_y_activations.pt"
