"""The metric registry and the typed ``eval`` schema, without running SAEBench: every configured metric has a
runner, a missing requirement is a recorded skip (not a crash), a failing metric is recorded while the others
run, unknown keys fail naming their path; and the held-out statistics' coherence measure."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.evals.config import METRICS, EvalConfig, parse_eval_config, validate_eval_config
from pipeline.evals.metrics import (
    REGISTRY,
    EvalContext,
    MetricOutcome,
    MetricRunner,
    check_metric_configs,
    run_metric,
    run_metrics,
)
from pipeline.evals.sae_records import SAERecord

CONF_EVAL = Path(__file__).resolve().parents[2] / "conf" / "eval"
PRESETS = sorted(CONF_EVAL.glob("*.yaml"))


def _preset(name: str = "smoke") -> dict:
    return yaml.safe_load((CONF_EVAL / f"{name}.yaml").read_text())


def _ctx(tmp_path: Path, e: EvalConfig, model_name: str = "tiny-local", hub: bool = False) -> EvalContext:
    """A context with no model, store or SAE object: enough for requirements and the loop's bookkeeping."""
    from pipeline.data.config import ModelConfig

    record = SAERecord("sae", {"name": "sae"}, sae=object())
    return EvalContext(
        model=None,
        model_config=ModelConfig(name=model_name),
        n_params=0,
        saes=[record],
        results_dir=tmp_path / "eval_results",
        artifacts_dir=tmp_path / "artifacts",
        device="cpu",
        llm_dtype="float32",
        llm_batch_size=e.llm_batch_size,
        force_rerun=e.force_rerun,
        store=None,
        text_source=None,
        labelled=None,
        eval=e,
        hub_reachable=hub,
        info={"sizes": {}, "notes": []},
    )


# ------------------------------------------------------------------------------------------ registry
def test_every_eval_preset_is_used_and_every_used_one_exists():
    """The eval presets the experiments (and the root config) choose are the files in conf/eval/: none missing,
    none unused (the parametrised tests below run over the files)."""
    import re

    conf = CONF_EVAL.parent
    texts = [conf / "config.yaml", *sorted((conf / "experiment").glob("*.yaml"))]
    chosen = {m for t in texts for m in re.findall(r"(?m)^\s*- (?:override /)?eval: (\w+)", t.read_text())}
    assert chosen and chosen == {p.stem for p in PRESETS}, (chosen, [p.stem for p in PRESETS])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_configured_metric_has_a_runner(preset):
    e = parse_eval_config(yaml.safe_load(preset.read_text()))
    validate_eval_config(e)
    check_metric_configs(e)
    for metric in e.metrics:
        assert REGISTRY[metric].name == metric
        assert isinstance(REGISTRY[metric], MetricRunner)


def test_registry_covers_every_metric_node_of_the_schema():
    import dataclasses
    import typing

    from pipeline.evals.config import CoreConfig, MetricConfig

    hints = typing.get_type_hints(EvalConfig)
    nodes = {
        f.name
        for f in dataclasses.fields(EvalConfig)
        if isinstance(hints[f.name], type) and issubclass(hints[f.name], (CoreConfig, MetricConfig))
    }
    assert nodes == set(REGISTRY) == set(METRICS)


@pytest.mark.parametrize(
    "metric, model_name, needle",
    [
        ("autointerp", "tiny-local", "no judge: autointerp asks an LLM"),
        ("ravel", "tiny-local", "RAVEL supports only"),
        ("ravel", "gemma-2-2b", "hub is unreachable"),
        ("unlearning", "tiny-local", "instruction-tuned"),
        ("unlearning", "gemma-2-2b-it", "from the hub; unreachable"),
    ],
)
def test_missing_requirement_is_a_skip_reason(tmp_path, monkeypatch, metric, model_name, needle):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ctx = _ctx(tmp_path, parse_eval_config(_preset()), model_name=model_name)
    assert needle in REGISTRY[metric].requirements(ctx)
    outcome = MetricOutcome()
    run_metric(ctx, metric, outcome)  # the loop records the reason; nothing runs, nothing fails
    assert outcome.failed == []
    assert outcome.skipped == [{"what": f"metric:{metric}", "reason": REGISTRY[metric].requirements(ctx)}]
    assert metric in outcome.timings


def test_a_failing_metric_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    """Mocked runners (test-only): one raises, one writes its result file, one writes none."""

    class Boom(MetricRunner):
        name = "core"

        def config(self, ctx):
            return None

        def run(self, ctx, config):
            raise RuntimeError("boom")

    class Writes(MetricRunner):
        name = "ravel"

        def config(self, ctx):
            return None

        def run(self, ctx, config):
            for r in ctx.saes:
                path = r.result_path(ctx.results_dir, self.name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}")

    class WritesNothing(Writes):
        name = "unlearning"

        def run(self, ctx, config):
            pass

    monkeypatch.setitem(REGISTRY, "core", Boom())
    monkeypatch.setitem(REGISTRY, "ravel", Writes())
    monkeypatch.setitem(REGISTRY, "unlearning", WritesNothing())
    ctx = _ctx(tmp_path, parse_eval_config(_preset()))
    outcome = run_metrics(ctx, ["core", "ravel", "unlearning"])
    assert outcome.failed == [{"metric": "core", "error": "RuntimeError: boom"}]
    assert outcome.skipped == [
        {
            "what": "metric:unlearning",
            "sae": "sae",
            "reason": "SAEBench wrote no result file for this SAE (see the stage log)",
        }
    ]
    assert list(outcome.timings) == ["core", "ravel", "unlearning"]
    assert (tmp_path / "eval_results" / "ravel" / "sae_custom_sae_eval_results.json").is_file()


def test_saebench_config_gets_the_stage_values(tmp_path):
    ctx = _ctx(tmp_path, parse_eval_config(_preset("offline_small")))
    config = REGISTRY["absorption"].config(ctx)
    assert type(config).__name__ == "AbsorptionEvalConfig"
    assert config.model_name == "tiny-local" and config.llm_dtype == "float32"
    assert config.min_feats_for_eval == 2 and config.llm_batch_size == ctx.llm_batch_size


# ------------------------------------------------------------------------------------------ schema
@pytest.mark.parametrize("metric", ["absorption", "sparse_probing", "scr", "tpp", "autointerp", "ravel", "unlearning"])
def test_unknown_metric_config_key_fails_naming_it(metric):
    raw = _preset()
    node = raw.setdefault(metric, {})
    node["config"] = {**node.get("config", {}), "bogus_key": 1}
    e = parse_eval_config(raw)
    validate_eval_config(e)  # the schema's check does not import SAEBench, so it cannot see these keys
    with pytest.raises(ValueError, match=rf"eval\.{metric}\.config\.bogus_key"):
        check_metric_configs(e)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda r: r.update(bogus=1), r"eval\.bogus"),
        (lambda r: r["core"].update(bogus=1), r"eval\.core\.bogus"),
        (lambda r: r.update(labelled={"min_words": "twelve"}), r"eval\.labelled\.min_words"),
        (lambda r: r.update(tpp={"confg": {}}), r"eval\.tpp\.confg"),
        (lambda r: r.update(llm_batch_size="many"), r"eval\.llm_batch_size"),
        (lambda r: r.update(hub_baselines=[{"release": "x", "zzz": 1}]), r"eval\.hub_baselines\[0\]\.zzz"),
    ],
)
def test_parse_eval_config_names_the_bad_key(change, match):
    """A preset lists only what it changes (the schema has every default), so errors are unknown keys and wrong
    types, each named with its path."""
    raw = copy.deepcopy(_preset())
    change(raw)
    with pytest.raises(ValueError, match=match):
        parse_eval_config(raw)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda r: r.update(metrics=["core", "nonsense"]), "nonsense"),
        (lambda r: r.update(saes=["dictionary", "dictionary"]), "twice"),
        (lambda r: r.update(hub_baselines=[{"release": "x"}]), r"eval\.hub_baselines\[0\]"),
    ],
)
def test_validate_eval_config_rejects(change, match):
    raw = copy.deepcopy(_preset())
    change(raw)
    with pytest.raises(ValueError, match=match):
        validate_eval_config(parse_eval_config(raw))


def test_parse_eval_config_is_typed():
    e = parse_eval_config(_preset("paper"))
    assert isinstance(e, EvalConfig)
    assert e.hub_baselines[0].architecture == "matryoshka_batch_topk" and e.core.dataset == "Skylion007/openwebtext"
    assert e.absorption.vocab_size is None and e.absorption.seed == 0 and e.labelled.jsonl is None
    with pytest.raises(ValueError, match="no `eval` node"):
        parse_eval_config(None)


# ------------------------------------------------------------------------------------------ held-out stats
def test_mean_max_abs_cos_normalises_rows():
    from pipeline.saes.heldout import mean_max_abs_cos

    W = torch.eye(4)
    assert mean_max_abs_cos(W) == 0.0
    V = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    expect = 2**-0.5  # each row's best |cos| is 1/sqrt(2)
    assert abs(mean_max_abs_cos(V) - expect) < 1e-6
    assert abs(mean_max_abs_cos(V * torch.tensor([[3.0], [0.1], [7.0]])) - expect) < 1e-6
    assert abs(mean_max_abs_cos(torch.cat([V, -V[:1]]), block=2) - (1 + 2**-0.5 * 2 + 1) / 4) < 1e-6
