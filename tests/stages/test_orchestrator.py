"""End to end through the orchestrator on the `smoke` preset: every stage, skipping, re-running, resuming."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sae_lens
import torch

import stages.orchestrator as orchestrator
from pipeline.core.dictionary import Dictionary
from pipeline.core.learner import fit_dictionary
from pipeline.data.store import ActivationStore
from pipeline.runs.config import section
from pipeline.runs.layout import DONE_MARKER, STAGES, STORE_DIRNAME, stage_dir
from tests.conftest import REPO, compose_config

pytestmark = pytest.mark.slow


def _cfg(root, *overrides):
    return compose_config("experiment=smoke", f"output_root={root}", *overrides)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset end to end, with wandb tracking on, offline, everything it writes under the run root."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("CACHE", "CONFIG", "DATA", "ARTIFACT"):
            mp.setenv(f"WANDB_{name}_DIR", str(root / f"wandb_{name.lower()}"))
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("WANDB_API_KEY", raising=False)
        tracked = _cfg(root, "wandb.enabled=true", "wandb.mode=offline", f"wandb.dir={root / 'wandb_dir'}")
        folders = orchestrator.run_pipeline(tracked)
    return _cfg(root), folders


def _record_calls(monkeypatch):
    calls = []
    real = orchestrator.stage_runner

    def runner(stage):
        calls.append(stage)
        return real(stage)

    monkeypatch.setattr(orchestrator, "stage_runner", runner)
    return calls


def test_every_stage_produces_its_artefacts(smoke):
    cfg, folders = smoke
    assert list(folders) == list(STAGES)
    for stage, folder in folders.items():
        assert folder == stage_dir(cfg, stage)
        assert (folder / DONE_MARKER).is_file() and (folder / "config.yaml").is_file()
    manifest = json.loads((folders["harvest"] / "store" / "manifest.json").read_text())
    assert manifest["complete"]
    D = Dictionary.load(folders["fit"] / "dictionary")
    assert D.n_atoms == 256 and len(D.history) == 4
    metrics = json.loads((folders["fit"] / "metrics.json").read_text())
    assert 0 < metrics["dictionary"]["heldout_fvu"] < 1
    for name, inference_class in (("topk", "TopKSAE"), ("batchtopk", "JumpReLUSAE")):  # plain sae-lens folders
        assert type(sae_lens.SAE.load_from_disk(str(folders["baselines"] / name))).__name__ == inference_class
    assert len(list((folders["evaluate"] / "eval_results" / "core").glob("*.json"))) == 3  # dictionary + 2 SAEs
    saes = {s["name"]: s for s in json.loads((folders["evaluate"] / "saes.json").read_text())}
    assert {s["kind"] for s in saes.values()} == {"dictionary", "baseline"}
    assert all(s["budget"]["seconds"] > 0 and s["curve"] for s in saes.values())
    report = folders["report"] / "report.md"
    assert report.is_file() and "dbksvd" in report.read_text().lower()
    assert list(folders["report"].rglob("*.png"))


def test_baselines_train_to_their_plateau_or_cap_and_the_report_says_which(smoke):
    """The default budget: each baseline trains until its held-out curve flattens or it reaches the cap, with
    its held-out curve on the log grid; the dictionary's fit records its own; the report opens with
    time-to-quality."""
    _, folders = smoke
    summary = json.loads((folders["baselines"] / "baselines.json").read_text())
    assert sorted(summary) == ["batchtopk", "topk"]
    for name, record in summary.items():
        assert record["budget"]["mode"] == "plateau" and record["budget"]["samples"] == 65536
        assert record["stop_reason"] in ("plateau", "cap_samples"), name
        assert record["flattened"] or record["stop_reason"] != "plateau"
        assert 0 < record["samples"] <= 65536 and record["samples"] == record["steps"] * 512  # compare.batch_size
        steps = [p["steps"] for p in record["heldout_curve"]]
        assert steps[:3] == [1, 2, 3] and steps[-1] == record["steps"]
        assert record["heldout_curve"][-1]["fvu"] == record["heldout_fvu"]
        assert record["budget_summary"]["cap_samples"] == 65536 and record["budget_summary"]["lr"] > 0
        assert record["dead_mask_steps"] >= 0 and record["dead_window_steps"] >= 1
    history = Dictionary.load(folders["fit"] / "dictionary").history
    assert [h["iteration"] for h in history if "heldout_fvu" in h] == [1, 2, 3, 4]
    saes = json.loads((folders["evaluate"] / "saes.json").read_text())
    assert all(s.get("heldout_curve") for s in saes)
    report = (folders["report"] / "report.md").read_text()
    assert report.split("\n## ", 2)[1].startswith("Time to quality")


def test_wandb_offline_tracks_the_fit_each_baseline_and_the_report(smoke):
    """wandb (off by default; here on, offline): one run per stage job, grouped by experiment; the fit curve,
    sae-lens's own training logs of each baseline, the report's table."""
    from tests.utils.test_tracking import read_offline_runs

    cfg, folders = smoke
    assert stage_dir(cfg, "fit") == folders["fit"]  # tracking settings are not part of any stage's identity
    runs = {r["run"].display_name: r for r in read_offline_runs(Path(cfg.output_root) / "wandb_dir")}
    fit, report = runs[folders["fit"].name], runs[folders["report"].name]
    assert {r["run"].run_group for r in runs.values()} == {"smoke"}
    assert sum("fit/fvu" in row for row in fit["history"]) == 4  # one row per iteration
    assert 0 < fit["summary"]["heldout/heldout_fvu"] < 1
    for name in ("topk", "batchtopk"):
        run = runs[f"{name}-{folders['baselines'].name}"]
        assert run["run"].job_type == "baselines" and run["config"]["baseline"][name]["architecture"] == name
        assert "losses/mse_loss" in run["summary"] and "metrics/l0" in run["summary"]  # sae-lens's own logging
        assert 0 < run["summary"]["heldout/fvu"] < 1 and run["summary"]["curve/seconds"] > 0
    assert "summary" in report["summary"]  # the table
    assert any(key.endswith("/loss recovered") for key in report["summary"])


def test_changing_the_baselines_reuses_the_dictionary(smoke, monkeypatch):
    cfg, folders = smoke
    calls = _record_calls(monkeypatch)
    cfg = _cfg(
        cfg.output_root,
        "baseline=[jumprelu]",
        "compare.budget=steps",
        "compare.steps=3",
        "stage=all",
        "eval.metrics=[]",
    )
    out = orchestrator.run_pipeline(cfg)
    assert calls == ["baselines", "evaluate", "dashboards", "report"]
    assert out["fit"] == folders["fit"] and out["baselines"] != folders["baselines"]
    record = json.loads((out["baselines"] / "jumprelu" / "record.json").read_text())
    assert record["architecture"] == "jumprelu" and record["steps"] == 3


def test_rerun_skips_every_stage(smoke, monkeypatch):
    cfg, folders = smoke
    markers = {s: (f / DONE_MARKER).stat().st_mtime_ns for s, f in folders.items()}
    calls = _record_calls(monkeypatch)
    assert orchestrator.run_pipeline(cfg) == folders
    assert calls == []
    assert {s: (f / DONE_MARKER).stat().st_mtime_ns for s, f in folders.items()} == markers


def test_a_stage_run_alone_owns_its_folder(smoke):
    """`python -m stages.harvest` writes (here: finds) the store where `python -m stages.fit` looks."""
    cfg, folders = smoke
    cmd = [sys.executable, "-m", "stages.harvest", "experiment=smoke", f"output_root={cfg.output_root}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"activation store: {folders['harvest'] / STORE_DIRNAME}" in done.stdout
    assert (
        "every shard matches its sha256" in done.stdout + done.stderr
    )  # a finished store is checked, not re-harvested
    cmd = [sys.executable, "-m", "stages.fit", "experiment=smoke", f"output_root={cfg.output_root}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith(str(folders["fit"]))  # the fit the orchestrator made, found and reused


def test_a_stage_asked_for_by_name_runs_even_when_finished(smoke, monkeypatch):
    cfg, folders = smoke
    calls = _record_calls(monkeypatch)
    out = orchestrator.run_pipeline(_cfg(cfg.output_root, "stage=report"))
    assert calls == ["report"] and out == {"report": folders["report"]}


def test_deleting_a_marker_reruns_that_stage_and_later_ones(smoke, monkeypatch):
    cfg, folders = smoke
    (folders["evaluate"] / DONE_MARKER).unlink()
    calls = _record_calls(monkeypatch)
    orchestrator.run_pipeline(cfg)
    assert calls == ["evaluate", "dashboards", "report"]
    assert all((f / DONE_MARKER).is_file() for f in folders.values())


def test_a_killed_fit_resumes_to_the_uninterrupted_result(smoke, monkeypatch):
    cfg, folders = smoke
    cfg = _cfg(Path(cfg.output_root), "dictionary.seed=5", "stage=fit")
    import stages.fit as fit_stage

    class Killed(Exception):
        pass

    def kill_at_2(it, rec, D):
        if it == 2:
            raise Killed

    real = fit_stage.fit_dictionary
    monkeypatch.setattr(fit_stage, "fit_dictionary", lambda *a, **k: real(*a, callback=kill_at_2, **k))
    with pytest.raises(Killed):
        orchestrator.run_pipeline(cfg)
    folder = stage_dir(cfg, "fit")
    assert (folder / "fit.ckpt").is_file() and not (folder / DONE_MARKER).exists()
    monkeypatch.setattr(fit_stage, "fit_dictionary", real)
    orchestrator.run_pipeline(cfg)
    resumed = Dictionary.load(folder / "dictionary")
    assert len(resumed.history) == 4
    Y = ActivationStore(folders["harvest"] / "store").load_all()
    reference = fit_dictionary(Y, dataclasses.replace(section(cfg, "dictionary"), device="cpu", progress=False))
    assert torch.equal(resumed.atoms, reference.atoms)


def test_a_bad_key_fails_before_any_work(tmp_path, monkeypatch):
    calls = _record_calls(monkeypatch)
    with pytest.raises(ValueError, match="dictionary.colour"):
        orchestrator.run_pipeline(_cfg(tmp_path, "+dictionary.colour=red"))
    assert calls == [] and not any(tmp_path.iterdir())


def test_a_hydra_multirun_sweep_is_gathered_into_one_report(smoke):
    """`python -m pipeline -m experiment=smoke dictionary.coder.k=4,8`: two fits share the store; the last report
    lists both."""
    cfg, folders = smoke
    root = Path(cfg.output_root)
    cmd = [sys.executable, "-m", "pipeline", "-m", "experiment=smoke", f"output_root={root}", "dictionary.coder.k=4,8"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    experiment = root / "smoke"
    assert len(list(experiment.glob("harvest-*"))) == 1  # one store for the whole sweep
    fits = {Dictionary.load(f / "dictionary").coder.k for f in experiment.glob("fit-*") if (f / DONE_MARKER).exists()}
    assert {4, 8} <= fits
    latest = max((f for f in experiment.glob("report-*")), key=lambda f: (f / DONE_MARKER).stat().st_mtime)
    text = (latest / "report.md").read_text()
    assert "k=4" in text.replace(" ", "") or "K256_k4" in text
    assert "K256_k8" in text or "k=8" in text.replace(" ", "")


def test_dashboards_for_every_sae_open_in_a_browser(smoke):
    """The smoke run's report folder has index.html linking the report, the plots and a dashboards page per SAE;
    every local link resolves, and headless Chromium loads the pages without a console message and shows latent
    cards with highlighted contexts (screenshot kept in outputs/test_artifacts/)."""
    from tests.utils.browser import ARTIFACTS, local_links, open_page

    _, folders = smoke
    saes = [s["name"] for s in json.loads((folders["evaluate"] / "saes.json").read_text())]
    summary = json.loads((folders["dashboards"] / "dashboards.json").read_text())
    assert [s["name"] for s in summary["saes"]] == saes and all(s["drawn"] >= 8 for s in summary["saes"])
    index = folders["report"] / "index.html"
    page = open_page(index, screenshot=ARTIFACTS / "index.png")
    assert page.console == []
    links = local_links(index.read_text(), index.parent)
    assert all(p.is_file() for p in links), [p for p in links if not p.is_file()]
    pages = {p.name for p in links}
    assert {"report.html", "report.md"} <= pages and {f"{name}.html" for name in saes} <= pages
    for name in saes:
        path = folders["dashboards"] / f"{name}.html"
        page = open_page(path, screenshot=ARTIFACTS / f"dashboards_{name}.png")
        assert page.console == []
        cards = page.dom.count('class="card latent"')
        assert cards == next(s["drawn"] for s in summary["saes"] if s["name"] == name)
        assert page.dom.count('class="ctx"') >= cards and 'class="tok focus"' in page.dom
        assert all(p.is_file() for p in local_links(path.read_text(), path.parent))
