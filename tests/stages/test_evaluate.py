"""The evaluate stage on a tiny local model: SAEBench's own code end to end (core, sparse probing, SCR, TPP,
absorption; autointerp with a stubbed judge), skipped metrics with their reasons, kept results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SAEBENCH_TINY_RUN_WARNINGS, run_tiny_evaluate, tiny_eval_config

pytestmark = SAEBENCH_TINY_RUN_WARNINGS


def _run(inputs, out, metrics, **kw):
    cfg = tiny_eval_config(inputs, out, metrics)
    for k, v in kw.items():
        cfg.eval[k] = v
    return run_tiny_evaluate(inputs, cfg, out), cfg


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


@pytest.fixture(scope="module")
def evaluated(eval_inputs, tmp_path_factory, monkeypatch_module):
    """One run of every offline metric (autointerp with a stubbed judge: test-only). Returns the stage folder,
    the config and the files of SAEBench's own absorption folder (inside the installed package) before the run."""
    import sae_bench.evals.absorption.common as absorption_common
    import sae_bench.evals.autointerp.main as ai

    package_files = _files_under(absorption_common.RESULTS_DIR)

    def stub_judge(self, messages, max_tokens, n_completions=1):  # STUB: no LLM judge in tests
        if "Here is the explanation" in messages[-1]["content"]:
            return ["1, 2"], "stubbed judge"
        return ["This latent fires on words (stubbed judge)."], "stubbed judge"

    monkeypatch_module.setattr(ai.AutoInterp, "get_api_response", stub_judge)
    monkeypatch_module.setenv("OPENAI_API_KEY", "stub-key-for-tests")
    out = tmp_path_factory.mktemp("evaluate")
    folder, cfg = _run(
        eval_inputs, out, ["core", "sparse_probing", "scr", "tpp", "absorption", "autointerp", "ravel", "unlearning"]
    )
    return folder, cfg, package_files


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["core", "sparse_probing", "scr", "tpp", "absorption", "autointerp"])
def test_saebench_metric_json(evaluated, metric):
    folder, *_ = evaluated
    assert json.loads((folder / "failed.json").read_text()) == []
    for name in ("dbksvd_plain_K64_k4", "topk_K64_k4"):
        path = folder / "eval_results" / metric / f"{name}_custom_sae_eval_results.json"
        assert path.exists(), f"{metric}: no result for {name}"
        res = json.loads(path.read_text())
        assert res["eval_result_metrics"], metric
        assert res["sae_cfg_dict"]["architecture"] == ("dbksvd" if name.startswith("dbksvd") else "topk")
    if metric == "core":
        res = json.loads((folder / "eval_results/core/dbksvd_plain_K64_k4_custom_sae_eval_results.json").read_text())
        assert 0 < res["eval_result_metrics"]["sparsity"]["l0"] <= 4 + 1e-6


@pytest.mark.slow
def test_skipped_carry_reasons(evaluated):
    folder, *_ = evaluated
    skipped = {s["what"]: s["reason"] for s in json.loads((folder / "skipped.json").read_text())}
    assert "RAVEL supports only" in skipped["metric:ravel"]
    assert "instruction-tuned" in skipped["metric:unlearning"]
    info = json.loads((folder / "eval_info.json").read_text())
    assert info["sizes"]["sparse_probing"]["probe_train_set_size"] == 40
    assert info["sizes"]["absorption"]["subsampled_vocab"] <= 120
    assert any(n.get("low_confidence") for n in info["notes"])
    assert (folder / "DONE.json").exists()


@pytest.mark.slow
def test_absorption_writes_only_inside_the_run_folder(evaluated, eval_inputs):
    """SAEBench's probes, experiment tables and result files land in the run folder; nothing new appears in
    the installed package's own absorption folder."""
    import sae_bench.evals.absorption.common as absorption_common

    folder, _, package_files = evaluated
    assert _files_under(absorption_common.RESULTS_DIR) == package_files
    probes = folder / "artifacts" / "absorption" / "probes"
    assert probes.is_dir()
    model_name = eval_inputs["model"].cfg.model_name
    assert (probes / model_name / "layer_1" / "probe.pth").is_file()
    assert list((folder / "artifacts" / "absorption").glob("k_sparse_probing/**/*.parquet"))
    results = sorted(p.name for p in (folder / "eval_results" / "absorption").iterdir())
    assert results == ["dbksvd_plain_K64_k4_custom_sae_eval_results.json", "topk_K64_k4_custom_sae_eval_results.json"]


@pytest.mark.slow
def test_existing_results_kept_and_autointerp_skipped_without_key(evaluated, eval_inputs, monkeypatch):
    folder, *_ = evaluated
    core = folder / "eval_results/core/dbksvd_plain_K64_k4_custom_sae_eval_results.json"
    before = core.stat().st_mtime_ns
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    from stages import evaluate

    cfg = tiny_eval_config(eval_inputs, folder.parent, ["core", "autointerp"])
    evaluate.run(
        cfg,
        run_dir=folder,
        fit_dir=eval_inputs["fit"],
        baselines_dir=eval_inputs["baselines"],
        store_dir=eval_inputs["store"],
        model=eval_inputs["model"],
    )
    assert core.stat().st_mtime_ns == before
    skipped = {s["what"]: s["reason"] for s in json.loads((folder / "skipped.json").read_text())}
    assert "no judge: autointerp asks an LLM" in skipped["metric:autointerp"]


@pytest.mark.slow
def test_saes_described(evaluated):
    folder, *_ = evaluated
    saes = {s["name"]: s for s in json.loads((folder / "saes.json").read_text())}
    d = saes["dbksvd_plain_K64_k4"]
    assert d["width"] == 64 and not d["signed"] and 0 <= d["fvu"] and d["l0"] <= 4
    assert 0 <= d["mean_max_abs_cos"] <= 1 and 0 <= d["dead_fraction"] <= 1
    assert (folder / "sae_lens" / "dbksvd_plain_K64_k4" / "cfg.json").exists()


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"metrics": ["core", "nonsense"]}, "nonsense"),
        ({"sparse_probing": {"config": {"bogus": 1}}}, r"eval\.sparse_probing\.config\.bogus"),
        ({"bogus": 1}, r"eval\.bogus"),
    ],
)
def test_bad_eval_config_fails_before_any_work(eval_inputs, tmp_path, bad, match):
    from omegaconf import OmegaConf

    from stages import evaluate

    cfg = tiny_eval_config(eval_inputs, tmp_path, ["core"])
    cfg.eval = OmegaConf.merge(cfg.eval, bad)
    with pytest.raises(ValueError, match=match):
        evaluate.run(
            cfg,
            run_dir=tmp_path / "e",
            fit_dir=eval_inputs["fit"],
            baselines_dir=eval_inputs["baselines"],
            store_dir=eval_inputs["store"],
            model=eval_inputs["model"],
        )
    assert not (tmp_path / "e").exists()


def test_subsample_keeps_every_letter():
    from pipeline.evals.metrics.absorption import subsample_alpha_vocab

    vocab = [f"{c}{i}x" for c in "abcdefghijklmnopqrstuvwxyz" for i in range(50)]
    vocab = [w.replace("0", "o").replace("1", "l") for w in vocab]
    sub = subsample_alpha_vocab(vocab, 100, 3, seed=1)
    assert len(sub) == 100
    assert {w[0] for w in sub} == set("abcdefghijklmnopqrstuvwxyz")
    assert subsample_alpha_vocab(vocab, None, 3) == vocab


@pytest.mark.slow
def test_autograd_mode_restored(evaluated):
    """SAEBench's SCR/TPP switch autograd off globally; the stage gives the caller its mode back."""
    import torch

    assert torch.is_grad_enabled()


def test_unfinished_fit_stage_is_named(eval_inputs, tmp_path):
    from stages import evaluate

    cfg = tiny_eval_config(eval_inputs, tmp_path, ["core"])
    with pytest.raises(FileNotFoundError, match="stage=fit"):
        evaluate.run(cfg, store_dir=eval_inputs["store"], model=eval_inputs["model"])
    assert not list(tmp_path.glob("tiny/evaluate-*"))
