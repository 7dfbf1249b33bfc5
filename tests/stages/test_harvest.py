"""The harvest stage: owns its folder and marker, reuses a finished store, refuses a different one, and
re-makes a corrupted shard when asked for by name."""

import json

import pytest
from omegaconf import OmegaConf

from pipeline.data.config import parse_harvest_config
from pipeline.data.store import MANIFEST_NAME, ActivationStore, ChecksumError
from pipeline.runs.layout import DONE_MARKER, STORE_DIRNAME, stage_dir
from stages import harvest as stage
from tests.conftest import compose_config


def _stage_cfg(root, tiny_hf_dir, text_files, *overrides):
    return compose_config(
        f"output_root={root}",
        "experiment_name=tiny",
        "model=tiny_local",
        f"model.path={tiny_hf_dir}",
        "data=local_files",
        f"data.paths=[{text_files['jsonl']}]",
        "harvest.n_tokens=640",
        "harvest.context_length=16",
        "harvest.batch_size=4",
        "harvest.shard_rows=64",
        "harvest.progress=false",
        *overrides,
    )


def test_stage_writes_into_its_layout_folder_then_reuses(tiny_hf_dir, text_files, tmp_path, monkeypatch):
    cfg = _stage_cfg(tmp_path, tiny_hf_dir, text_files, "harvest.layers=[0,1]")
    folder = stage.run(cfg)
    assert folder == stage_dir(cfg, "harvest") and (folder / DONE_MARKER).is_file()
    assert ActivationStore(folder / STORE_DIRNAME, "blocks.1.hook_resid_post").d == 32
    monkeypatch.setattr(stage, "load_model", lambda *a, **k: pytest.fail("a finished store must be reused"))
    assert stage.run(cfg) == folder


def test_a_different_store_in_the_folder_is_refused(tiny_hf_dir, text_files, tmp_path):
    cfg = _stage_cfg(tmp_path, tiny_hf_dir, text_files)
    folder = stage.run(cfg)
    (folder / DONE_MARKER).unlink()
    manifest = folder / STORE_DIRNAME / MANIFEST_NAME
    m = json.loads(manifest.read_text())
    m["identity"]["n_tokens"] = 1280  # as if another config had written this folder
    manifest.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="different activation store"):
        stage.run(cfg)


def test_a_corrupted_shard_is_remade_by_running_the_stage_again(tiny_hf_dir, text_files, tmp_path):
    cfg = _stage_cfg(tmp_path, tiny_hf_dir, text_files)
    folder = stage.run(cfg)
    store = folder / STORE_DIRNAME
    before = ActivationStore(store).load_all()
    shards = sorted(store.glob("*/train-*.safetensors"))
    assert len(shards) >= 2
    good = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards[1:]}
    data = bytearray(shards[0].read_bytes())
    data[-1] ^= 0xFF
    shards[0].write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="re-run the harvest"):
        ActivationStore(store).load_all()
    assert stage.run(cfg) == folder
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards[1:]} == good  # only the bad one re-made
    ActivationStore(store).verify_all()
    assert ActivationStore(store).load_all().equal(before)


def test_stage_config_validation(tiny_hf_dir, text_files, tmp_path):
    cfg = _stage_cfg(tmp_path, tiny_hf_dir, text_files)
    model, source, h = parse_harvest_config(cfg)
    assert h.hook_list(model.layer) == ["blocks.1.hook_resid_post"] and source.kind == "files"
    plain = OmegaConf.to_container(cfg)
    with pytest.raises(ValueError, match="harvest.n_tokenz"):
        parse_harvest_config({**plain, "harvest": {**plain["harvest"], "n_tokenz": 5}})
    with pytest.raises(ValueError, match="model.path"):
        parse_harvest_config({**plain, "model": {**plain["model"], "path": "???"}})
    with pytest.raises(ValueError, match="heldout_fraction"):
        parse_harvest_config({**plain, "harvest": {**plain["harvest"], "heldout_fraction": 1.5}})
