"""``eval.signed_export``: the key is checked, the paper presets keep the ± split, every metric says whether its
SAEBench code reads signed codes, the loop skips an SAE with signed codes (and only it) for a metric that cannot,
and SAEBench's core on the signed form gives the split's numbers (a latent counted per atom, not per half).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from pipeline.evals.config import parse_eval_config, validate_eval_config
from pipeline.evals.metrics import REGISTRY, EvalContext, MetricOutcome, MetricRunner, run_metric
from pipeline.evals.sae_records import SAERecord
from tests.conftest import CONF, SAEBENCH_TINY_RUN_WARNINGS, TINY_D_MODEL, make_documents

pytestmark = SAEBENCH_TINY_RUN_WARNINGS

#: Which metrics' SAEBench code reads signed codes correctly (README, "Signed dictionaries in SAEBench").
READS_SIGNED = {
    "core": True,
    "absorption": False,
    "sparse_probing": True,
    "scr": True,
    "tpp": False,
    "autointerp": False,
    "ravel": True,
    "unlearning": False,
}


def _preset(name: str) -> dict:
    return yaml.safe_load((CONF / "eval" / f"{name}.yaml").read_text())


# ------------------------------------------------------------------------------------------ the key
@pytest.mark.parametrize("bad", ["both", "Signed", ""])
def test_signed_export_is_checked_naming_the_key(bad):
    raw = copy.deepcopy(_preset("smoke"))
    raw["signed_export"] = bad
    with pytest.raises(ValueError, match=r"eval\.signed_export=.* is not one of split, signed"):
        validate_eval_config(parse_eval_config(raw))


@pytest.mark.parametrize("preset", ["offline_small", "paper", "smoke"])
def test_presets_keep_the_split(preset):
    """The paper presets run absorption, TPP, autointerp and unlearning, which cannot read signed codes: the split
    stays the default everywhere; ``signed`` is opt-in."""
    e = parse_eval_config(_preset(preset))
    assert e.signed_export == "split"
    for value in ("split", "signed"):
        validate_eval_config(parse_eval_config({**_preset(preset), "signed_export": value}))


def test_every_metric_has_a_signed_codes_verdict():
    assert {name: runner.signed_codes is None for name, runner in REGISTRY.items()} == READS_SIGNED
    for name, runner in REGISTRY.items():
        if runner.signed_codes is not None:
            assert "SAEBench" in runner.signed_codes and runner.signed_codes.endswith("."), name


# ------------------------------------------------------------------------------------------ the loop
def _ctx(tmp_path: Path, saes: list[SAERecord]) -> EvalContext:
    from pipeline.data.config import ModelConfig

    e = parse_eval_config(_preset("smoke"))
    return EvalContext(
        model=None,
        model_config=ModelConfig(name="tiny-local"),
        n_params=0,
        saes=saes,
        results_dir=tmp_path / "eval_results",
        artifacts_dir=tmp_path / "artifacts",
        device="cpu",
        llm_dtype="float32",
        llm_batch_size=e.llm_batch_size,
        force_rerun=False,
        store=None,
        text_source=None,
        labelled=None,
        eval=e,
        hub_reachable=False,
        info={"sizes": {}, "notes": []},
    )


class _Writes(MetricRunner):
    """A mocked runner (test-only) that writes a result file for every SAE it is given and remembers them."""

    def __init__(self, name: str, signed_codes: str | None):
        self.name, self.signed_codes, self.given = name, signed_codes, None

    def config(self, ctx):
        return None

    def run(self, ctx, config):
        self.given = [r.name for r in ctx.saes]
        for r in ctx.saes:
            path = r.result_path(ctx.results_dir, self.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")


def _records() -> list[SAERecord]:
    signed = SAERecord("dict_signed", {"name": "dict_signed"}, sae=SimpleNamespace(signed_codes=True))
    split = SAERecord("dict_split", {"name": "dict_split"}, sae=SimpleNamespace(signed_codes=False))
    baseline = SAERecord("topk", {"name": "topk"}, sae=object())
    return [signed, split, baseline]


def test_a_metric_that_cannot_read_signed_codes_skips_that_sae_with_the_reason(tmp_path, monkeypatch):
    runner = _Writes("tpp", "SAEBench's TPP reads only positive codes.")
    monkeypatch.setitem(REGISTRY, "tpp", runner)
    ctx = _ctx(tmp_path, _records())
    outcome = MetricOutcome()
    run_metric(ctx, "tpp", outcome)
    assert runner.given == ["dict_split", "topk"] and outcome.failed == []
    (skip,) = outcome.skipped
    assert skip["what"] == "metric:tpp" and skip["sae"] == "dict_signed"
    assert "SAEBench's TPP reads only positive codes." in skip["reason"]
    assert "eval.signed_export=split" in skip["reason"]
    assert [r.name for r in ctx.saes] == ["dict_signed", "dict_split", "topk"]  # the caller's context is untouched


def test_a_metric_that_reads_signed_codes_runs_every_sae(tmp_path, monkeypatch):
    runner = _Writes("scr", None)
    monkeypatch.setitem(REGISTRY, "scr", runner)
    outcome = MetricOutcome()
    run_metric(_ctx(tmp_path, _records()), "scr", outcome)
    assert runner.given == ["dict_signed", "dict_split", "topk"] and outcome.skipped == []


def test_the_real_runners_skip_an_sae_with_signed_codes_without_running(tmp_path, monkeypatch):
    """Absorption, TPP, autointerp, unlearning: with only a signed-codes SAE nothing of SAEBench runs."""
    for name, reads in READS_SIGNED.items():
        if reads:
            continue
        runner = REGISTRY[name]
        monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("ran"), raising=False)
        outcome = MetricOutcome()
        run_metric(_ctx(tmp_path, _records()[:1]), name, outcome)
        assert outcome.failed == []
        assert outcome.skipped == [
            {"what": f"metric:{name}", "sae": "dict_signed", "reason": outcome.skipped[0]["reason"]}
        ]
        assert runner.signed_codes in outcome.skipped[0]["reason"]


# ------------------------------------------------------------------------------------------ core
def test_magnitude_codes_decodes_only_what_it_encoded():
    from pipeline.core.dictionary import CoderSettings, Dictionary
    from pipeline.evals.metrics.core import MagnitudeCodes
    from pipeline.saes.dictionary_sae import DictionarySAE

    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(48, 16, generator=g), dim=1)
    sae = DictionarySAE(Dictionary(atoms, CoderSettings(k=4, nonnegative=False)), "m", 1, signed_export="signed")
    view = MagnitudeCodes(sae)
    x = torch.randn(20, 16, generator=g)
    codes = sae.encode(x)
    assert bool((codes < 0).any()), "the test needs negative coefficients"
    f = view.encode(x)
    assert torch.equal(f, codes.abs()) and view.cfg is sae.cfg and view.W_dec is sae.W_dec
    assert torch.equal(view.decode(f), sae.decode(codes))
    with pytest.raises(RuntimeError, match="eval.signed_export=split"):
        view.decode(f.clone())


def _core_result(sae: Any, model: Any, path: Path, rows: list[list[int]], batch: int) -> dict[str, Any]:
    from datasets import Dataset

    from pipeline.evals.metrics.core import CoreRunner, run_core

    core = SimpleNamespace(
        batch_size_prompts=batch,
        n_eval_reconstruction_batches=1,
        n_eval_sparsity_variance_batches=2,
        dataset=None,
        context_size=len(rows[0]),
    )
    config = CoreRunner().config(
        SimpleNamespace(eval=SimpleNamespace(core=core), model_name=model.cfg.model_name, llm_dtype="float32")
    )
    rows = Dataset.from_dict({"tokens": rows})
    run_core(SAERecord("sae", {"name": "sae"}, sae=sae), model, path, config, rows, "cpu")
    return json.loads(path.read_text())


def test_core_on_signed_codes_counts_atoms_as_the_split_counts_halves(tiny_hooked_model, tmp_path):
    """SAEBench's own core on the tiny model, both forms of one signed dictionary: reconstruction, CE/KL, L0 and
    L1 (= Σ|code|) agree; the signed form's feature density of atom i is the split's of +d_i plus −d_i, and its
    alive fraction is over the K atoms."""
    from pipeline.core.dictionary import CoderSettings, Dictionary
    from pipeline.data.text import iter_contexts
    from pipeline.saes.dictionary_sae import DictionarySAE

    model = tiny_hooked_model
    hook, context, batch = "blocks.1.hook_resid_post", 24, 4
    tok = model.tokenizer
    rows = [c for _, c in zip(range(3 * batch), iter_contexts(make_documents(30, seed=2), tok, context, None))]
    K = 40
    atoms = torch.nn.functional.normalize(torch.randn(K, TINY_D_MODEL, generator=torch.Generator().manual_seed(1)))
    d = Dictionary(atoms, CoderSettings(k=3, nonnegative=False))
    results = {}
    for form in ("split", "signed"):
        sae = DictionarySAE(d, model.cfg.model_name, 1, hook, signed_export=form)
        sae.cfg.context_size = context
        results[form] = _core_result(sae, model, tmp_path / f"{form}.json", rows, batch)
    split, signed = results["split"], results["signed"]
    assert split["sae_cfg_dict"]["d_sae"] == 2 * K and signed["sae_cfg_dict"]["d_sae"] == K
    for group, values in split["eval_result_metrics"].items():
        if group == "misc_metrics":  # per-latent statistics: over 2K halves vs K atoms (below)
            continue
        for key, value in values.items():
            assert signed["eval_result_metrics"][group][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (group, key)
    assert split["eval_result_metrics"]["sparsity"]["l0"] > 0
    density = lambda r: torch.tensor([f["feature_density"] for f in r["eval_result_details"]])  # noqa: E731
    split_density, signed_density = density(split), density(signed)
    assert bool((split_density[:K] > 0).any() and (split_density[K:] > 0).any())  # both signs fire
    assert torch.allclose(signed_density, split_density[:K] + split_density[K:], atol=1e-6)
    misc = signed["eval_result_metrics"]["misc_metrics"]
    assert misc["frac_alive"] == pytest.approx(float((signed_density > 0).float().mean()))
    assert split["eval_result_metrics"]["misc_metrics"]["frac_alive"] == pytest.approx(
        float((split_density > 0).float().mean())
    )


# ------------------------------------------------------------------------------------------ the records
@pytest.mark.parametrize("nonnegative", [False, True])
def test_fit_records_build_the_configured_form(tmp_path, nonnegative):
    from pipeline.core.dictionary import CoderSettings, Dictionary
    from pipeline.evals.sae_records import fit_records

    atoms = torch.nn.functional.normalize(torch.randn(24, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    Dictionary(atoms, CoderSettings(k=3, nonnegative=nonnegative)).save(tmp_path / "dictionary")
    described = {}
    for form in ("split", "signed"):
        (record,), skipped = fit_records(
            ["dictionary"],
            tmp_path / "dictionary",
            None,
            [],
            model_name="m",
            hook="blocks.0.hook_resid_post",
            layer=0,
            device="cpu",
            cache_mb=0,
            context_size=16,
            signed_export=form,
        )
        assert skipped == [] and record.sae.cfg.d_sae == record.description["width"]
        described[form] = record.description
    if nonnegative:  # one form: the key changes nothing
        assert described["split"] == described["signed"]
        assert described["split"]["export"] == "nonnegative" and described["split"]["width"] == 24
    else:
        split, signed = described["split"], described["signed"]
        assert (split["export"], split["width"], split["name"]) == ("split", 48, "dbksvd_plain_K24_k3")
        assert (signed["export"], signed["width"], signed["name"]) == ("signed", 24, "dbksvd_plain_K24_k3_signed")
        assert "signed codes" in signed["width_note"] and "[D; -D]" in split["width_note"]
        assert split["signed"] and signed["signed"]
