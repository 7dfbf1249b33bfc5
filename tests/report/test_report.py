"""The report: table with every metric (non-finite values shown as such), fit curve and SAEBench-style plots,
one combined table for a sweep. The evaluate folders here are hand-written in SAEBench's result layout (the
end-to-end path from real SAEBench output is covered by tests/stages/test_evaluate.py and
tests/stages/test_orchestrator.py).

One file (~500 lines): every test reads the same hand-written evaluate folders, built by the helpers at its
top."""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import OmegaConf


def _result(arch: str, width: int, metrics: dict) -> dict:
    return {"eval_type_id": "x", "eval_result_metrics": metrics, "sae_cfg_dict": {"architecture": arch, "d_sae": width}}


def _fake_eval_folder(root: Path, name: str, K: int, k: int, ce: float, kl: float) -> Path:
    folder = root / name
    res = folder / "eval_results"
    saes = [
        {
            "name": f"dbksvd_plain_K{K}_k{k}",
            "kind": "dictionary",
            "architecture": "dbksvd",
            "width": K,
            "k": k,
            "l0": k - 0.5,
            "fvu": 0.2,
            "dead_fraction": 0.01,
            "mean_max_abs_cos": 0.4,
            "history": [{"iteration": i, "fvu": 0.5 / (i + 1)} for i in range(5)],
        },
        {
            "name": f"topk_K{K}_k{k}",
            "kind": "topk",
            "architecture": "topk",
            "width": K,
            "k": k,
            "l0": float(k),
            "fvu": 0.25,
            "dead_fraction": 0.1,
            "mean_max_abs_cos": 0.3,
        },
    ]
    for s in saes:
        core = {
            "sparsity": {"l0": s["l0"], "l1": 1.0},
            "model_performance_preservation": {"ce_loss_score": ce if s["kind"] == "dictionary" else 0.8},
            "model_behavior_preservation": {"kl_div_score": kl},
        }
        (res / "core").mkdir(parents=True, exist_ok=True)
        (res / "core" / f"{s['name']}_custom_sae_eval_results.json").write_text(
            json.dumps(_result(s["architecture"], K, core))
        )
        (res / "sparse_probing").mkdir(parents=True, exist_ok=True)
        (res / "sparse_probing" / f"{s['name']}_custom_sae_eval_results.json").write_text(
            json.dumps(_result(s["architecture"], K, {"sae": {"sae_top_1_test_accuracy": 0.7}}))
        )
    (folder / "saes.json").write_text(json.dumps(saes))
    (folder / "skipped.json").write_text(json.dumps([{"what": "metric:autointerp", "reason": "no judge API key"}]))
    (folder / "failed.json").write_text("[]")
    (folder / "eval_info.json").write_text(
        json.dumps(
            {
                "model": {"name": "m", "n_params": 1e8, "hook": "h"},
                "sizes": {"core": {"n_eval_reconstruction_batches": 3}},
                "timings_s": {"core": 1.0},
                "total_eval_s": 1.0,
                "notes": [{"metric": "absorption", "low_confidence": True, "note": "small model"}],
            }
        )
    )
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
    from pipeline.report.markdown import write_report

    path = write_report([tmp_path / "missing"], tmp_path / "out")
    assert "No evaluated SAE" in path.read_text()


def test_fmt():
    from pipeline.report.markdown import fmt, width_label

    assert fmt(float("inf")) == "+inf" and fmt(float("-inf")) == "-inf" and fmt(float("nan")) == "nan"
    assert fmt(None) == "—" and fmt(0.5) == "0.5"
    assert width_label(4096) == "4k" and width_label(16384) == "16k" and width_label(65536) == "65k"


# ====================================================================================================
# The comparison tool: budget columns, sort order, How to read this, FVU vs wall time, explained variance,
# fit-position columns. Folders are hand-written in the evaluate stage's contract (saes.json descriptions with
# budget / curve) and SAEBench's result layout.
# ====================================================================================================
def _core_metrics(l0: float, ce: float, kl: float, ev: float | None = None, legacy: float | None = None) -> dict:
    rq = {"cossim": 0.9}
    if ev is not None:
        rq["explained_variance"] = ev
    if legacy is not None:
        rq["explained_variance_legacy"] = legacy
    return {
        "sparsity": {"l0": l0},
        "reconstruction_quality": rq,
        "model_performance_preservation": {"ce_loss_score": ce},
        "model_behavior_preservation": {"kl_div_score": kl},
    }


def _desc(
    name: str,
    kind: str,
    arch: str,
    width: int,
    k: int,
    *,
    budget: dict | None = None,
    curve: list | None = None,
    fvu: float = 0.2,
    **extra,
) -> dict:
    d = {
        "name": name,
        "kind": kind,
        "architecture": arch,
        "width": width,
        "k": k,
        "signed": False,
        "fvu": fvu,
        "l0": float(k),
        "dead_fraction": 0.0,
        "mean_max_abs_cos": 0.3,
        "heldout_rows": 9891,
        **extra,
    }
    if budget is not None:
        d["budget"] = budget
    if curve is not None:
        d["curve"] = curve
    return d


def _write_folder(
    folder: Path,
    descs: list[dict],
    *,
    saebench_arch: dict | None = None,
    ev: dict | None = None,
    legacy: dict | None = None,
    fit_positions: dict | None = None,
) -> Path:
    """saes.json + a core result per SAE (+ core_fit_positions results for the names in ``fit_positions``)."""
    res = folder / "eval_results"
    (res / "core").mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(descs):
        arch = (saebench_arch or {}).get(d["name"], d["architecture"])
        core = _core_metrics(d["l0"], 0.9 - 0.01 * i, 0.95, (ev or {}).get(d["name"]), (legacy or {}).get(d["name"]))
        result = {
            **_result(arch, d["width"], core),
            "eval_config": {"dataset": "local text", "exclude_special_tokens_from_reconstruction": False},
        }
        (res / "core" / f"{d['name']}_custom_sae_eval_results.json").write_text(json.dumps(result))
        if fit_positions and d["name"] in fit_positions:
            (res / "core_fit_positions").mkdir(parents=True, exist_ok=True)
            ce, kl = fit_positions[d["name"]]
            fp = _result(
                arch,
                d["width"],
                {
                    "model_performance_preservation": {"ce_loss_score": ce},
                    "model_behavior_preservation": {"kl_div_score": kl},
                },
            )
            (res / "core_fit_positions" / f"{d['name']}_custom_sae_eval_results.json").write_text(json.dumps(fp))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "saes.json").write_text(json.dumps(descs))
    return folder


def _curve(seconds: list[float], fvus: list[float]) -> list[dict]:
    return [{"seconds": s, "samples": 16384 * (i + 1), "fvu": f} for i, (s, f) in enumerate(zip(seconds, fvus))]


DICT_BUDGET = {
    "mode": "fit",
    "seconds": 300.2,
    "samples": 753664,
    "updates": 40,
    "device": "cpu",
    "factor": 1.0,
    "target_seconds": None,
    "target_samples": None,
}


def _comparison_descs(topk_device: str = "cpu") -> list[dict]:
    """Written out of order on purpose: the report sorts them."""
    eq = {"mode": "equal_time", "factor": 1.0, "target_seconds": 300.2, "target_samples": None}
    return [
        _desc(
            "topk_K2048_k32",
            "baseline",
            "topk",
            2048,
            32,
            fvu=0.13,
            budget={**eq, "seconds": 301.5, "samples": 753664, "steps": 736, "device": topk_device},
            curve=_curve([7.4, 150.0, 300.0], [0.42, 0.2, 0.15]),
        ),
        _desc(
            "batchtopk_K2048_k32",
            "baseline",
            "batchtopk",
            2048,
            32,
            fvu=0.12,
            budget={**eq, "seconds": 302.0, "samples": 700416, "steps": 684, "device": "cpu"},
            curve=_curve([8.0, 290.0], [0.5, 0.14]),
        ),
        _desc(
            "topk_K1024_k32",
            "baseline",
            "topk",
            1024,
            32,
            fvu=0.18,
            budget={**eq, "seconds": 300.9, "samples": 800000, "steps": 781, "device": "cpu"},
        ),
        _desc(
            "dbksvd_K2048_k32",
            "dictionary",
            "dbksvd",
            2048,
            32,
            fvu=0.11,
            budget=DICT_BUDGET,
            curve=_curve([10.0, 100.0, 300.0], [0.6, 0.2, 0.12]),
            heldout_positions_note="special tokens (412) and attention-sink outliers (37) left out",
            history=[{"iteration": i, "fvu": 0.5 / (i + 1), "seconds": 7.5 * i} for i in range(4)],
        ),
    ]


def _table(md: str) -> list[list[str]]:
    """The rows of the Metrics table as cell lists (header first)."""
    block = md.split("## Metrics", 1)[1].split("\n\n", 2)[1]
    return [
        [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        for line in block.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


def test_sorted_by_architecture_with_budget_columns(tmp_path):
    from pipeline.report.markdown import write_report

    folder = _write_folder(
        tmp_path / "evaluate-x", _comparison_descs(), saebench_arch={"batchtopk_K2048_k32": "jumprelu"}
    )
    md = write_report([folder], tmp_path / "out").read_text()
    table = _table(md)
    head = table[0]
    assert head[:10] == [
        "SAE",
        "architecture",
        "width",
        "k",
        "budget",
        "wall s",
        "samples",
        "steps/updates",
        "device",
        "L0 (held-out)",
    ]
    names = [r[0] for r in table[1:]]
    # dictionary first, then (architecture, width, k, name)
    assert names == ["`dbksvd_K2048_k32`", "`batchtopk_K2048_k32`", "`topk_K1024_k32`", "`topk_K2048_k32`"]
    rows = {r[0].strip("`"): dict(zip(head, r)) for r in table[1:]}
    assert rows["dbksvd_K2048_k32"]["budget"] == "fit"
    assert rows["dbksvd_K2048_k32"]["steps/updates"] == "40 updates"
    assert rows["dbksvd_K2048_k32"]["wall s"] == "300.2"
    assert rows["topk_K2048_k32"]["budget"] == "equal_time"
    assert rows["topk_K2048_k32"]["steps/updates"] == "736 steps"
    assert rows["topk_K2048_k32"]["samples"] == "753,664"
    assert rows["topk_K2048_k32"]["wall s"] == "301.5" and rows["topk_K2048_k32"]["device"] == "cpu"
    # the training architecture wins over SAEBench's inference form, which is noted
    assert rows["batchtopk_K2048_k32"]["architecture"] == "batchtopk"
    assert "trained as `batchtopk`; SAEBench's results record the inference form `jumprelu`" in md
    assert rows["topk_K2048_k32"]["1 − FVU (held-out)"] == "0.87"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["name"] for s in summary] == [n.strip("`") for n in names]
    top = next(s for s in summary if s["name"] == "topk_K2048_k32")
    assert top["budget"]["steps"] == 736 and top["wall s"] == 301.5 and top["steps/updates"] == "736 steps"
    assert top["device"] == "cpu" and top["budget mode"] == "equal_time"
    assert abs(top["1 − FVU (held-out)"] - 0.87) < 1e-12


def test_how_to_read_names_modes_and_warns_on_devices(tmp_path):
    from pipeline.report.markdown import write_report

    same = write_report([_write_folder(tmp_path / "a" / "evaluate-x", _comparison_descs())], tmp_path / "o1")
    md = same.read_text()
    how = md.split("## How to read this", 1)[1].split("## Metrics", 1)[0]
    assert md.index("## How to read this") < md.index("## Metrics")
    assert "`equal_time`: every baseline trained for the dictionary's measured fit wall time (target 300.2 s)" in how
    assert "`fit`: the dictionary's own schedule" in how
    assert "`equal_samples`" not in how and "`converged`" not in how
    assert "against 3 baseline SAEs" in how
    assert "devices differ" not in how and "Every recorded budget ran on `cpu`" in how
    assert "Not at matched L0" not in how  # every row is at its k
    assert "special tokens (412) and attention-sink outliers (37) left out" in how
    assert "(9,891 rows)" in how
    # a baseline on another device: warned, equal_time across devices is not a fair match
    other = write_report([_write_folder(tmp_path / "b" / "evaluate-x", _comparison_descs("cuda"))], tmp_path / "o2")
    how2 = other.read_text().split("## How to read this", 1)[1].split("## Metrics", 1)[0]
    assert "Warning: devices differ" in how2 and "cuda: `topk_K2048_k32`" in how2
    assert "`equal_time` budget across devices is not a fair match" in how2


def test_how_to_read_flags_rows_off_their_target_l0(tmp_path):
    from pipeline.report.markdown import write_report

    descs = _comparison_descs()
    descs[1]["l0"] = 49.46  # batchtopk: its threshold short of k = 32 after a short budget
    descs[2]["l0"] = 34.0  # within 10%: not flagged
    md = write_report([_write_folder(tmp_path / "a" / "evaluate-x", descs)], tmp_path / "o1").read_text()
    how = md.split("## How to read this", 1)[1].split("## Metrics", 1)[0]
    assert "**Not at matched L0**: `batchtopk_K2048_k32` (held-out L0 49.46 against k = 32)." in how
    assert "topk_K1024_k32` (held-out" not in how


def test_how_to_read_differing_budgets_factor_and_no_baseline(tmp_path):
    from pipeline.report.markdown import write_report

    descs = _comparison_descs()
    descs[1]["budget"] = {
        "mode": "equal_samples",
        "factor": 2.0,
        "target_samples": 1507328,
        "samples": 1507328,
        "steps": 1472,
        "seconds": 640.0,
        "device": "cpu",
    }
    md = write_report([_write_folder(tmp_path / "a" / "evaluate-x", descs)], tmp_path / "o1").read_text()
    assert "`equal_samples`: as many training samples as the dictionary's fit saw (target 1,507,328 samples) × 2" in md
    assert "Budgets differ between baseline rows" in md
    assert "| equal_samples ×2 |" in md
    only = write_report([_write_folder(tmp_path / "b" / "evaluate-x", [_comparison_descs()[-1]])], tmp_path / "o2")
    text = only.read_text()
    assert "No baseline" in text and "not a comparison" in text and "Compared" not in text
    assert "`equal_time`" not in text.split("## Metrics")[0]


def test_fvu_vs_time_plot_only_with_curves(tmp_path, monkeypatch):
    import matplotlib.axes

    from pipeline.report.markdown import write_report
    from pipeline.report.plots import FVU_TIME_PLOT_FILE

    calls = []
    orig_plot, orig_scatter = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.scatter

    def plot(self, *a, **kw):
        calls.append(("plot", self.get_title(), list(a[0]), list(a[1])))
        return orig_plot(self, *a, **kw)

    def scatter(self, *a, **kw):
        calls.append(("scatter", self.get_title(), list(a[0]), list(a[1])))
        return orig_scatter(self, *a, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", scatter)
    out = tmp_path / "out"
    md = write_report([_write_folder(tmp_path / "evaluate-x", _comparison_descs())], out).read_text()
    assert (out / FVU_TIME_PLOT_FILE).stat().st_size > 1000
    assert f"![FVU vs wall time]({FVU_TIME_PLOT_FILE})" in md
    assert "Held-out FVU against training wall time, every method on one log-log plot" in md
    # the title is set after drawing; the FVU-vs-time calls are the ones before the first titled call
    timed = [c for c in calls if c[1] == ""]
    lines = [c[2:] for c in timed if c[0] == "plot"]
    assert ([7.4, 150.0, 300.0], [0.42, 0.2, 0.15]) in [tuple(x) for x in lines]  # the topk curve, x = seconds
    assert ([10.0, 100.0, 300.0], [0.6, 0.2, 0.12]) in [tuple(x) for x in lines]
    marks = [tuple(c[2:]) for c in timed if c[0] == "scatter"]
    assert ([301.5], [0.13]) in marks and ([300.2], [0.11]) in marks  # held-out FVU at the budget's seconds
    # held-out curves win over training-batch curves, on a log time axis
    calls.clear()
    descs = _comparison_descs()
    descs[0]["heldout_curve"] = _curve([1.0, 30.0, 301.5], [0.9, 0.3, 0.13])
    write_report([_write_folder(tmp_path / "evaluate-h", descs)], tmp_path / "out-h")
    timed = [tuple(c[2:]) for c in calls if c[1] == "" and c[0] == "plot"]
    assert ([1.0, 30.0, 301.5], [0.9, 0.3, 0.13]) in timed and ([7.4, 150.0, 300.0], [0.42, 0.2, 0.15]) not in timed
    # old-format folder: no curves, no plot
    out2 = tmp_path / "out2"
    old = _fake_eval_folder(tmp_path / "exp", "evaluate-old", 64, 4, 0.9, 0.95)
    md2 = write_report([old], out2).read_text()
    assert not (out2 / FVU_TIME_PLOT_FILE).exists() and FVU_TIME_PLOT_FILE not in md2


def test_metric_vs_l0_joins_a_sweep(tmp_path, monkeypatch):
    import matplotlib.axes

    from pipeline.report.markdown import load_rows
    from pipeline.report.plots import plot_metric_vs_l0

    descs = [_desc(f"topk_K1024_k{k}", "baseline", "topk", 1024, k) for k in (64, 16, 32)]
    descs += [
        _desc("dbksvd_K1024_k16", "dictionary", "dbksvd", 1024, 16),
        _desc("topk_K2048_k16", "baseline", "topk", 2048, 16),
    ]
    rows = load_rows([_write_folder(tmp_path / "evaluate-x", descs)])
    lines = []
    orig = matplotlib.axes.Axes.plot
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "plot",
        lambda self, *a, **kw: (lines.append((list(a[0]), list(a[1]))), orig(self, *a, **kw))[1],
    )
    assert plot_metric_vs_l0(rows, "L0 (held-out)", tmp_path, "l0").exists()
    assert lines == [([16.0, 32.0, 64.0], [16.0, 32.0, 64.0])]  # one line: the topk 1024 sweep, sorted by L0


def test_explained_variance_note_and_fit_positions(tmp_path):
    from pipeline.report.markdown import write_report

    descs = _comparison_descs()
    ev = {d["name"]: 1.52 if d["kind"] == "dictionary" else 1.07 for d in descs}
    legacy = {d["name"]: 0.71 for d in descs}
    folder = _write_folder(
        tmp_path / "evaluate-x",
        descs,
        ev=ev,
        legacy=legacy,
        fit_positions={"dbksvd_K2048_k32": (0.97, 0.93), "topk_K2048_k32": (0.88, 0.9)},
    )
    md = write_report([folder], tmp_path / "out").read_text()
    table = _table(md)
    head = table[0]
    assert "expl. var. (SAEBench)" in head and "expl. var. legacy" in head and "1 − FVU (held-out)" in head
    assert "expl. var." not in [h for h in head if h not in ("expl. var. (SAEBench)", "expl. var. legacy")]
    rows = {r[0].strip("`"): dict(zip(head, r)) for r in table[1:]}
    assert rows["dbksvd_K2048_k32"]["expl. var. (SAEBench)"] == "1.52"
    assert rows["dbksvd_K2048_k32"]["1 − FVU (held-out)"] == "0.89"
    assert rows["dbksvd_K2048_k32"]["expl. var. legacy"] == "0.71"
    assert rows["dbksvd_K2048_k32"]["loss recovered (fit positions)"] == "0.97"
    assert rows["topk_K2048_k32"]["KL score (fit positions)"] == "0.9"
    assert rows["topk_K1024_k32"]["loss recovered (fit positions)"] == "—"
    assert "**Explained variance.**" in md and "(E‖x‖² − (mean_j E[x_j²])²)" in md
    assert "exceeds 1 for `dbksvd_K2048_k32` (1.52)" in md
    assert "`expl. var. legacy` (SAEBench's older formula)" in md
    how = md.split("## How to read this", 1)[1].split("## Metrics", 1)[0]
    assert (
        "`loss recovered (fit positions)`, `KL score (fit positions)`: SAEBench core with the SAE spliced in "
        "only at the positions the fit trains on" in how
    )
    assert "spliced in at every position" in how  # exclude_special_tokens_from_reconstruction = False
    assert (tmp_path / "out" / "core_fit_positions_vs_l0.png").exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary[0]["loss recovered (fit positions)"] == 0.97 and summary[0]["expl. var. (SAEBench)"] == 1.52
    # without the folder / SAEBench's explained variance: no fit-position columns, no note
    plain = write_report([_write_folder(tmp_path / "b" / "evaluate-x", _comparison_descs())], tmp_path / "o2")
    text = plain.read_text()
    assert "fit positions" not in text and "**Explained variance.**" not in text
    assert "1 − FVU (held-out)" in _table(text)[0]


def test_old_format_folder_still_renders(tmp_path):
    from pipeline.report.markdown import write_report

    old = _fake_eval_folder(tmp_path / "exp", "evaluate-old", 64, 4, 0.9, 0.95)
    md = write_report([old], tmp_path / "out").read_text()
    table = _table(md)
    head = table[0]
    assert [r[0] for r in table[1:]] == ["`dbksvd_plain_K64_k4`", "`topk_K64_k4`"]
    for r in table[1:]:
        cells = dict(zip(head, r))
        assert [cells[c] for c in ("budget", "wall s", "samples", "steps/updates", "device")] == ["—"] * 5
    assert "No budget recorded" in md and "`dbksvd_plain_K64_k4`, `topk_K64_k4`" in md
    assert (tmp_path / "out" / "fit_curve.png").exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary[0]["budget"] is None and summary[0]["wall s"] is None


def _quality_descs() -> list[dict]:
    """A dictionary (held-out FVU 0.2 after 100 s, 1.6 M samples) and three baselines: one that reaches it and
    flattened, one that never reaches it and stopped at its cap still improving, one without a held-out curve."""
    dictionary = _desc(
        "dbksvd_K2048_k32",
        "dictionary",
        "dbksvd",
        2048,
        32,
        fvu=0.2,
        budget={"mode": "fit", "seconds": 100.0, "samples": 1_600_000, "updates": 24, "device": "cpu"},
        heldout_curve=[
            {"seconds": 10.0, "samples": 100_000, "fvu": 0.4},
            {"seconds": 50.0, "samples": 800_000, "fvu": 0.22},
            {"seconds": 100.0, "samples": 1_600_000, "fvu": 0.2},
        ],
    )
    plateau = {"mode": "plateau", "factor": 1.0, "cap_samples": 2_097_152, "device": "cpu"}
    reached = _desc(
        "topk_K2048_k32",
        "baseline",
        "topk",
        2048,
        32,
        fvu=0.15,
        budget={
            **plateau,
            "seconds": 400.0,
            "samples": 2_000_000,
            "steps": 1953,
            "flattened": True,
            "stop_reason": "plateau",
        },
        heldout_curve=[
            {"seconds": 10.0, "samples": 50_000, "fvu": 0.5},
            {"seconds": 40.0, "samples": 200_000, "fvu": 0.3},
            {"seconds": 160.0, "samples": 800_000, "fvu": 0.1875},
            {"seconds": 400.0, "samples": 2_000_000, "fvu": 0.15},
        ],
    )
    capped = _desc(
        "batchtopk_K2048_k32",
        "baseline",
        "batchtopk",
        2048,
        32,
        fvu=0.25,
        budget={
            **plateau,
            "seconds": 90.0,
            "samples": 2_097_152,
            "steps": 2048,
            "flattened": False,
            "stop_reason": "cap_samples",
        },
        heldout_curve=[
            {"seconds": 9.0, "samples": 200_000, "fvu": 0.6},
            {"seconds": 90.0, "samples": 2_097_152, "fvu": 0.25},
        ],
    )
    bare = _desc("jumprelu_K2048_k32", "baseline", "jumprelu", 2048, 32, fvu=0.3, budget={**plateau})
    return [dictionary, reached, capped, bare]


def test_report_opens_with_time_to_quality(tmp_path):
    """The first section: per baseline its held-out FVU at the dictionary's fit time (log-time interpolation)
    and at its end, whether its curve flattened, what stopped it, and the time / samples it needed to reach the
    dictionary's held-out FVU; figures from curves that had not flattened say so."""
    from pipeline.report.markdown import write_report

    md = write_report([_write_folder(tmp_path / "evaluate-x", _quality_descs())], tmp_path / "out").read_text()
    first = md.split("\n## ", 2)[1]
    assert first.startswith("Time to quality")
    assert "held-out FVU **0.2** after 100.0 s of fitting and 1,600,000 samples coded" in first
    assert "improved by 9.09% over its last doubling of samples" in first  # 0.22 -> 0.2 from 800k to 1.6M
    rows = {
        line.split("|")[1].strip().strip("`"): [c.strip() for c in line.split("|")[2:-1]]
        for line in first.splitlines()
        if line.startswith("| `")
    }
    # topk: at 100 s, between 40 s (0.3) and 160 s (0.1875) in log time: 0.3 - 0.1125 * log(2.5) / log(4)
    import math

    at_fit = 0.3 - 0.1125 * math.log(2.5) / math.log(4)
    assert rows["topk_K2048_k32"][1] == f"{at_fit:.4g}"
    assert rows["topk_K2048_k32"][2] == "0.15" and rows["topk_K2048_k32"][4:6] == ["yes", "plateau"]
    # it reaches 0.2 between 40 s (0.3) and 160 s (0.1875): 8/9 of the way in log time
    reach_s = math.exp(math.log(40) + (0.1 / 0.1125) * math.log(4))
    reach_n = math.exp(math.log(200_000) + (0.1 / 0.1125) * math.log(4))
    assert rows["topk_K2048_k32"][6] == f"{reach_s:.1f} s"
    assert rows["topk_K2048_k32"][7] == f"{round(reach_n):,}"
    capped = rows["batchtopk_K2048_k32"]
    assert capped[1] == "— (ended at 90.0 s)" and capped[2] == "0.25 (not flattened)"
    assert capped[4:6] == ["no", "sample cap"]
    assert capped[6] == capped[7] == "not reached by 90.0 s / 2,097,152 samples"
    bare = rows["jumprelu_K2048_k32"]
    assert bare[1] == "—" and bare[2] == "0.3 (not flattened)" and bare[4] == "not recorded" and bare[6] == "—"
    assert "not its result" in first and "at full lr" in first  # the fit-time reading is not an equal-time run
    assert "`plateau`: each baseline trained until its held-out curve flattened" in md and "cap 2,097,152" in md


def test_width_note_follows_the_signed_dictionarys_export_form():
    from pipeline.report.notes import _width_lines
    from pipeline.report.rows import Row

    def row(export: str | None) -> Row:
        described = {"name": "d", "kind": "dictionary", "architecture": "dbksvd", "signed": True, "width": 2048}
        return Row("d", Path("."), {**described, **({"export": export} if export else {})})

    assert "exported ± split" in " ".join(_width_lines([row("split")]))
    assert "exported ± split" in " ".join(_width_lines([row(None)]))  # folders written before the key existed
    signed = " ".join(_width_lines([row("signed")]))
    assert "exported ± split" not in signed and "signed codes" in signed and "width K" in signed
