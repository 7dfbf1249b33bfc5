"""The paper presets end to end on toy models of their architectures (Gemma-2, GPT-NeoX), hub unreachable.

Each preset runs through the orchestrator scaled down by ``conf/experiment/toy_paper.yaml``
(:func:`tests.toy_models.toy_paper_overrides`: ``'experiment=[<preset>,toy_paper]' model.path=<toy folder>``, as
the README shows): the preset's model node (its name and hook layer, the weights from ``model.path``),
``dictionary=reference``, its baselines (batchtopk, matryoshka_batchtopk), then harvest, fit, baselines, evaluate
(every metric of ``eval=paper``; RAVEL from local files, as ``tests/evals/test_ravel_local.py`` runs it),
dashboards and report. A random-weight toy answers no RAVEL prompt right, autointerp has no judge offline and
unlearning needs an instruction-tuned model: each is skipped with its reason, asserted here.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import sae_lens
import torch
from omegaconf import OmegaConf

import stages.orchestrator as orchestrator
from pipeline.core.dictionary import Dictionary
from pipeline.data.models import load_model
from pipeline.data.store import ActivationStore
from pipeline.runs.layout import DONE_MARKER, STAGES, STORE_DIRNAME
from tests.conftest import SAEBENCH_TINY_RUN_WARNINGS, compose_config
from tests.evals.test_ravel_local import SELECTION, write_cities
from tests.toy_models import PAPER_PRESETS, TOY_SLIDING_WINDOW, TOY_WIDTH, preset_layer, toy_paper_overrides

pytestmark = [pytest.mark.slow, *SAEBENCH_TINY_RUN_WARNINGS]

#: Metrics SAEBench runs on the toys offline (a result file per SAE).
RUN_OFFLINE = ("core", "absorption", "scr", "sparse_probing", "tpp")
#: RAVEL on local prompts: every entity and pair the city data set has (12 cities, two templates each).
RAVEL_SIZES = ("eval.ravel.config.top_n_entities=12", "eval.ravel.config.num_pairs_per_attribute=12")


@pytest.fixture(scope="module", params=sorted(PAPER_PRESETS))
def toy_run(request, toy_paper_dirs, tmp_path_factory) -> dict[str, Any]:
    """One pipeline run of a paper preset on its toy model; its config, stage folders and seconds."""
    import huggingface_hub.constants

    preset = request.param
    root = tmp_path_factory.mktemp(f"runs_{preset}")
    ravel = write_cities(root / "ravel_data")
    selection = "{" + ",".join(f"{k}:[{','.join(v)}]" for k, v in SELECTION.items()) + "}"
    cfg = compose_config(
        *toy_paper_overrides(preset, toy_paper_dirs[preset]),
        f"output_root={root / 'runs'}",
        f"eval.ravel.data_dir={ravel}",
        f"+eval.ravel.config.entity_attribute_selection={selection}",
        *RAVEL_SIZES,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.delenv("OPENAI_API_KEY", raising=False)
        t0 = time.perf_counter()
        folders = orchestrator.run_pipeline(cfg)
        seconds = time.perf_counter() - t0
    print(f"{preset} on its toy model, every stage: {seconds:.1f} s")
    return {"preset": preset, "cfg": cfg, "folders": folders, "model_dir": toy_paper_dirs[preset]}


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def test_the_preset_is_scaled_down_not_changed(toy_run):
    """The preset's model node, algorithm, baselines and metrics stay; every stage finishes."""
    cfg, preset = toy_run["cfg"], toy_run["preset"]
    paper = compose_config(f"experiment={preset}")
    assert (cfg.model.name, cfg.model.layer) == (paper.model.name, paper.model.layer)
    assert cfg.model.path == str(toy_run["model_dir"])
    assert sorted(cfg.baseline) == sorted(paper.baseline) == ["batchtopk", "matryoshka_batchtopk"]
    assert list(cfg.eval.metrics) == list(paper.eval.metrics)
    for key in ("epochs", "sample_order", "matryoshka_loop", "init", "center"):
        assert cfg.dictionary[key] == paper.dictionary[key], key
    coder, paper_coder = (OmegaConf.to_container(c.dictionary.coder) for c in (cfg, paper))
    assert {**coder, "k": None} == {**paper_coder, "k": None}  # the reference's signed MP, its rules; a smaller k
    assert cfg.harvest.context_length == paper.harvest.context_length > TOY_SLIDING_WINDOW
    assert list(toy_run["folders"]) == list(STAGES)
    for folder in toy_run["folders"].values():
        assert (folder / DONE_MARKER).is_file()


def test_the_harvest_stores_the_presets_hook_as_the_model_computes_it(toy_run):
    """The store holds ``blocks.<preset layer>.hook_resid_post`` of the architecture the folder declares, equal to
    the loaded model's activations at the kept positions; BOS positions (the attention sinks of the real models)
    are left out as special tokens, never reach the outlier rule (off in the paper presets) and are never stored."""
    cfg, preset = toy_run["cfg"], toy_run["preset"]
    hook = f"blocks.{preset_layer(preset)}.hook_resid_post"
    manifest = _json(toy_run["folders"]["harvest"] / STORE_DIRNAME / "manifest.json")
    assert manifest["model"]["name"] == cfg.model.name and manifest["model"]["path"] == str(toy_run["model_dir"])
    assert list(manifest["hooks"]) == [hook] and manifest["hooks"][hook]["d"] == TOY_WIDTH
    assert manifest["prepend_bos"] and manifest["bos_token_id"] in manifest["masking"]["masked_token_ids"]
    assert manifest["masking"]["outlier_norm_factor"] is None
    counts = manifest["hooks"][hook]["counts"]
    assert counts["masked_outlier"] == 0 and counts["masked_special"] >= manifest["n_contexts"]

    model = load_model(cfg.model.name, path=cfg.model.path)
    assert model.cfg.original_architecture == PAPER_PRESETS[preset]
    store = ActivationStore(toy_run["folders"]["harvest"] / STORE_DIRNAME)
    rows, tokens = store.read_with_tokens(store.shards("train")[0])
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens.token_ids.long(), names_filter=[hook])
    acts = cache[hook].reshape(-1, TOY_WIDTH)
    torch.testing.assert_close(rows.float(), acts[tokens.positions], atol=1e-4, rtol=1e-4)
    assert not bool((tokens.positions % cfg.harvest.context_length == 0).any())  # BOS never stored
    bos_norm = cache[hook][:, 0].norm(dim=-1).median() / rows.float().norm(dim=-1).median()
    print(f"{preset}: BOS residual norm / median stored norm at {hook}: {float(bos_norm):.2f}")


def test_the_fit_and_the_presets_baselines(toy_run):
    cfg, folders = toy_run["cfg"], toy_run["folders"]
    d = Dictionary.load(folders["fit"] / "dictionary")
    assert d.n_atoms == cfg.dictionary.n_atoms and d.signed  # signed codes, as the reference
    assert 0 < _json(folders["fit"] / "metrics.json")["dictionary"]["heldout_fvu"] < 1
    summary = _json(folders["baselines"] / "baselines.json")
    assert sorted(summary) == ["batchtopk", "matryoshka_batchtopk"]
    for name in summary:
        assert sae_lens.SAE.load_from_disk(str(folders["baselines"] / name)).cfg.d_in == TOY_WIDTH
    widths = _json(folders["baselines"] / "matryoshka_batchtopk" / "record.json")["spec"]["matryoshka_widths"]
    assert widths == list(cfg.baseline.matryoshka_batchtopk.matryoshka_widths) and len(widths) > 1  # nested levels


def test_every_offline_metric_runs_and_the_others_say_why_not(toy_run):
    cfg, folder = toy_run["cfg"], toy_run["folders"]["evaluate"]
    assert _json(folder / "failed.json") == []
    names = [s["name"] for s in _json(folder / "saes.json")]
    assert len(names) == 3  # the dictionary and the two baselines
    for metric in RUN_OFFLINE:
        for name in names:
            assert (folder / "eval_results" / metric / f"{name}_custom_sae_eval_results.json").is_file(), metric
    skipped = _json(folder / "skipped.json")
    reasons = {s["what"]: s["reason"] for s in skipped if "sae" not in s}
    assert set(reasons) == {"metric:autointerp", "metric:unlearning"}
    assert "no judge" in reasons["metric:autointerp"]
    assert "instruction-tuned" in reasons["metric:unlearning"] and repr(cfg.model.name) in reasons["metric:unlearning"]
    # RAVEL ran SAEBench on the toy's HF folder: it answered no prompt right, so nothing could be paired
    ravel = [s for s in skipped if s["what"] == "metric:ravel"]
    assert sorted(s["sae"] for s in ravel) == sorted(names)
    for s in ravel:
        assert "cannot pair the prompts the model answered right" in s["reason"]
        assert re.search(r"answered \{'Country': 0, 'Continent': 0\} prompts right", s["reason"]), s["reason"]
    sizes = _json(folder / "eval_info.json")["sizes"]["ravel"]
    assert sizes["model"] == f"local {cfg.model.path}" and sizes["not_scored"]
    info = _json(folder / "eval_info.json")
    rule = info["sizes"]["core"]["fit_positions"][names[0]]["rule_text"]
    assert "no outlier-norm rule" in rule  # core leaves out what the harvest left out: BOS and special tokens


def test_dashboards_and_report(toy_run):
    cfg, folders = toy_run["cfg"], toy_run["folders"]
    dashboards = _json(folders["dashboards"] / "dashboards.json")
    assert dashboards["skipped"] == [] and len(dashboards["saes"]) == 3
    assert all(s["drawn"] > 0 for s in dashboards["saes"])
    report = (folders["report"] / "report.md").read_text()
    assert f"model `{cfg.model.name}`" in report and f"blocks.{cfg.model.layer}.hook_resid_post" in report
    assert "metric:unlearning" in report and "metric:autointerp" in report
