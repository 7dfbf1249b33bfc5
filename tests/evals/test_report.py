"""The report: table with every metric (non-finite values shown as such), fit curve and SAEBench-style plots,
one combined table for a sweep. The evaluate folders here are hand-written in SAEBench's result layout (the
end-to-end path from real SAEBench output is covered by tests/stages/test_evaluate.py and
tests/stages/test_orchestrator.py)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf


def _result(arch: str, width: int, metrics: dict) -> dict:
    return {"eval_type_id": "x", "eval_result_metrics": metrics,
            "sae_cfg_dict": {"architecture": arch, "d_sae": width}}


def _fake_eval_folder(root: Path, name: str, K: int, k: int, ce: float, kl: float) -> Path:
    folder = root / name
    res = folder / "eval_results"
    saes = [{"name": f"dbksvd_plain_K{K}_k{k}", "kind": "dictionary", "architecture": "dbksvd", "width": K, "k": k,
             "l0": k - 0.5, "fvu": 0.2, "dead_fraction": 0.01, "mean_max_abs_cos": 0.4,
             "history": [{"iteration": i, "fvu": 0.5 / (i + 1)} for i in range(5)]},
            {"name": f"topk_K{K}_k{k}", "kind": "topk", "architecture": "topk", "width": K, "k": k,
             "l0": float(k), "fvu": 0.25, "dead_fraction": 0.1, "mean_max_abs_cos": 0.3}]
    for s in saes:
        core = {"sparsity": {"l0": s["l0"], "l1": 1.0},
                "model_performance_preservation": {"ce_loss_score": ce if s["kind"] == "dictionary" else 0.8},
                "model_behavior_preservation": {"kl_div_score": kl}}
        (res / "core").mkdir(parents=True, exist_ok=True)
        (res / "core" / f"{s['name']}_custom_sae_eval_results.json").write_text(
            json.dumps(_result(s["architecture"], K, core)))
        (res / "sparse_probing").mkdir(parents=True, exist_ok=True)
        (res / "sparse_probing" / f"{s['name']}_custom_sae_eval_results.json").write_text(
            json.dumps(_result(s["architecture"], K, {"sae": {"sae_top_1_test_accuracy": 0.7}})))
    (folder / "saes.json").write_text(json.dumps(saes))
    (folder / "skipped.json").write_text(json.dumps([{"what": "metric:autointerp", "reason": "no judge API key"}]))
    (folder / "failed.json").write_text("[]")
    (folder / "eval_info.json").write_text(json.dumps({"model": {"name": "m", "n_params": 1e8, "hook": "h"},
                                                       "sizes": {"core": {"n_eval_reconstruction_batches": 3}},
                                                       "timings_s": {"core": 1.0}, "total_eval_s": 1.0,
                                                       "notes": [{"metric": "absorption", "low_confidence": True,
                                                                  "note": "small model"}]}))
    return folder


def test_report_table_plots_and_infinity(tmp_path):
    from stages import report

    # SAEBench writes non-finite floats as JSON's Infinity / -Infinity literals
    f1 = _fake_eval_folder(tmp_path / "exp", "evaluate-a", 64, 4, float("-inf"), float("inf"))
    _fake_eval_folder(tmp_path / "exp", "evaluate-b", 128, 8, 0.9, 0.95)
    assert "-Infinity" in (f1 / "eval_results/core/dbksvd_plain_K64_k4_custom_sae_eval_results.json").read_text()
    cfg = OmegaConf.create({"experiment_name": "exp", "output_root": str(tmp_path), "report": {}})
    folder = report.run(cfg)  # the experiment's report folder, <output_root>/exp/report-<hash>
    md = (folder / "report.md").read_text()
    # one combined table for the sweep: both folders, both SAEs each
    for name in ("dbksvd_plain_K64_k4", "topk_K64_k4", "dbksvd_plain_K128_k8", "topk_K128_k8"):
        assert f"`{name}`" in md
    assert "-inf" in md and "+inf" in md
    assert "no judge API key" in md and "low confidence" in md
    assert "n_eval_reconstruction_batches" in md and "```yaml" in md
    assert (folder / "fit_curve.png").stat().st_size > 1000
    assert (folder / "core_vs_l0.png").stat().st_size > 1000
    assert (folder / "sparse_probing_vs_l0.png").exists()
    assert "![loss recovered vs L0](core_vs_l0.png)" in md
    summary = json.loads((folder / "summary.json").read_text())
    assert len(summary) == 4
    assert (folder / "DONE.json").exists()


def test_report_without_evaluations(tmp_path):
    from pipeline.evals.report import write_report

    path = write_report([tmp_path / "missing"], tmp_path / "out")
    assert "No evaluated SAE" in path.read_text()


def test_fmt():
    from pipeline.evals.report import fmt, width_label

    assert fmt(float("inf")) == "+inf" and fmt(float("-inf")) == "-inf" and fmt(float("nan")) == "nan"
    assert fmt(None) == "—" and fmt(0.5) == "0.5"
    assert width_label(4096) == "4k" and width_label(16384) == "16k" and width_label(65536) == "65k"
