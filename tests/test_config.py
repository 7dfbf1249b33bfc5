"""The real config composes for every preset, is typed by the schema, and bad configs fail before any work."""

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from pipeline.core.learner_config import LearnerConfig
from pipeline.runs.config import baseline_specs, check_config, section
from pipeline.runs.layout import stage_dir
from tests.conftest import CONF, compose_config

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
#: Presets that need the hub and a GPU; offline they compose, and validate once pointed at the CPU.
GPU_PRESETS = {"gemma2b_paper", "pythia160m_paper"}
ON_CPU = ["model.device=cpu", "dictionary.device=cpu"]


def test_every_preset_is_checked():
    assert {"default", "smoke", "gemma2b_paper", "pythia160m_paper"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_validates(preset, tmp_path):
    cfg = compose_config(f"experiment={preset}", f"output_root={tmp_path}", *(ON_CPU if preset in GPU_PRESETS else []))
    check_config(cfg)
    assert cfg.experiment_name == preset
    assert stage_dir(cfg, "fit").parent == Path(tmp_path) / preset


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given on a machine without CUDA")
@pytest.mark.parametrize("preset", sorted(GPU_PRESETS))
def test_gpu_preset_without_cuda_fails_naming_the_device_key(preset):
    with pytest.raises(ValueError, match=r"model\.device: device 'cuda'.*no CUDA"):
        check_config(compose_config(f"experiment={preset}"))
    with pytest.raises(ValueError, match=r"dictionary\.device: device 'cuda'"):
        check_config(compose_config(f"experiment={preset}", "model.device=cpu"))


def test_paper_presets_match_the_paper():
    cfg = compose_config("experiment=gemma2b_paper")
    assert cfg.model.name == "gemma-2-2b" and cfg.model.layer == 12
    assert cfg.harvest.context_length == 128 and cfg.dictionary.batch_size == 65536
    assert cfg.dictionary.epochs == 3 and cfg.dictionary.coder.nonnegative is False
    cfg = compose_config("experiment=pythia160m_paper")
    assert cfg.model.name == "pythia-160m-deduped" and cfg.model.layer == 8


def test_the_schema_supplies_the_library_defaults():
    """conf/dictionary/dbksvd.yaml sets only K and k; every other option is LearnerConfig's own default."""
    learner = section(compose_config("experiment=smoke"), "dictionary")
    assert isinstance(learner, LearnerConfig)
    assert (learner.n_atoms, learner.coder.k, learner.max_iters) == (256, 8, 4)  # the smoke preset's choices
    defaults = LearnerConfig.from_options(256, 8)
    assert learner.rank1_tol == defaults.rank1_tol and learner.coder.method == defaults.coder.method == "mp"
    assert learner.duplicate_threshold == defaults.duplicate_threshold


def test_baselines_are_chosen_as_a_list_of_config_files():
    cfg = compose_config("baseline=[jumprelu,matching_pursuit]", "baseline.jumprelu.lr=1e-3")
    specs = baseline_specs(cfg)
    assert list(specs) == ["jumprelu", "matching_pursuit"]
    assert specs["jumprelu"].architecture == "jumprelu" and specs["jumprelu"].lr == 1e-3
    assert baseline_specs(compose_config("baseline=[]")) == {}
    for name in ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "standard", "matching_pursuit"):
        assert baseline_specs(compose_config(f"baseline=[{name}]"))[name].architecture == name  # one file each


def test_changing_the_baselines_keeps_the_fit():
    a, b = compose_config(), compose_config("baseline=[topk]", "compare.factor=5")
    assert stage_dir(a, "fit") == stage_dir(b, "fit") and stage_dir(a, "baselines") != stage_dir(b, "baselines")
    assert stage_dir(a, "evaluate") != stage_dir(b, "evaluate")


def test_runs_that_differ_after_harvest_share_the_store():
    a = compose_config("dictionary.coder.k=16")
    b = compose_config("dictionary.coder.k=64")
    assert stage_dir(a, "harvest") == stage_dir(b, "harvest")
    assert stage_dir(a, "fit") != stage_dir(b, "fit")
    c = compose_config("harvest.n_tokens=1000")
    assert stage_dir(a, "harvest") != stage_dir(c, "harvest")
    assert stage_dir(a, "fit") != stage_dir(c, "fit")  # a fit depends on its store


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dictionary.coder.k=1000"], "dictionary.*exceeds the dimension"),
        (["dictionary.n_atoms=4", "dictionary.coder.k=8"], "smaller than k"),
        (["model.layer=30"], "layer 30 does not exist"),
        (["+dictionary.atoms=4"], r"dictionary\.atoms"),
        (["+dictionary.coder.colour=red"], r"dictionary\.coder\.colour"),
        (["+baseline.topk.learning_rate=1"], r"baseline\.topk\.learning_rate"),
        (["baseline.topk.lr=-1"], r"baseline\.topk: lr=-1"),
        (["baseline.topk.architecture=gated"], r"baseline\.topk: architecture='gated'"),
        (["compare.budget=forever"], r"compare\.budget='forever'"),
        (["compare.budget=steps"], r"compare\.budget=steps needs compare\.steps"),
        (["eval.saes=[dictionary,jumprelu]"], r"eval\.saes has unknown entries \['jumprelu'\]"),
        (["+harvest.n_tokenz=4"], r"harvest\.n_tokenz"),
        (["+colour=blue"], "colour"),
        (["stage=train"], "stage='train'"),
        (["dictionary.coder.method=lasso"], r"coder\.method = 'lasso'"),
        (["dictionary.init=zeros"], "init = 'zeros'"),
        (["harvest.heldout_fraction=1.5"], r"harvest\.heldout_fraction"),
        (["harvest.dtype=int8"], r"harvest\.dtype"),
        (["+dictionary.checkpoint_path=/tmp/x.ckpt"], r"dictionary\.checkpoint_path is set by the fit stage"),
        (["data=local_files"], r"data\.paths"),
    ],
)
def test_bad_config_fails_naming_the_key(overrides, message):
    """Keys added with `+` get past Hydra's struct mode; the one check catches them, naming the key."""
    with pytest.raises(ValueError, match=message):
        check_config(compose_config(*overrides))


@pytest.mark.parametrize(
    "override, key",
    [
        ("dictionary.colour=red", "dictionary.colour"),
        ("harvest.n_tokenz=4", "harvest.n_tokenz"),
        ("dictionary.coder.k=abc", "dictionary.coder.k"),
        ("harvest.n_tokens=many", "harvest.n_tokens"),
    ],
)
def test_the_schema_rejects_unknown_keys_and_bad_types_at_composition(override, key):
    with pytest.raises(ConfigCompositionException, match=key.replace(".", r"\.")):
        compose_config(override)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given on a machine without CUDA")
@pytest.mark.parametrize(
    "override", ["dictionary.device=cuda", "model.device=cuda", "baseline.topk.device=cuda:0", "eval.device=cuda"]
)
def test_a_cuda_device_without_cuda_fails_before_any_work(override):
    node = override.rsplit(".", 1)[0]
    with pytest.raises(ValueError, match=rf"{node}\.device: device 'cuda.*use device=cpu"):
        check_config(compose_config(override))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dictionary.patience=0"], r"dictionary\.patience = 0 must be >= 1"),
        (["dictionary.max_iters=0"], r"dictionary\.max_iters = 0 must be >= 1"),
        (["dictionary.epochs=-1"], r"dictionary\.epochs = -1 must be >= 1"),
        (["dictionary.time_budget=0"], r"dictionary\.time_budget = 0.* must be > 0"),
        (["dictionary.time_budget=nan"], r"dictionary\.time_budget = nan"),
        (["dictionary.tol=-0.1"], r"dictionary\.tol = -0\.1 must be >= 0"),
        (["dictionary.tol=nan"], r"dictionary\.tol = nan"),
        (["dictionary.duplicate_threshold=0"], r"dictionary\.duplicate_threshold = 0.* \(0, 1\]"),
        (["dictionary.duplicate_threshold=1.5"], r"dictionary\.duplicate_threshold = 1\.5.* \(0, 1\]"),
        (["harvest.context_length=1", "harvest.n_tokens=1000"], r"harvest\.context_length=1 must be at least 2"),
        (["harvest.outlier_norm_factor=0"], r"harvest\.outlier_norm_factor=0.* must be > 0"),
        (["harvest.heldout_fraction=0"], r"harvest\.heldout_fraction=0.*held-out"),
        (["harvest.heldout_fraction=0.0001", "harvest.n_tokens=1280"], r"harvest\.heldout_fraction=0\.0001.*no"),
        (["eval.autointerp.base_url=ftp://judge/v1"], r"eval\.autointerp\.base_url='ftp://judge/v1'.*http"),
    ],
)
def test_values_fail_before_any_work(overrides, message):
    """Values that would fail late (after the model loaded, after the first iteration) or silently (a held-out
    FVU of 0.0) fail in check_config, naming the key."""
    with pytest.raises(ValueError, match=message):
        check_config(compose_config(*overrides))


def _hf_folder(tmp_path, **config):
    import json

    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_a_local_model_is_sized_before_any_work(tmp_path):
    """model.path: the width and depth are read from its config.json, so k > d and a missing layer fail in the
    config check, not at the fit."""
    folder = _hf_folder(tmp_path, hidden_size=32, num_hidden_layers=2)
    local = [f"model.path={folder}", "model.layer=1", "dictionary.n_atoms=64"]
    check_config(compose_config(*local, "dictionary.coder.k=8"))
    with pytest.raises(ValueError, match=r"dictionary.*k = 40 exceeds the dimension d = 32"):
        check_config(compose_config(*local, "dictionary.coder.k=40"))
    with pytest.raises(ValueError, match=r"layer 5 does not exist.*2 layers"):
        check_config(compose_config(*local, "model.layer=5", "dictionary.coder.k=8"))
    with pytest.raises(ValueError, match=r"model\.path=.*config\.json does not parse"):
        (folder / "config.json").write_text("{")
        check_config(compose_config(*local))
