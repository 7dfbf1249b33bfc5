"""End to end through the orchestrator on the `smoke` preset: every stage, skipping, re-running, resuming."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
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
    root = tmp_path_factory.mktemp("runs")
    cfg = _cfg(root)
    return cfg, orchestrator.run_pipeline(cfg)


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
    assert (folders["fit"] / "topk").is_dir()
    metrics = json.loads((folders["fit"] / "metrics.json").read_text())
    assert 0 < metrics["dictionary"]["heldout_fvu"] < 1
    assert len(list((folders["evaluate"] / "eval_results" / "core").glob("*.json"))) == 2  # dictionary + TopK
    report = folders["report"] / "report.md"
    assert report.is_file() and "dbksvd" in report.read_text().lower()
    assert list(folders["report"].rglob("*.png"))


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
    assert "every shard matches its sha256" in done.stdout + done.stderr  # a finished store is checked, not re-harvested
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
    assert calls == ["evaluate", "report"]
    assert all((f / DONE_MARKER).is_file() for f in folders.values())


def test_a_killed_fit_resumes_to_the_uninterrupted_result(smoke, monkeypatch):
    cfg, folders = smoke
    cfg = _cfg(Path(cfg.output_root), "dictionary.seed=5", "stage=fit", "baseline.topk=false")
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
    """`python -m pipeline -m experiment=smoke dictionary.coder.k=4,8`: two fits share the store; the last report lists both."""
    cfg, folders = smoke
    root = Path(cfg.output_root)
    cmd = [sys.executable, "-m", "pipeline", "-m", "experiment=smoke", f"output_root={root}",
           "dictionary.coder.k=4,8"]
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
