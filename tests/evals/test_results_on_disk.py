"""What the evaluate stage keeps on disk between runs: no result file or cached artifact torn by a kill (SAEBench's
writes are made atomic), no unreadable one kept (dropped, logged, at the start), and no result of an SAE whose
weights changed since (each result is recorded with the sha256 of its SAE's weights and re-run when they differ)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.evals.metrics.base import MetricRunner
from tests.conftest import tiny_eval_config

DICT_NAME, TOPK_NAME = "dbksvd_plain_K64_k4", "topk_K64_k4"


def _result_file(folder: Path, metric: str, name: str) -> Path:
    return folder / "eval_results" / metric / f"{name}_custom_sae_eval_results.json"


class _Boom:
    """A value whose JSON form fails part-way through a result: json.dump has written the fields before it."""

    def __str__(self) -> str:
        raise KeyboardInterrupt("killed mid-write")


@dataclass
class _Output:
    eval_type_id: str
    filler: list
    late: Any


def _run_as_core(monkeypatch, results_dir: Path, work: Callable[[], None]) -> None:
    """Run ``work`` as the metric ``core`` through the registry (with its patches on), on an empty context."""
    from pipeline.evals.metrics import registry

    class Stub(MetricRunner):
        name = "core"

        def requirements(self, ctx):
            return None

        def config(self, ctx):
            return None

        def run(self, ctx, config):
            work()

    monkeypatch.setitem(registry.REGISTRY, "core", Stub())
    ctx = SimpleNamespace(eval=SimpleNamespace(local_datasets={}), labelled=None, saes=[], results_dir=results_dir)
    registry.run_metric(ctx, "core", registry.MetricOutcome())


def test_a_kill_mid_write_leaves_no_torn_result(tmp_path, monkeypatch):
    """SAEBench's result writes (BaseEvalOutput.to_json_file, every metric's) go through a temporary file while
    the evaluate loop runs a metric: a kill mid-write leaves the old file, or none, never a torn one."""
    from sae_bench.evals.base_eval_output import BaseEvalOutput

    results = tmp_path / "eval_results"
    old = results / "core" / "old_custom_sae_eval_results.json"
    old.parent.mkdir(parents=True)
    old.write_text('{"eval_type_id": "core", "kept": true}')
    new = results / "core" / "new_custom_sae_eval_results.json"

    def write() -> None:
        for path in (new, old):
            try:
                BaseEvalOutput.to_json_file(_Output("core", ["x" * 100] * 200, _Boom()), str(path))
            except KeyboardInterrupt:
                pass

    _run_as_core(monkeypatch, results, write)
    assert not new.exists()
    assert json.loads(old.read_text()) == {"eval_type_id": "core", "kept": True}
    assert sorted(p.name for p in old.parent.iterdir()) == [old.name]  # no temporary file left


class _BoomPickle:
    """An object whose pickling fails: torch.save has created its file (and written the arrays before it)."""

    def __reduce__(self):
        raise KeyboardInterrupt("killed mid-write")


def test_a_kill_mid_torch_save_leaves_no_torn_artifact(tmp_path, monkeypatch):
    """SAEBench keeps LLM activations and probes in its artifacts folder with torch.save and loads any such file
    that exists: while the evaluate loop runs a metric, a torch.save to a path goes through a temporary file, so a
    kill mid-write leaves the old file, or none, never a torn one that every re-run would fail to load. A finished
    save holds the bytes of a direct one (torch names the archive inside after the file)."""
    import torch

    save = torch.save
    artifacts = tmp_path / "artifacts" / "sparse_probing"
    artifacts.mkdir(parents=True)
    old = artifacts / "old_activations.pt"
    torch.save({"train": torch.ones(2)}, old)
    new = artifacts / "new_activations.pt"
    done = artifacts / "done_activations.pt"
    whole = {"train": torch.arange(8.0)}

    def save_all() -> None:
        torch.save(whole, done)
        for path in (new, old):
            try:
                torch.save({"train": torch.zeros(4096), "late": _BoomPickle()}, str(path))
            except KeyboardInterrupt:
                pass

    _run_as_core(monkeypatch, tmp_path / "eval_results", save_all)
    assert torch.save is save  # patched only while the metric ran
    assert not new.exists()
    assert torch.equal(torch.load(old, weights_only=True)["train"], torch.ones(2))
    assert sorted(p.name for p in artifacts.iterdir()) == [done.name, old.name]  # no temporary file left
    direct = tmp_path / "direct" / done.name
    direct.parent.mkdir()
    torch.save(whole, direct)
    assert done.read_bytes() == direct.read_bytes()


# ------------------------------------------------------------------------------------- the evaluate stage
class _FakeMetric(MetricRunner):
    """Stands in for a SAEBench metric (test-only): writes one result per SAE, through SAEBench's own writer, unless
    the file exists (SAEBench's rule without force_rerun); counts what it wrote."""

    name = "core"

    def __init__(self) -> None:
        self.written: list[str] = []

    def requirements(self, ctx):
        return None

    def config(self, ctx):
        return None

    def run(self, ctx, config):
        from sae_bench.evals.base_eval_output import BaseEvalOutput

        for record in ctx.saes:
            path = record.result_path(ctx.results_dir, self.name)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                BaseEvalOutput.to_json_file(_Output("core", [len(self.written)], record.name), str(path))
                self.written.append(record.name)


@pytest.fixture
def stage(eval_inputs, tmp_path, monkeypatch):
    """Run the evaluate stage (the fake metric as ``core``) on copies of the fit and baselines folders, which the
    test may re-fit / retrain."""
    from pipeline.evals.metrics import registry
    from stages import evaluate

    fake = _FakeMetric()
    monkeypatch.setitem(registry.REGISTRY, "core", fake)
    fit, baselines = tmp_path / "fit", tmp_path / "baselines"
    shutil.copytree(eval_inputs["fit"], fit)
    shutil.copytree(eval_inputs["baselines"], baselines)
    folder = tmp_path / "evaluate"

    def run(metrics=("core",)):
        fake.written.clear()
        evaluate.run(
            tiny_eval_config(eval_inputs, tmp_path, list(metrics)),
            run_dir=folder,
            fit_dir=fit,
            baselines_dir=baselines,
            store_dir=eval_inputs["store"],
            model=eval_inputs["model"],
        )
        return list(fake.written)

    return SimpleNamespace(run=run, folder=folder, fit=fit, baselines=baselines)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_results_of_changed_weights_are_rerun(stage):
    from safetensors.torch import load_file, save_file

    from pipeline.core.dictionary import Dictionary

    assert sorted(stage.run()) == [DICT_NAME, TOPK_NAME]
    assert stage.run() == []  # same weights: kept
    ledger = json.loads((stage.folder / "result_weights.json").read_text())
    dict_sha = _sha(stage.fit / "dictionary" / "dictionary.safetensors")
    assert ledger[f"core/{DICT_NAME}_custom_sae_eval_results.json"]["weights_sha256"] == dict_sha
    saes = {s["name"]: s for s in json.loads((stage.folder / "saes.json").read_text())}
    assert saes[DICT_NAME]["weights_sha256"] == dict_sha

    d = Dictionary.load(stage.fit / "dictionary")  # re-fit: other atoms
    d.atoms[0] = -d.atoms[0]
    d.save(stage.fit / "dictionary")
    assert stage.run() == [DICT_NAME]

    weights = stage.baselines / "topk" / "sae_weights.safetensors"  # retrain: other weights
    tensors = load_file(str(weights))
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors.items()}, str(weights))
    assert stage.run() == [TOPK_NAME]
    assert stage.run() == []


def test_a_result_of_unknown_weights_is_rerun(stage):
    """A result file with no record of its SAE's weights (an older run, or a kill between SAEBench's write and
    the record) cannot be vouched for: it is re-run."""
    stage.run()
    (stage.folder / "result_weights.json").unlink()
    assert sorted(stage.run()) == [DICT_NAME, TOPK_NAME]


def test_unreadable_results_are_dropped_at_the_start(stage, caplog):
    stage.run()
    torn = _result_file(stage.folder, "core", DICT_NAME)
    torn.write_text(torn.read_text()[:20])
    published = _result_file(stage.folder, "sparse_probing", "published")  # not one of this run's SAEs
    published.parent.mkdir(parents=True)
    published.write_text('{"eval_type_id": "sparse_probing"}')
    torn_published = _result_file(stage.folder, "sparse_probing", "published2")
    torn_published.write_text('{"eval_type_id": "spa')
    leftover = torn.with_name(f".{torn.name}.tmp-12345")
    leftover.write_text("{")
    with caplog.at_level(logging.WARNING):
        assert stage.run(metrics=[]) == []
    assert not torn.exists() and not torn_published.exists() and not leftover.exists()
    assert published.exists()
    assert str(torn) in caplog.text and "does not parse" in caplog.text
    assert stage.run() == [DICT_NAME]


def test_a_baselines_content_is_its_weights_and_config(tmp_path):
    """Two baseline folders with the same weights and ``cfg.json`` bytes are one SAE; another config, or a record
    that is not a baseline or lacks a file, is not matched by content."""
    from pipeline.evals.kept_results import baseline_content
    from pipeline.evals.sae_records import SAERecord

    def baseline(name: str, cfg: str) -> SAERecord:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "sae_weights.safetensors").write_bytes(b"weights")
        (folder / "cfg.json").write_text(cfg)
        return SAERecord(name, {"name": name, "kind": "baseline", "folder": str(folder)})

    a, b, c = baseline("a", '{"k": 4}'), baseline("b", '{"k": 4}'), baseline("c", '{"k": 8}')
    cfg_sha = hashlib.sha256(b'{"k": 4}').hexdigest()
    assert baseline_content(a) == baseline_content(b) == (hashlib.sha256(b"weights").hexdigest(), cfg_sha)
    assert baseline_content(c) != baseline_content(a)
    (tmp_path / "b" / "cfg.json").unlink()
    assert baseline_content(b) is None
    assert baseline_content(SAERecord("d", {"name": "d", "kind": "dictionary"})) is None
