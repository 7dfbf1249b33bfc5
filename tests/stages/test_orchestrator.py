"""End to end through the orchestrator on the `smoke` preset: every stage, skipping, re-running, resuming."""

import json
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import stages.orchestrator as orchestrator
from pipeline.core.learner import learn_dictionary
from pipeline.core.dictionary import Dictionary
from pipeline.runs.layout import DONE_MARKER, STAGES, stage_dir

CONF = str(Path(__file__).resolve().parents[1] / "conf")
pytestmark = pytest.mark.slow


def _cfg(root, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", f"output_root={root}", *overrides])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = _cfg(root)
    t = time.perf_counter()
    folders = orchestrator.run_pipeline(cfg)
    return cfg, folders, time.perf_counter() - t


def _record_calls(monkeypatch):
    calls = []
    real = orchestrator.stage_runner

    def runner(stage):
        calls.append(stage)
        return real(stage)

    monkeypatch.setattr(orchestrator, "stage_runner", runner)
    return calls


def test_every_stage_produces_its_artefacts(smoke):
    cfg, folders, _ = smoke
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
    cfg, _, first = smoke
    calls = _record_calls(monkeypatch)
    t = time.perf_counter()
    orchestrator.run_pipeline(cfg)
    assert calls == []
    assert time.perf_counter() - t < first / 5


def test_deleting_a_marker_reruns_that_stage_and_later_ones(smoke, monkeypatch):
    cfg, folders, _ = smoke
    (folders["evaluate"] / DONE_MARKER).unlink()
    calls = _record_calls(monkeypatch)
    orchestrator.run_pipeline(cfg)
    assert calls == ["evaluate", "report"]
    assert all((f / DONE_MARKER).is_file() for f in folders.values())


def test_a_killed_fit_resumes_to_the_uninterrupted_result(smoke, monkeypatch):
    cfg, folders, _ = smoke
    cfg = _cfg(Path(cfg.output_root), "dictionary.seed=5", "stage=fit", "baseline.topk=false")
    import stages.fit as fit_stage

    class Killed(Exception):
        pass

    def kill_at_2(it, rec, D):
        if it == 2:
            raise Killed

    real = fit_stage.learn_dictionary
    monkeypatch.setattr(fit_stage, "learn_dictionary", lambda *a, **k: real(*a, callback=kill_at_2, **k))
    with pytest.raises(Killed):
        orchestrator.run_pipeline(cfg)
    folder = stage_dir(cfg, "fit")
    assert (folder / "fit.ckpt").is_file() and not (folder / DONE_MARKER).exists()
    monkeypatch.setattr(fit_stage, "learn_dictionary", real)
    orchestrator.run_pipeline(cfg)
    resumed = Dictionary.load(folder / "dictionary")
    from pipeline.data.store import ActivationStore

    Y = ActivationStore(folders["harvest"] / "store").load_all()
    opts = dict(cfg.dictionary)
    n_atoms, k = opts.pop("n_atoms"), opts.pop("k")
    opts.update(device="cpu", progress=False)
    reference = learn_dictionary(Y, n_atoms, k, **opts)
    assert torch.equal(resumed.atoms, reference.atoms)


def test_a_bad_key_fails_before_any_work(tmp_path):
    t = time.perf_counter()
    with pytest.raises(ValueError, match="dictionary.colour"):
        orchestrator.run_pipeline(_cfg(tmp_path, "+dictionary.colour=red"))
    assert time.perf_counter() - t < 10
    assert not any(tmp_path.iterdir())


def test_a_hydra_multirun_sweep_is_gathered_into_one_report(smoke):
    """`python -m pipeline -m dictionary.k=4,8`: two fits share the store; the last report lists both."""
    import subprocess
    import sys

    cfg, folders, _ = smoke
    root = Path(cfg.output_root)
    cmd = [sys.executable, "-m", "pipeline", "-m", "experiment=smoke", f"output_root={root}", "dictionary.k=4,8"]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    experiment = root / "smoke"
    assert len(list(experiment.glob("harvest-*"))) == 1  # one store for the whole sweep
    fits = {Dictionary.load(f / "dictionary").coder.k for f in experiment.glob("fit-*") if (f / DONE_MARKER).exists()}
    assert {4, 8} <= fits
    latest = max((f for f in experiment.glob("report-*")), key=lambda f: (f / DONE_MARKER).stat().st_mtime)
    text = (latest / "report.md").read_text()
    assert "k=4" in text.replace(" ", "") or "K256_k4" in text
    assert "K256_k8" in text or "k=8" in text.replace(" ", "")
