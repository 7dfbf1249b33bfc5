"""The evaluate stage on a tiny local model: SAEBench's own code end to end (core, sparse probing, SCR, TPP,
absorption; autointerp with a stubbed judge), skipped metrics with their reasons, kept results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_eval_config

pytestmark = pytest.mark.filterwarnings("ignore")


def _run(inputs, out, metrics, **kw):
    from stages import evaluate

    cfg = tiny_eval_config(inputs, out, metrics)
    for k, v in kw.items():
        cfg.eval[k] = v
    return evaluate.run(cfg, run_dir=out / "evaluate", fit_dir=inputs["fit"], store_dir=inputs["store"],
                        model=inputs["model"]), cfg


@pytest.fixture(scope="module")
def evaluated(eval_inputs, tmp_path_factory, monkeypatch_module):
    """One run of every offline metric (autointerp with a stubbed judge: test-only)."""
    import sae_bench.evals.autointerp.main as ai

    def stub_judge(self, messages, max_tokens, n_completions=1):  # STUB: no LLM judge in tests
        if "Here is the explanation" in messages[-1]["content"]:
            return ["1, 2"], "stubbed judge"
        return ["This latent fires on words (stubbed judge)."], "stubbed judge"

    monkeypatch_module.setattr(ai.AutoInterp, "get_api_response", stub_judge)
    monkeypatch_module.setenv("OPENAI_API_KEY", "stub-key-for-tests")
    out = tmp_path_factory.mktemp("evaluate")
    folder, cfg = _run(eval_inputs, out, ["core", "sparse_probing", "scr", "tpp", "absorption", "autointerp",
                                          "ravel", "unlearning"])
    return folder, cfg


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("metric", ["core", "sparse_probing", "scr", "tpp", "absorption", "autointerp"])
def test_saebench_metric_json(evaluated, metric):
    folder, _ = evaluated
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


def test_skipped_carry_reasons(evaluated):
    folder, _ = evaluated
    skipped = {s["what"]: s["reason"] for s in json.loads((folder / "skipped.json").read_text())}
    assert "RAVEL supports only" in skipped["metric:ravel"]
    assert "instruction-tuned" in skipped["metric:unlearning"]
    info = json.loads((folder / "eval_info.json").read_text())
    assert info["sizes"]["sparse_probing"]["probe_train_set_size"] == 40
    assert info["sizes"]["absorption"]["subsampled_vocab"] <= 120
    assert any(n.get("low_confidence") for n in info["notes"])
    assert (folder / "DONE.json").exists()
    # absorption wrote inside the run folder, nothing into the installed package
    import sae_bench.evals.absorption.common as c

    assert not (c.RESULTS_DIR / "probes").exists() or not any((c.RESULTS_DIR / "probes").rglob("*tiny*"))
    assert (folder / "artifacts" / "absorption" / "probes").exists()


def test_existing_results_kept_and_autointerp_skipped_without_key(evaluated, eval_inputs, monkeypatch):
    folder, _ = evaluated
    core = folder / "eval_results/core/dbksvd_plain_K64_k4_custom_sae_eval_results.json"
    before = core.stat().st_mtime_ns
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    from stages import evaluate

    cfg = tiny_eval_config(eval_inputs, folder.parent, ["core", "autointerp"])
    evaluate.run(cfg, run_dir=folder, fit_dir=eval_inputs["fit"], store_dir=eval_inputs["store"],
                 model=eval_inputs["model"])
    assert core.stat().st_mtime_ns == before
    skipped = {s["what"]: s["reason"] for s in json.loads((folder / "skipped.json").read_text())}
    assert "no judge API key" in skipped["metric:autointerp"]


def test_saes_described(evaluated):
    folder, _ = evaluated
    saes = {s["name"]: s for s in json.loads((folder / "saes.json").read_text())}
    d = saes["dbksvd_plain_K64_k4"]
    assert d["width"] == 64 and not d["signed"] and 0 <= d["fvu"] and d["l0"] <= 4
    assert 0 <= d["mean_max_abs_cos"] <= 1 and 0 <= d["dead_fraction"] <= 1
    assert (folder / "sae_lens" / "dbksvd_plain_K64_k4" / "cfg.json").exists()


def test_bad_eval_config_fails_fast(eval_inputs, tmp_path):
    from stages import evaluate

    cfg = tiny_eval_config(eval_inputs, tmp_path, ["core", "nonsense"])
    with pytest.raises(ValueError, match="nonsense"):
        evaluate.run(cfg, run_dir=tmp_path / "e", fit_dir=eval_inputs["fit"], store_dir=eval_inputs["store"],
                     model=eval_inputs["model"])
    cfg = tiny_eval_config(eval_inputs, tmp_path, ["sparse_probing"])
    cfg.eval.sparse_probing.config.bogus = 1
    with pytest.raises(ValueError, match="bogus"):
        evaluate.eval_settings(cfg) and evaluate._metric_config(
            __import__("sae_bench.evals.sparse_probing.eval_config", fromlist=["x"]).SparseProbingEvalConfig,
            dict(cfg.eval.sparse_probing), "sparse_probing")


def test_subsample_keeps_every_letter():
    from pipeline.evals.saebench import subsample_alpha_vocab

    vocab = [f"{c}{i}x" for c in "abcdefghijklmnopqrstuvwxyz" for i in range(50)]
    vocab = [w.replace("0", "o").replace("1", "l") for w in vocab]
    sub = subsample_alpha_vocab(vocab, 100, 3, seed=1)
    assert len(sub) == 100
    assert {w[0] for w in sub} == set("abcdefghijklmnopqrstuvwxyz")
    assert subsample_alpha_vocab(vocab, None, 3) == vocab
