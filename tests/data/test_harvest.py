"""The harvest loop and stage on a tiny local model; one test on the real offline SmolLM2-135M."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.data import harvest as harvest_mod, store as activation_store
from pipeline.data.store import MANIFEST_NAME, ActivationStore, StoreWriter
from pipeline.data.harvest import MaskingOptions, harvest, stop_layer
from pipeline.data.text import iter_contexts

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid"]
NO_MASK = MaskingOptions(mask_bos=False, mask_special_tokens=False)


def _run(model, docs, out, **kw):
    args = dict(hooks=HOOKS, n_tokens=1600, context_length=16, batch_size=4, shard_rows=128,
                heldout_fraction=0.1, progress=False)
    return harvest(model, docs, out, **{**args, **kw})


def _files(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_stored_rows_equal_run_with_cache(tiny_hooked_model, text_files, tmp_path):
    docs = text_files["docs"]
    path = _run(tiny_hooked_model, docs, tmp_path / "s", masking=NO_MASK, heldout_fraction=0.0)
    tokens = torch.tensor(list(iter_contexts(docs, tiny_hooked_model.tokenizer, 16, 0))[:100])
    _, cache = tiny_hooked_model.run_with_cache(tokens, names_filter=HOOKS)
    for hook in HOOKS:
        stored = ActivationStore(path, hook).load_all()
        assert stored.shape == (100 * 16, 32)
        torch.testing.assert_close(stored, cache[hook].reshape(-1, 32), atol=1e-5, rtol=1e-5)


def test_masking_and_manifest(tiny_hooked_model, text_files, tmp_path):
    path = _run(tiny_hooked_model, text_files["docs"], tmp_path / "s",
                masking=MaskingOptions(outlier_norm_factor=1.5))
    m = json.loads((path / MANIFEST_NAME).read_text())
    bos = tiny_hooked_model.tokenizer.bos_token_id
    assert m["complete"] and m["masking"]["masked_token_ids"] == [0, 1, 2] and m["bos_token_id"] == bos
    counts = m["hooks"][HOOKS[0]]["counts"]
    assert counts["positions"] == 1600 and counts["masked_special"] >= 100 and counts["masked_outlier"] >= 0
    kept = counts["positions"] - counts["masked_special"] - counts["masked_outlier"]
    store = ActivationStore(path, HOOKS[0])
    assert store.n_rows() + store.n_rows("heldout") == kept
    for key in ("model", "text", "context_length", "dtype", "heldout_fraction"):
        assert key in m
    assert all(len(s["sha256"]) == 64 for s in m["hooks"][HOOKS[0]]["train"]["shards"])
    assert store.mean_norm() > 0 and m["hooks"][HOOKS[0]]["layer"] == 0


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
    resumed = _run(tiny_hooked_model, docs, tmp_path / "resumed", dtype="bfloat16")
    assert _files(whole) == _files(resumed)


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


def test_refuses_when_disk_is_too_small(tiny_hooked_model, text_files, tmp_path, monkeypatch):
    monkeypatch.setattr(activation_store.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(OSError, match="not enough disk"):
        _run(tiny_hooked_model, text_files["docs"], tmp_path / "s")


# --------------------------------------------------------------------------- stage
def _stage_cfg(tiny_hf_dir, text_files, **harvest_overrides):
    from hydra import compose, initialize_config_dir

    from stages.harvest import __file__ as stage_file
    from pathlib import Path

    conf = str(Path(stage_file).resolve().parents[1] / "conf")
    overrides = ["model=tiny_local", f"model.path={tiny_hf_dir}", "data=local_files",
                 f"data.paths=[{text_files['jsonl']}]", "harvest.n_tokens=640", "harvest.context_length=16",
                 "harvest.batch_size=4", "harvest.shard_rows=64", "harvest.progress=false"]
    overrides += [f"harvest.{k}={v}" for k, v in harvest_overrides.items()]
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_stage_writes_then_reuses(tiny_hf_dir, text_files, tmp_path, monkeypatch):
    from stages import harvest as stage

    cfg = _stage_cfg(tiny_hf_dir, text_files, layers="[0,1]")
    path = stage.run(cfg, run_dir=tmp_path)
    assert path == tmp_path / stage.STORE_DIRNAME
    assert ActivationStore(path, "blocks.1.hook_resid_post").d == 32
    monkeypatch.setattr(stage, "load_model", lambda *a, **k: pytest.fail("an identical store must be reused"))
    assert stage.run(cfg, run_dir=tmp_path) == path
    monkeypatch.undo()
    with pytest.raises(ValueError, match="n_tokens"):
        stage.run(_stage_cfg(tiny_hf_dir, text_files, layers="[0,1]", n_tokens=1280), run_dir=tmp_path)


def test_stage_config_validation(tiny_hf_dir, text_files):
    from pipeline.data.config import parse_harvest_config

    cfg = _stage_cfg(tiny_hf_dir, text_files)
    model, source, h = parse_harvest_config(cfg)
    assert h.hook_list(model.layer) == ["blocks.1.hook_resid_post"] and source.kind == "files"
    plain = OmegaConf.to_container(cfg)
    with pytest.raises(ValueError, match="n_tokenz"):
        parse_harvest_config({**plain, "harvest": {**plain["harvest"], "n_tokenz": 5}})
    with pytest.raises(ValueError, match="path"):
        parse_harvest_config({**plain, "model": {**plain["model"], "path": "???"}})
    with pytest.raises(ValueError, match="heldout_fraction"):
        parse_harvest_config({**plain, "harvest": {**plain["harvest"], "heldout_fraction": 1.5}})


def test_harvest_module_exports():
    assert callable(harvest_mod.harvest_to_store)


# --------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_real_model_row_matches_forward(tmp_path):
    """The real offline SmolLM2-135M (setup.sh) on Austen: stored rows equal the model's own forward pass."""
    from pipeline.data.models import load_model
    from pipeline.data.text import TextSource, iter_documents

    hook = "blocks.15.hook_resid_post"
    model = load_model("smollm2-135m")
    docs = list(iter_documents(TextSource(kind="austen")))[:1]
    path = harvest(model, docs, tmp_path / "s", hooks=[hook], n_tokens=256, context_length=128, batch_size=2,
                   heldout_fraction=0.0, masking=NO_MASK, progress=False)
    store = ActivationStore(path)
    assert store.hook == hook and store.d == 576 and store.n_rows() == 256
    ctx = next(iter(iter_contexts(docs, model.tokenizer, 128, model.tokenizer.bos_token_id)))
    assert ctx[0] == model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with torch.inference_mode():
        _, cache = model.run_with_cache(torch.tensor([ctx]), names_filter=[hook])
    torch.testing.assert_close(store.load_all()[:128], cache[hook][0], atol=1e-4, rtol=1e-4)
    assert 50 < store.mean_norm() < 1000  # SmolLM2 layer-15 residual norms are ~170
