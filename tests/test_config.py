"""The real config composes for every preset, and bad configs fail fast naming the key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.runs.config import check_config
from pipeline.runs.layout import stage_dir

CONF = str(Path(__file__).resolve().parents[1] / "conf")
PRESETS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides)


def test_every_preset_is_checked():
    assert {"default", "smoke", "gemma2b_paper", "pythia160m_paper"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_validates(preset, tmp_path):
    cfg = _compose([f"experiment={preset}", f"output_root={tmp_path}"])
    check_config(cfg)
    assert cfg.experiment_name == preset
    assert stage_dir(cfg, "fit").parent == Path(tmp_path) / preset


def test_paper_presets_match_the_paper():
    cfg = _compose(["experiment=gemma2b_paper"])
    assert cfg.model.name == "gemma-2-2b" and cfg.model.layer == 12
    assert cfg.harvest.context_length == 128 and cfg.dictionary.batch_size == 65536
    assert cfg.dictionary.epochs == 3 and cfg.dictionary.nonnegative is False
    cfg = _compose(["experiment=pythia160m_paper"])
    assert cfg.model.name == "pythia-160m-deduped" and cfg.model.layer == 8


def test_runs_that_differ_after_harvest_share_the_store():
    a = _compose(["dictionary.k=16"])
    b = _compose(["dictionary.k=64"])
    assert stage_dir(a, "harvest") == stage_dir(b, "harvest")
    assert stage_dir(a, "fit") != stage_dir(b, "fit")
    c = _compose(["harvest.n_tokens=1000"])
    assert stage_dir(a, "harvest") != stage_dir(c, "harvest")


@pytest.mark.parametrize("overrides, message", [
    (["dictionary.k=1000"], "dictionary.*exceeds the dimension"),
    (["dictionary.n_atoms=4", "dictionary.k=8"], "smaller than k"),
    (["model.layer=30"], "layer 30 does not exist"),
    (["+dictionary.atoms=4"], "dictionary.atoms"),
    (["+baseline.learning_rate=1"], "baseline.learning_rate"),
    (["+colour=blue"], "colour"),
    (["stage=train"], "stage='train'"),
    (["dictionary.method=lasso"], "dictionary.method"),
])
def test_bad_config_fails_fast_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(_compose(overrides))
