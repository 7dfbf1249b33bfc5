"""A sweep evaluated together (``stage=evaluate_sweep``): points found on disk, their SAEs named uniquely in one
combined run and mapped back, each point's evaluate folder written as its own evaluate stage would, a re-run
redoing only what is missing; ``until=`` stops a run after a stage. The slow test runs SAEBench's own metrics on
the tiny fixtures and compares each point's results with that point evaluated alone."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.evals.metrics.base import MetricRunner
from pipeline.evals.sae_records import SAERecord
from pipeline.runs.evaluation import PointSAEs
from pipeline.runs.layout import DONE_MARKER, is_done, mark_done, prepare, stage_dir
from pipeline.runs.sweep_points import combine, discover_points, point_names, rename_values
from tests.conftest import SAEBENCH_TINY_RUN_WARNINGS, compose_config, tiny_eval_config

DICT4, DICT8, TOPK = "dbksvd_plain_K64_k4", "dbksvd_plain_K64_k8", "topk_K64_k4"
pytestmark = SAEBENCH_TINY_RUN_WARNINGS

RECORD_FILES = ("saes.json", "skipped.json", "failed.json", "eval_info.json", "result_weights.json", DONE_MARKER)


# --------------------------------------------------------------------------------------------- the layout
def _point_cfg(inputs: dict[str, Any], root: Path, k: int, metrics: list[str]) -> Any:
    """The tiny evaluate config of the sweep point ``dictionary.coder.k=k`` under ``root``."""
    cfg = tiny_eval_config(inputs, root, metrics)
    cfg.dictionary = {"coder": {"k": k}}
    return cfg


def _dictionary(inputs: dict[str, Any], k: int) -> Any:
    """The fixtures' dictionary (k=4), or one with other atoms coding k atoms."""
    from pipeline.core.dictionary import CoderSettings, Dictionary

    d = Dictionary.load(inputs["fit"] / "dictionary")
    if k == 4:
        return d
    g = torch.Generator().manual_seed(k)
    atoms = d.atoms[torch.randperm(d.atoms.shape[0], generator=g)] + 0.05 * torch.randn(d.atoms.shape, generator=g)
    return Dictionary(atoms / atoms.norm(dim=1, keepdim=True), CoderSettings(k=k), history=d.history)


def _topk(inputs: dict[str, Any], folder: Path, k: int) -> None:
    """The fixtures' TopK in ``folder``; for k != 4 with its decoder bias moved, as a point whose baselines were
    trained again (at its own k) holds other weights."""
    from safetensors.torch import load_file, save_file

    from pipeline.saes.sae_lens_io import WEIGHTS_FILE

    shutil.copytree(inputs["baselines"] / "topk", folder)
    if k != 4:
        weights = load_file(folder / WEIGHTS_FILE)
        weights["b_dec"] = weights["b_dec"] + 0.01 * k
        save_file(weights, folder / WEIGHTS_FILE)


def _lay_out(inputs: dict[str, Any], cfg: Any, *, baselines: bool = True, topk_of: int | None = None) -> None:
    """The finished harvest, fit and (unless not ``baselines``) baselines folders of ``cfg``'s point, as the
    orchestrator leaves them (``until=baselines``): the fixtures' store, the point's dictionary and its TopK
    (:func:`_topk` at the point's k, or at ``topk_of``: the same bytes as that point's)."""
    harvest = stage_dir(cfg, "harvest")
    if not is_done(harvest):
        prepare(harvest, cfg, "harvest")
        shutil.copytree(inputs["store"], harvest / "store")
        mark_done(harvest)
    fit = prepare(stage_dir(cfg, "fit"), cfg, "fit")
    _dictionary(inputs, cfg.dictionary.coder.k).save(fit / "dictionary")
    mark_done(fit)
    if baselines:
        folder = prepare(stage_dir(cfg, "baselines"), cfg, "baselines")
        _topk(inputs, folder / "topk", cfg.dictionary.coder.k if topk_of is None else topk_of)
        mark_done(folder)


def _result(folder: Path, metric: str, name: str) -> Path:
    return folder / "eval_results" / metric / f"{name}_custom_sae_eval_results.json"


# ------------------------------------------------------------------------------------- discovery and names
def test_points_are_found_on_disk_and_the_rest_is_named(eval_inputs, tmp_path):
    p4, p8 = (_point_cfg(eval_inputs, tmp_path, k, ["core"]) for k in (4, 8))
    for cfg in (p4, p8):
        _lay_out(eval_inputs, cfg)
    p16 = _point_cfg(eval_inputs, tmp_path, 16, ["core"])
    _lay_out(eval_inputs, p16, baselines=False)  # fitted, not yet trained its baselines
    command = _point_cfg(eval_inputs, tmp_path, 32, ["core", "sparse_probing"])  # whatever dictionary it names
    points, left_out = discover_points(command)
    assert [p.baselines_dir for p in points] == sorted(stage_dir(c, "baselines") for c in (p4, p8))
    for p in points:
        k = p.cfg.dictionary.coder.k
        own = _point_cfg(eval_inputs, tmp_path, k, ["core", "sparse_probing"])  # the point's own run, same eval
        assert p.fit_dir == stage_dir(own, "fit") and p.evaluate_dir == stage_dir(own, "evaluate")
        assert p.harvest_dir == stage_dir(own, "harvest")
    assert len(left_out) == 1 and str(stage_dir(p16, "fit")) in left_out[0] and "until=baselines" in left_out[0]


def test_a_point_of_a_composed_sweep_gets_the_evaluate_folder_of_its_own_run(tmp_path):
    """With the real schema (model facts and progress flags left out of the stage configs): the point found from
    its baselines folder names the evaluate folder the point's own `python -m pipeline` run checks."""
    own = compose_config("experiment=smoke", f"output_root={tmp_path}", "dictionary.coder.k=4", "baseline=[topk]")
    for stage in ("harvest", "fit", "baselines"):
        mark_done(prepare(stage_dir(own, stage), own, stage))
    command = compose_config("experiment=smoke", f"output_root={tmp_path}", "stage=evaluate_sweep")
    (point,), left_out = discover_points(command)
    assert left_out == [] and point.evaluate_dir == stage_dir(own, "evaluate")
    assert dict(point.cfg.baseline).keys() == {"topk"} and point.cfg.dictionary.coder.k == 4


def _point(folder: str, records: list[SAERecord]) -> PointSAEs:
    return PointSAEs(Path(folder), Path(folder) / "fit" / "dictionary", records, [], ledger=None)


def _baseline(name: str, folder: str) -> SAERecord:
    return SAERecord(name, {"name": name, "kind": "baseline", "folder": folder})


def test_colliding_names_are_made_unique_and_mapped_back():
    """Two points' TopK share a name but not their weights: two SAEs, the second renamed; a baseline folder two
    points share, and a hub SAE, are evaluated once."""
    a = _point(
        "/x/evaluate-a",
        [
            SAERecord(DICT4, {"name": DICT4, "kind": "dictionary"}),
            _baseline(TOPK, "/x/baselines-a/topk"),
            _baseline("shared", "/x/shared"),
            SAERecord("r_s", {"name": "r_s", "kind": "hub_baseline"}, hub=("r", "s")),
        ],
    )
    b = _point(
        "/x/evaluate-b",
        [
            SAERecord(DICT4, {"name": DICT4, "kind": "dictionary"}),  # another fit: other weights, same name
            _baseline(TOPK, "/x/baselines-b/topk"),
            _baseline("shared", "/x/shared"),
            SAERecord("r_s", {"name": "r_s", "kind": "hub_baseline"}, hub=("r", "s")),
        ],
    )
    combined = combine([a, b])
    assert [c.name for c in combined] == [DICT4, TOPK, "shared", "r_s", f"{DICT4}__2", f"{TOPK}__2"]
    assert [len(c.members) for c in combined] == [1, 1, 2, 2, 1, 1]
    assert combined[5].record.description["name"] == f"{TOPK}__2" and b.records[1].name == TOPK  # a renamed copy
    assert combined[5].record.sae is b.records[1].sae
    names, foreign = point_names(combined, b)
    assert names == {f"{DICT4}__2": DICT4, f"{TOPK}__2": TOPK}
    assert foreign == {DICT4, TOPK}  # a's, which b's own names now stand for
    info = {"sizes": {"core": {"fit_positions": {DICT4: 1, f"{DICT4}__2": 2}}}, "notes": [f"{TOPK}__2"]}
    assert rename_values(info, names, foreign) == {"sizes": {"core": {"fit_positions": {DICT4: 2}}}, "notes": [TOPK]}


# ------------------------------------------------------------------------ the whole command, a stand-in metric
@dataclass
class _Output:
    eval_type_id: str
    sae_lens_release_id: str
    value: float


class _FakeCore(MetricRunner):
    """Stands in for core (test-only): writes one result per SAE unless it exists (SAEBench's rule), the SAE's
    name inside; records the names of each run."""

    name = "core"

    def __init__(self) -> None:
        self.runs: list[list[str]] = []

    def requirements(self, ctx):
        return None

    def config(self, ctx):
        return None

    def run(self, ctx, config):
        from sae_bench.evals.base_eval_output import BaseEvalOutput

        self.runs.append([])
        for record in ctx.saes:
            path = record.result_path(ctx.results_dir, self.name)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                BaseEvalOutput.to_json_file(_Output("core", record.name, float(record.description["width"])), str(path))
                self.runs[-1].append(record.name)


def test_a_sweep_is_evaluated_in_one_run_into_each_points_folder(eval_inputs, tmp_path, monkeypatch):
    from pipeline.evals.metrics import registry
    from pipeline.runs.sweep_eval import POINTS_FILE, evaluate_sweep

    fake = _FakeCore()
    monkeypatch.setitem(registry.REGISTRY, "core", fake)
    p4, p8 = (_point_cfg(eval_inputs, tmp_path, k, ["core"]) for k in (4, 8))
    for cfg in (p4, p8):
        _lay_out(eval_inputs, cfg)
    folders = evaluate_sweep(p4, model=eval_inputs["model"])
    assert sorted(folders) == sorted(stage_dir(c, "evaluate") for c in (p4, p8))
    assert len(fake.runs) == 1 and sorted(fake.runs[0]) == sorted([DICT4, TOPK, DICT8, f"{TOPK}__2"])
    for cfg, dictionary in ((p4, DICT4), (p8, DICT8)):
        folder = stage_dir(cfg, "evaluate")  # where the point's own `python -m pipeline` looks: done
        assert all((folder / f).is_file() for f in RECORD_FILES)
        assert [s["name"] for s in json.loads((folder / "saes.json").read_text())] == [dictionary, TOPK]
        for name in (dictionary, TOPK):
            assert json.loads(_result(folder, "core", name).read_text())["sae_lens_release_id"] == name
        ledger = json.loads((folder / "result_weights.json").read_text())
        assert sorted(e["sae"] for e in ledger.values()) == sorted([dictionary, TOPK])
        info = json.loads((folder / "eval_info.json").read_text())
        assert len(info["evaluated_together"]["points"]) == 2 and info["evaluated_together"]["saes"] == 4
        assert json.loads((folder / "failed.json").read_text()) == []
        assert (folder / "sae_lens" / dictionary / "cfg.json").is_file()
    work = Path(info["evaluated_together"]["folder"])
    assert not work.name.startswith("evaluate-")  # not one the report gathers
    assert {p["name"] for c in json.loads((work / POINTS_FILE).read_text()) for p in c["points"]} == {
        DICT4,
        DICT8,
        TOPK,
    }

    assert evaluate_sweep(p4, model=eval_inputs["model"]) == folders and len(fake.runs) == 1  # all done: nothing

    # interrupted: one result and the marker missing; the re-run computes that one and keeps every other
    folder8 = stage_dir(p8, "evaluate")
    files = sorted(p for f in folders for p in (f / "eval_results").rglob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in files}
    _result(folder8, "core", TOPK).unlink()
    (folder8 / DONE_MARKER).unlink()
    evaluate_sweep(p4, model=eval_inputs["model"])
    assert fake.runs[1] == [f"{TOPK}__2"] or fake.runs[1] == [TOPK]  # the one SAE whose result was missing
    assert [p for p in files if p.stat().st_mtime_ns != before[p]] == [_result(folder8, "core", TOPK)]
    assert json.loads(_result(folder8, "core", TOPK).read_text())["sae_lens_release_id"] == TOPK
    assert is_done(folder8)


def test_a_baseline_two_points_trained_alike_is_evaluated_once_for_both(eval_inputs, tmp_path, monkeypatch):
    """Two points whose TopK folders hold the same bytes (a sweep over a dictionary setting the baselines do not
    depend on trains them again, alike): one SAE in the joint run, its result delivered to both points under
    their own names. Lost from one point, it is computed again for that point alone (a point already done is
    not part of a re-run)."""
    from pipeline.evals.metrics import registry
    from pipeline.runs.sweep_eval import POINTS_FILE, evaluate_sweep

    fake = _FakeCore()
    monkeypatch.setitem(registry.REGISTRY, "core", fake)
    p4, p8 = (_point_cfg(eval_inputs, tmp_path, k, ["core"]) for k in (4, 8))
    for cfg in (p4, p8):
        _lay_out(eval_inputs, cfg, topk_of=4)
    assert stage_dir(p4, "baselines") != stage_dir(p8, "baselines")  # two folders, one SAE
    folders = evaluate_sweep(p4, model=eval_inputs["model"])
    assert len(fake.runs) == 1 and sorted(fake.runs[0]) == sorted([DICT4, TOPK, DICT8])
    work = Path(json.loads((folders[0] / "eval_info.json").read_text())["evaluated_together"]["folder"])
    shared = [c for c in json.loads((work / POINTS_FILE).read_text()) if c["name"] == TOPK]
    assert [len(c["points"]) for c in shared] == [2]
    for cfg, dictionary in ((p4, DICT4), (p8, DICT8)):
        folder = stage_dir(cfg, "evaluate")
        assert is_done(folder) and json.loads(_result(folder, "core", TOPK).read_text())["value"] == 64.0
        assert sorted(e["sae"] for e in json.loads((folder / "result_weights.json").read_text()).values()) == sorted(
            [dictionary, TOPK]
        )
    folder8 = stage_dir(p8, "evaluate")
    _result(folder8, "core", TOPK).unlink()
    (folder8 / DONE_MARKER).unlink()
    evaluate_sweep(p4, model=eval_inputs["model"])
    assert fake.runs[1] == [TOPK] and _result(folder8, "core", TOPK).is_file() and is_done(folder8)


def test_no_finished_point_names_the_command_to_run(eval_inputs, tmp_path):
    from pipeline.runs.sweep_eval import evaluate_sweep

    with pytest.raises(FileNotFoundError, match="until=baselines"):
        evaluate_sweep(_point_cfg(eval_inputs, tmp_path, 4, ["core"]))


# ------------------------------------------------------------------------------------- the orchestrator
def _stub_runners(monkeypatch) -> list[str]:
    import stages.orchestrator as orchestrator

    calls: list[str] = []

    def runner(stage):
        def run(cfg):
            calls.append(stage)
            return stage_dir(cfg, stage)

        return run

    monkeypatch.setattr(orchestrator, "stage_runner", runner)
    return calls


def test_until_stops_a_run_after_that_stage(tmp_path, monkeypatch):
    import stages.orchestrator as orchestrator

    calls = _stub_runners(monkeypatch)
    out = orchestrator.run_pipeline(compose_config("experiment=smoke", f"output_root={tmp_path}", "until=baselines"))
    assert calls == list(out) == ["harvest", "fit", "baselines"]


def test_stage_evaluate_sweep_runs_the_joint_evaluation(tmp_path, monkeypatch):
    import stages.evaluate_sweep as sweep_stage
    import stages.orchestrator as orchestrator

    calls = _stub_runners(monkeypatch)
    monkeypatch.setattr(sweep_stage, "run", lambda cfg: [tmp_path / "evaluate-a", tmp_path / "evaluate-b"])
    out = orchestrator.run_pipeline(
        compose_config("experiment=smoke", f"output_root={tmp_path}", "stage=evaluate_sweep")
    )
    assert calls == [] and out == {"evaluate 1": tmp_path / "evaluate-a", "evaluate 2": tmp_path / "evaluate-b"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["until=evaluation"], "until='evaluation' is not one of"),
        (["stage=fit", "until=baselines"], "drop until"),
    ],
)
def test_a_bad_until_fails_naming_it(overrides, message):
    from pipeline.runs.config import check_config

    with pytest.raises(ValueError, match=message):
        check_config(compose_config("experiment=smoke", *overrides))


# ------------------------------------------------------------------------------ SAEBench's own metrics (slow)
#: What differs between two runs of one result: its id and time.
VOLATILE = ("eval_id", "datetime_epoch_millis")


def _comparable(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in VOLATILE}


@pytest.mark.slow
def test_a_sweep_evaluated_together_gives_each_point_its_own_results(eval_inputs, tmp_path):
    """Two points evaluated together give each point the result files of that point evaluated alone (less their id
    and time); a re-run after one result is lost recomputes only that one, equal again; each point's folder is done
    and its report runs."""
    from pipeline.runs.sweep_eval import evaluate_sweep
    from stages import evaluate, report

    metrics = ["core", "sparse_probing", "tpp", "absorption"]
    model = eval_inputs["model"]
    together, alone = tmp_path / "together", tmp_path / "alone"
    points = {k: _point_cfg(eval_inputs, together, k, metrics) for k in (4, 8)}
    for cfg in points.values():
        _lay_out(eval_inputs, cfg)
    evaluate_sweep(points[4], model=model)
    for k in (4, 8):
        cfg = _point_cfg(eval_inputs, alone, k, metrics)
        _lay_out(eval_inputs, cfg)
        evaluate.run(cfg, model=model)

    def check_equal(k: int) -> list[Path]:
        mine, theirs = (
            stage_dir(points[k], "evaluate"),
            stage_dir(_point_cfg(eval_inputs, alone, k, metrics), "evaluate"),
        )
        files = sorted(p.relative_to(mine) for p in (mine / "eval_results").rglob("*.json"))
        assert files == sorted(p.relative_to(theirs) for p in (theirs / "eval_results").rglob("*.json"))
        assert len(files) >= 2 * len(metrics)
        for f in files:
            assert _comparable(mine / f) == _comparable(theirs / f), f
        for record in ("skipped.json", "failed.json"):
            assert json.loads((mine / record).read_text()) == json.loads((theirs / record).read_text())
        ours, own = (json.loads((d / "saes.json").read_text()) for d in (mine, theirs))
        assert [{k: v for k, v in s.items() if k != "folder"} for s in ours] == [
            {k: v for k, v in s.items() if k != "folder"} for s in own
        ]
        assert all((mine / f).is_file() for f in RECORD_FILES)
        return [mine / f for f in files]

    files = check_equal(4) + check_equal(8)
    lost = _result(stage_dir(points[8], "evaluate"), "sparse_probing", TOPK)
    assert lost in files
    before = {p: p.stat().st_mtime_ns for p in files}
    lost.unlink()
    (stage_dir(points[8], "evaluate") / DONE_MARKER).unlink()
    evaluate_sweep(points[4], model=model)
    assert [p for p in files if not p.exists() or p.stat().st_mtime_ns != before[p]] == [lost]
    check_equal(8)

    for cfg in points.values():
        assert is_done(stage_dir(cfg, "evaluate"))
    folder = report.run(points[8])
    md = (folder / "report.md").read_text()
    assert is_done(folder) and all(f"`{name}`" in md for name in (DICT4, DICT8, TOPK))
