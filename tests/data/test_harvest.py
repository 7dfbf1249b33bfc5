"""The harvest loop on a tiny local model (masking, resume, self-repair); one test on the real offline SmolLM2-135M."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.data import harvest as harvest_module
from pipeline.data import store as activation_store
from pipeline.data import store_writer
from pipeline.data.harvest import MaskingOptions, harvest, stop_layer
from pipeline.data.store import MANIFEST_NAME, ActivationStore, ChecksumError, heldout_mask
from pipeline.data.store_writer import StoreWriter
from pipeline.data.text import iter_contexts
from tests.conftest import REPO

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid"]
NO_MASK = MaskingOptions(mask_bos=False, mask_special_tokens=False)


def _run(model, docs, out, **kw):
    args = dict(
        hooks=HOOKS,
        n_tokens=1600,
        context_length=16,
        batch_size=4,
        shard_rows=128,
        heldout_fraction=0.1,
        progress=False,
    )
    return harvest(model, docs, out, **{**args, **kw})


def _files(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _contexts(model, docs, n=100, length=16):
    """The first ``n`` contexts the harvest packs (BOS = token 0 of the tiny tokenizer)."""
    return torch.tensor(list(iter_contexts(docs, model.tokenizer, length, model.tokenizer.bos_token_id))[:n])


def test_stored_rows_equal_run_with_cache(tiny_hooked_model, text_files, tmp_path):
    docs = text_files["docs"]
    path = _run(tiny_hooked_model, docs, tmp_path / "s", masking=NO_MASK, heldout_fraction=0.0)
    tokens = torch.tensor(list(iter_contexts(docs, tiny_hooked_model.tokenizer, 16, 0))[:100])
    _, cache = tiny_hooked_model.run_with_cache(tokens, names_filter=HOOKS)
    for hook in HOOKS:
        stored = ActivationStore(path, hook).load_all()
        assert stored.shape == (100 * 16, 32)
        torch.testing.assert_close(stored, cache[hook].reshape(-1, 32), atol=1e-5, rtol=1e-5)


PLANTED = (0, 5, 11)
"""Positions whose ``blocks.0`` residual the outlier test scales by 100 in every context (0 holds BOS)."""


def test_outlier_masking_drops_exactly_the_planted_outliers(tiny_hooked_model, text_files, tmp_path):
    """Plant outliers (x100 residual at three positions per context, which reaches both hooks), mask at 10x
    the median norm (natural rows stay under 2x): exactly the planted positions are dropped (the BOS one counts
    as special), and the stored rows are exactly the run_with_cache rows neither special nor planted."""
    model, docs = tiny_hooked_model, text_files["docs"]
    scale = torch.ones(16, 1)
    scale[list(PLANTED)] = 100.0
    model.add_hook(HOOKS[0], lambda acts, hook: acts * scale.to(acts), is_permanent=True)
    try:
        path = _run(model, docs, tmp_path / "s", masking=MaskingOptions(outlier_norm_factor=10.0))
        tokens = _contexts(model, docs)
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, names_filter=HOOKS)
    finally:
        model.reset_hooks(including_permanent=True)
    special = torch.isin(tokens, torch.tensor([0, 1, 2]))  # <bos>, <eos>, <pad>
    planted = torch.zeros_like(special)
    planted[:, list(PLANTED)] = True
    held = torch.from_numpy(heldout_mask(torch.arange(100).numpy(), 0.1))[:, None]
    m = json.loads((path / MANIFEST_NAME).read_text())
    assert m["complete"] and m["masking"]["masked_token_ids"] == [0, 1, 2]
    assert m["bos_token_id"] == model.tokenizer.bos_token_id == 0
    for hook in HOOKS:
        counts = m["hooks"][hook]["counts"]
        assert counts == {
            "positions": 1600,
            "masked_special": int(special.sum()),
            "masked_outlier": int((planted & ~special).sum()),
        }
        assert counts["masked_outlier"] == 200  # positions 5 and 11 of 100 contexts; position 0 is BOS
        keep = ~special & ~planted
        store = ActivationStore(path, hook)
        train, heldout = store.load_all(), store.heldout()
        torch.testing.assert_close(train, cache[hook][keep & ~held], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(heldout, cache[hook][keep & held], atol=1e-5, rtol=1e-5)
        assert store.mean_norm() == pytest.approx(float(train.norm(dim=1).mean()), rel=1e-5)
        assert store.mean_norm("heldout") == pytest.approx(float(heldout.norm(dim=1).mean()), rel=1e-5)
        for split in ("train", "heldout"):
            for shard in m["hooks"][hook][split]["shards"]:
                assert shard["sha256"] == hashlib.sha256((path / shard["file"]).read_bytes()).hexdigest()
        _check_token_ids(store, tokens, cache[hook], held[:, 0])
    for key in ("model", "text", "context_length", "dtype", "heldout_fraction"):
        assert key in m
    assert m["hooks"][HOOKS[0]]["layer"] == 0 and m["hooks"][HOOKS[1]]["layer"] == 1


def _check_token_ids(store, tokens, acts, held):
    """Every stored row's token ids (``ShardTokens``) point at the context and position whose activation it is:
    the contexts of each shard file are its split's, in order, with their ids; each row is ``acts[ctx, pos]``."""
    assert store.has_tokens()
    L = tokens.shape[1]
    for split in ("train", "heldout"):
        seen = []
        for shard in store.shards(split):
            t = store.read_tokens(shard)
            assert t.token_ids.dtype == torch.int32 and t.positions.dtype == torch.int64
            assert all(bool(held[c]) == (split == "heldout") for c in t.contexts.tolist())
            torch.testing.assert_close(t.token_ids.long(), tokens[t.contexts])
            ctx, pos = t.contexts[t.positions // L], t.positions % L
            torch.testing.assert_close(store.read_shard(shard).float(), acts[ctx, pos], atol=1e-5, rtol=1e-5)
            seen += t.contexts.tolist()
        assert seen == [c for c in range(len(tokens)) if bool(held[c]) == (split == "heldout")]


def test_uses_stop_at_layer(tiny_hooked_model, text_files, tmp_path, monkeypatch):
    seen = []
    original = tiny_hooked_model.run_with_cache

    def spy(*args, **kwargs):
        seen.append(kwargs.get("stop_at_layer"))
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_hooked_model, "run_with_cache", spy)
    _run(tiny_hooked_model, text_files["docs"], tmp_path / "s", hooks=["blocks.0.hook_resid_post"], n_tokens=64)
    assert seen and set(seen) == {1}
    assert stop_layer(["blocks.3.hook_resid_post", "blocks.7.hook_mlp_out"]) == 8
    assert stop_layer(["ln_final.hook_normalized"]) is None


def test_killed_then_resumed_is_byte_identical(tiny_hooked_model, text_files, tmp_path, monkeypatch):
    docs = text_files["docs"]
    whole = _run(tiny_hooked_model, docs, tmp_path / "whole", dtype="bfloat16")
    original = StoreWriter.add_shard

    def dying(self, index, *args, **kwargs):
        if index == 3:
            # crash between a shard's rename and the manifest update: file there, not listed
            (self.path / HOOKS[0] / "train-00003.safetensors").write_bytes(b"half-written")
            (self.path / HOOKS[1] / ".train-00003.safetensors.tmp-999").write_bytes(b"killed mid-write")
            raise KeyboardInterrupt("killed")
        return original(self, index, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "add_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_hooked_model, docs, tmp_path / "resumed", dtype="bfloat16")
    assert not json.loads((tmp_path / "resumed" / MANIFEST_NAME).read_text())["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        ActivationStore(tmp_path / "resumed", HOOKS[0])
    monkeypatch.setattr(StoreWriter, "add_shard", original)
    # damage the part written before the kill too: the resume re-makes it, then carries on
    (tmp_path / "resumed" / HOOKS[0] / "heldout-00001.safetensors").unlink()
    resumed = _run(tiny_hooked_model, docs, tmp_path / "resumed", dtype="bfloat16")
    assert _files(whole) == _files(resumed)


def test_rerun_remakes_exactly_the_corrupted_shard(tiny_hooked_model, text_files, tmp_path, monkeypatch):
    docs = text_files["docs"]
    path = _run(tiny_hooked_model, docs, tmp_path / "s")
    before = _files(path)
    rows = {h: (ActivationStore(path, h).load_all(), ActivationStore(path, h).heldout()) for h in HOOKS}
    bad = Path(HOOKS[1]) / "train-00004.safetensors"
    data = bytearray(before[bad])
    data[-3] ^= 0xFF
    (path / bad).write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="re-run the harvest") as err:
        ActivationStore(path, HOOKS[1]).load_all()
    assert str(bad) in str(err.value) and "python -m pipeline stage=harvest" in str(err.value)
    past = 1_000_000_000 * 10**9  # 2001: any file the re-run writes gets a later mtime
    for rel in before:
        os.utime(path / rel, ns=(past, past))

    written, forwards = [], []
    atomic = store_writer.atomic_write_bytes
    monkeypatch.setattr(
        store_writer,
        "atomic_write_bytes",
        lambda target, blob: written.append(Path(target).relative_to(path)) or atomic(target, blob),
    )
    run_with_cache = tiny_hooked_model.run_with_cache

    def spy(tokens, **kwargs):
        if tokens.shape[1] == 16:  # a harvest batch (not the one-token width probe)
            forwards.append((kwargs["names_filter"], int(tokens.shape[0])))
        return run_with_cache(tokens, **kwargs)

    monkeypatch.setattr(tiny_hooked_model, "run_with_cache", spy)
    assert _run(tiny_hooked_model, docs, tmp_path / "s") == path
    monkeypatch.undo()

    assert _files(path) == before  # the bad shard is bit-identical again; everything else never changed
    touched = {rel for rel in before if (path / rel).stat().st_mtime_ns != past}
    assert touched == {bad, Path(MANIFEST_NAME)}
    assert written == [bad, Path(MANIFEST_NAME)]  # through the atomic helper, shard first, then the manifest
    assert forwards == [([HOOKS[1]], 4), ([HOOKS[1]], 4)]  # only the bad hook, only shard 4's 8 contexts
    assert not list(path.rglob(".*.tmp-*"))
    for h in HOOKS:
        store = ActivationStore(path, h)
        store.verify_all()
        assert torch.equal(store.load_all(), rows[h][0]) and torch.equal(store.heldout(), rows[h][1])

    # a missing shard is re-made the same way; a sound store is then reused without a forward pass
    (path / bad).unlink()
    _run(tiny_hooked_model, docs, tmp_path / "s")
    assert _files(path) == before
    monkeypatch.setattr(tiny_hooked_model, "run_with_cache", lambda *a, **k: pytest.fail("nothing to re-make"))
    monkeypatch.setattr(harvest_module, "_hook_width", lambda model, hook: 32)
    assert _run(tiny_hooked_model, docs, tmp_path / "s") == path


def test_clear_errors(tiny_hooked_model, text_files, tmp_path):
    with pytest.raises(ValueError, match="no complete context"):
        _run(tiny_hooked_model, [], tmp_path / "empty")
    with pytest.raises(ValueError, match="n_ctx=64"):
        _run(tiny_hooked_model, text_files["docs"], tmp_path / "long", context_length=65, n_tokens=1000)
    with pytest.raises(ValueError, match="do not exist"):
        _run(tiny_hooked_model, text_files["docs"], tmp_path / "hook", hooks=["blocks.9.hook_resid_post"])
    _run(tiny_hooked_model, text_files["docs"], tmp_path / "s", n_tokens=160)
    with pytest.raises(ValueError, match="different activation store"):
        _run(tiny_hooked_model, text_files["docs"], tmp_path / "s", n_tokens=320)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("outlier", [None, 10.0])
def test_non_finite_activations_stop_the_harvest_naming_context_and_shard(
    tiny_hooked_model, text_files, tmp_path, bad, outlier
):
    """A NaN or Inf activation stops the harvest, naming the hook, the context and the shard; with outlier masking
    on, it is not dropped as an outlier (its norm compares false with every bound)."""
    model, calls = tiny_hooked_model, []

    def plant(acts, hook):
        if tuple(acts.shape[:2]) == (4, 16):  # the harvest's batches (4 contexts of 16 tokens; 8 per shard)
            calls.append(len(calls))
            if len(calls) == 4:  # contexts 12..15: shard 1
                acts = acts.clone()
                acts[1, 7, 3] = bad
        return acts

    model.add_hook(HOOKS[0], plant, is_permanent=True)
    try:
        with pytest.raises(ValueError, match=r"(?s)blocks\.0\.hook_resid_post.*context 13.*shard 1.*position 7"):
            _run(model, text_files["docs"], tmp_path / "s", masking=MaskingOptions(outlier_norm_factor=outlier))
    finally:
        model.reset_hooks(including_permanent=True)


def test_a_context_of_one_token_is_refused_before_the_model_runs(tiny_hooked_model, text_files, tmp_path):
    with pytest.raises(ValueError, match=r"harvest\.context_length=1 must be at least 2"):
        _run(tiny_hooked_model, text_files["docs"], tmp_path / "s", context_length=1, n_tokens=100)


def test_refuses_when_disk_is_too_small(tiny_hooked_model, text_files, tmp_path, monkeypatch):
    monkeypatch.setattr(activation_store.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(OSError, match="not enough disk"):
        _run(tiny_hooked_model, text_files["docs"], tmp_path / "s")


# --------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_real_model_row_matches_forward(tmp_path):
    """The real offline SmolLM2-135M (setup.sh) on Austen: stored rows equal the model's own forward pass."""
    from pipeline.data.models import load_model
    from pipeline.data.text import TextSource, iter_documents

    hook = "blocks.15.hook_resid_post"
    model = load_model("smollm2-135m")
    docs = list(iter_documents(TextSource(kind="austen")))[:1]
    path = harvest(
        model,
        docs,
        tmp_path / "s",
        hooks=[hook],
        n_tokens=256,
        context_length=128,
        batch_size=2,
        heldout_fraction=0.0,
        masking=NO_MASK,
        progress=False,
    )
    store = ActivationStore(path)
    assert store.hook == hook and store.d == 576 and store.n_rows() == 256
    # the shape conf/model/smollm2_135m.yaml records for the config check is the model's
    shape = yaml.safe_load((REPO / "conf" / "model" / "smollm2_135m.yaml").read_text())
    assert (shape["d_model"], shape["n_layers"]) == (model.cfg.d_model, model.cfg.n_layers)
    ctx = next(iter(iter_contexts(docs, model.tokenizer, 128, model.tokenizer.bos_token_id)))
    assert ctx[0] == model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with torch.inference_mode():
        _, cache = model.run_with_cache(torch.tensor([ctx]), names_filter=[hook])
    torch.testing.assert_close(store.load_all()[:128], cache[hook][0], atol=1e-4, rtol=1e-4)
    assert 50 < store.mean_norm() < 1000  # SmolLM2 layer-15 residual norms are ~170
