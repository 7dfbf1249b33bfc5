"""``eval.core.positions``: SAEBench's core on every position (``core/``) and on the positions the fit used
(``core_fit_positions/``), on the tiny local model.

The rule is checked position by position against the harvest's own ``_harvest_shard``; with nothing left out the
two runs agree (real SAEs: the dictionary as a ``BaseSAE`` and as a stock sae-lens SAE); with planted norm-10x
sinks that an SAE ruins, ``fit`` is perfect while ``all`` is not, and the recorded pass-through counts are the
planted ones; the config writes what ``positions`` asks for and names ``eval.core.positions`` when wrong.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from sae_bench.custom_saes.base_sae import BaseSAE

from tests.conftest import CONF, EVAL_CONTEXT, SAEBENCH_TINY_RUN_WARNINGS, make_documents

pytestmark = SAEBENCH_TINY_RUN_WARNINGS

HOOK = "blocks.1.hook_resid_post"  # the tiny store's hook (the last of 2 layers)
LAYER = 1
PLANT_LAYER = 0  # planted sinks go before the last layer, so that attention carries a ruined sink further
BATCH = 4
N_BATCHES = 2
N_CONTEXTS = BATCH * N_BATCHES  # every phase of core reads each context exactly once
SPECIAL_IDS = (0, 1, 2)  # <bos> <eos> <pad> of the tiny tokenizer (the tiny store's masked_token_ids)
SINK_EVERY, SINK_AT, SINK_SCALE = 7, 3, 10.0  # planted sinks: positions p % 7 == 3, norm x 10


class RuinsLargeNorms(BaseSAE):
    """An identity SAE (``W_enc = W_dec = I``, exact reconstruction) whose output is zero at every position of
    norm above ``threshold`` (None: never). ``encode``/``decode``: ``(..., d) -> (..., d)``."""

    def __init__(self, d: int, threshold: float | None, layer: int = LAYER):
        super().__init__(
            d, d, "tiny-local", layer, torch.device("cpu"), torch.float32, hook_name=f"blocks.{layer}.hook_resid_post"
        )
        with torch.no_grad():
            self.W_enc.copy_(torch.eye(d))
            self.W_dec.copy_(torch.eye(d))
        self.threshold = threshold
        self.cfg.context_size = EVAL_CONTEXT

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = z @ self.W_dec
        if self.threshold is None:
            return out
        return torch.where(out.norm(dim=-1, keepdim=True) > self.threshold, torch.zeros_like(out), out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _core_config() -> Any:
    """SAEBench's ``CoreEvalConfig`` as the runner builds it, at the tiny sizes."""
    from pipeline.evals.metrics.core import CoreRunner

    core = SimpleNamespace(
        batch_size_prompts=BATCH,
        n_eval_reconstruction_batches=N_BATCHES,
        n_eval_sparsity_variance_batches=N_BATCHES,
        dataset=None,
        context_size=EVAL_CONTEXT,
    )
    return CoreRunner().config(
        SimpleNamespace(eval=SimpleNamespace(core=core), model_name="tiny-local", llm_dtype="float32")
    )


def _contexts(model: Any, bos: bool, n: int = N_CONTEXTS, seed: int = 11) -> list[list[int]]:
    """``n`` contexts of ``EVAL_CONTEXT`` ids of generated text (with BOS between documents, or no special id)."""
    from pipeline.data.text import iter_contexts

    docs = make_documents(40, seed=seed)
    it = iter_contexts(docs, model.tokenizer, EVAL_CONTEXT, model.tokenizer.bos_token_id if bos else None)
    return [c for _, c in zip(range(n), it)]


def _core(sae: Any, model: Any, path: Path, rows: list[list[int]], rule: Any = None) -> dict[str, Any]:
    """Run the runner's ``run_core`` on ``rows``; the result JSON."""
    from datasets import Dataset

    from pipeline.evals.metrics.core import run_core
    from pipeline.evals.sae_records import SAERecord

    record = SAERecord("sae", {"name": "sae"}, sae=sae)
    run_core(record, model, path, _core_config(), Dataset.from_dict({"tokens": rows}), "cpu", fit_rule=rule)
    return json.loads(path.read_text())


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    """``group/name -> value`` of a core result's scalar metrics."""
    return {f"{g}/{k}": v for g, d in result["eval_result_metrics"].items() for k, v in d.items()}


@contextlib.contextmanager
def scaled(model: Any, hook: str, *regions: tuple[slice, slice, float]) -> Iterator[None]:
    """The activations ``(B, L, d)`` at ``hook`` of every batch scaled by ``factor`` in each ``(rows, positions,
    factor)`` region (a permanent hook, so SAEBench's own hooks see it; removed afterwards)."""
    point = model.hook_dict[hook]
    assert not point.fwd_hooks, "the shared tiny model already has hooks at this hook point"

    def scale(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        out = acts.clone()
        for rows, positions, factor in regions:
            out[rows, positions] *= factor
        return out

    point.add_hook(scale, dir="fwd", is_permanent=True)
    try:
        yield
    finally:
        point.remove_hooks("fwd", including_permanent=True)


# ------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("factor", [2.0, 1.0])  # 1.0: the median position itself is kept (<=, as the harvest)
def test_rule_is_the_harvests_position_by_position(eval_inputs, factor):
    """FitRule keeps exactly the rows ``_harvest_shard`` stores: the special ids, and the norm rule with the median
    per group of the harvest's batch_size contexts (a last partial group included). The first two contexts of
    every batch are scaled x3, so a median over another grouping leaves other positions out; every third position
    holds a special id and is scaled x3, so a median over all positions (not the kept ones) does too."""
    from pipeline.data.harvest import _harvest_shard
    from pipeline.evals.metrics.positions import FitRule

    model = eval_inputs["model"]
    rows = [[SPECIAL_IDS[2] if p % 3 == 0 else t for p, t in enumerate(r)] for r in _contexts(model, bos=True, n=10)]
    group = 4
    bar = SimpleNamespace(update=lambda n: None)
    tokens = torch.tensor(rows)
    with scaled(model, HOOK, (slice(0, 2), slice(None), 3.0), (slice(None), slice(0, None, 3), 3.0)):
        kept, counts = _harvest_shard(
            model, rows, 0, [HOOK], group, 0.0, torch.tensor(SPECIAL_IDS), factor, torch.float32, bar
        )
        acts = torch.cat(
            [
                model.run_with_cache(tokens[i : i + group], names_filter=[HOOK], stop_at_layer=LAYER + 1)[1][HOOK]
                for i in range(0, 10, group)
            ]
        )
    special, outlier = FitRule(SPECIAL_IDS, factor, group).left_out(tokens, acts)
    assert int(special.sum()) == counts[HOOK]["masked_special"] > 0
    assert int(outlier.sum()) == counts[HOOK]["masked_outlier"] > 0
    assert not bool((special & outlier).any())
    stored = kept[HOOK]["train"]
    assert torch.equal(acts[~(special | outlier)], stored["activations"])
    # the token ids kept beside the rows point at the same positions
    assert torch.equal(stored["positions"], (~(special | outlier)).reshape(-1).nonzero().squeeze(1))
    assert torch.equal(stored["token_ids"].long(), tokens)
    # no norm rule: only the special ids
    special2, outlier2 = FitRule(SPECIAL_IDS, None, group).left_out(tokens, acts)
    assert torch.equal(special2, special) and not bool(outlier2.any())


def test_rule_from_manifest(eval_inputs):
    from pipeline.data.store import ActivationStore
    from pipeline.evals.metrics.positions import FitRule

    manifest = ActivationStore(eval_inputs["store"]).manifest
    assert FitRule.from_manifest(manifest) == FitRule(SPECIAL_IDS, None, 8)  # the tiny store: no norm rule
    masking = {**manifest["masking"], "outlier_norm_factor": 3.0}
    assert FitRule.from_manifest({**manifest, "masking": masking}).outlier_norm_factor == 3.0
    with pytest.raises(ValueError, match="masked_token_ids"):
        FitRule.from_manifest({"masking": {}})


# ------------------------------------------------------------------------------ (a) nothing left out
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dictionary_sae", "sae_lens"])
def test_nothing_left_out_fit_equals_all(eval_inputs, tmp_path, kind):
    """Text without special ids and a norm rule that leaves nothing out: fit's numbers are all's."""
    from pipeline.core.dictionary import Dictionary
    from pipeline.evals.metrics.positions import FitRule
    from pipeline.saes.dictionary_sae import DictionarySAE

    model = eval_inputs["model"]
    sae = DictionarySAE(Dictionary.load(eval_inputs["fit"] / "dictionary"), "tiny-local", LAYER, HOOK)
    sae.cfg.context_size = EVAL_CONTEXT
    if kind == "sae_lens":  # the same dictionary as a stock sae-lens SAE (its matching_pursuit architecture)
        from sae_lens import SAE

        from pipeline.saes.sae_lens_io import save_sae_lens

        sae = SAE.load_from_disk(str(save_sae_lens(sae, tmp_path / "sl")), device="cpu")
    rows = _contexts(model, bos=False)
    assert not any(t in SPECIAL_IDS for r in rows for t in r)
    all_ = _core(sae, model, tmp_path / "all.json", rows)
    fit = _core(sae, model, tmp_path / "fit.json", rows, FitRule(SPECIAL_IDS, 100.0, 8))
    a, f = _metrics(all_), _metrics(fit)
    assert a.keys() == f.keys() and len(a) > 15
    for k in a:
        assert f[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    assert all_["eval_result_metrics"]["sparsity"]["l0"] > 0
    density = [x["feature_density"] for x in all_["eval_result_details"]]
    assert [x["feature_density"] for x in fit["eval_result_details"]] == pytest.approx(density, abs=1e-7)
    assert fit["eval_config"]["exclude_special_tokens_from_reconstruction"] is True
    assert all_["eval_result_unstructured"] == {}  # `all` is SAEBench's core untouched
    n = N_CONTEXTS * EVAL_CONTEXT
    assert fit["eval_result_unstructured"]["passed_through"] == {
        p: {"positions": n, "special": 0, "outlier": 0, "passed_through": 0}
        for p in ("reconstruction", "sparsity_variance")
    }


# ------------------------------------------------------------------------- (b)+(c) planted sinks
@pytest.mark.slow
def test_planted_sinks_fit_is_perfect_all_is_not(eval_inputs, tmp_path):
    """Norm-10x sinks planted at fixed positions; an SAE exact everywhere but zero on them. With the harvest's
    rule (factor 3) fit covers only the rest: perfect. all covers the sinks: ruined. The pass-through counts are
    the planted sinks + the special ids of the eval text."""
    from pipeline.evals.metrics.positions import FitRule

    model = eval_inputs["model"]
    hook = f"blocks.{PLANT_LAYER}.hook_resid_post"
    rows = _contexts(model, bos=True)
    tokens = torch.tensor(rows)
    _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=PLANT_LAYER + 1)
    natural = cache[hook].norm(dim=-1)
    assert float(natural.max() / natural.median()) < 2.0  # only the planted sinks exceed 3 x the median
    sae = RuinsLargeNorms(cache[hook].shape[-1], threshold=4 * float(natural.median()), layer=PLANT_LAYER)
    with scaled(model, hook, (slice(None), slice(SINK_AT, None, SINK_EVERY), SINK_SCALE)):
        all_ = _core(sae, model, tmp_path / "all.json", rows)
        fit = _core(sae, model, tmp_path / "fit.json", rows, FitRule(SPECIAL_IDS, 3.0, 8))
    a, f = _metrics(all_), _metrics(fit)

    # fit: exact reconstruction, the model's loss and outputs unchanged
    assert f["reconstruction_quality/explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert f["reconstruction_quality/mse"] == pytest.approx(0.0, abs=1e-8)
    assert f["reconstruction_quality/cossim"] == pytest.approx(1.0, abs=1e-5)
    assert f["model_behavior_preservation/kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
    mp = "model_performance_preservation/"
    assert f[mp + "ce_loss_with_sae"] == pytest.approx(f[mp + "ce_loss_without_sae"], abs=1e-5)
    assert f[mp + "ce_loss_score"] == pytest.approx(1.0, abs=1e-3)
    # all: the ruined sinks show
    assert a["reconstruction_quality/explained_variance"] < 0.9
    assert a["model_behavior_preservation/kl_div_with_sae"] > 1e-3
    assert abs(a[mp + "ce_loss_with_sae"] - a[mp + "ce_loss_without_sae"]) > 1e-3

    # (c) the counts: every context is read once per phase
    special = torch.isin(tokens, torch.tensor(SPECIAL_IDS))
    sink = torch.zeros_like(special)
    sink[:, SINK_AT::SINK_EVERY] = True
    want = {"positions": tokens.numel(), "special": int(special.sum()), "outlier": int((sink & ~special).sum())}
    want["passed_through"] = want["special"] + want["outlier"]
    assert want["special"] > 0 and want["outlier"] > 0
    got = fit["eval_result_unstructured"]
    assert got["passed_through"] == {"reconstruction": want, "sparsity_variance": want}
    assert got["rule"] == {"masked_token_ids": list(SPECIAL_IDS), "outlier_norm_factor": 3.0, "group_contexts": 8}
    assert "3 x the median norm" in got["covers"]
    # the fit file is SAEBench core's layout
    assert fit.keys() == all_.keys()
    assert {g: set(d) for g, d in fit["eval_result_metrics"].items()} == {
        g: set(d) for g, d in all_["eval_result_metrics"].items()
    }


# ------------------------------------------------------------------------------------- (d) config
def _ctx(eval_inputs: dict[str, Any], tmp_path: Path, positions: str) -> Any:
    """A context of the tiny store and text, with one planted-free identity SAE, ``eval.core.positions``."""
    from pipeline.data.config import ModelConfig
    from pipeline.data.store import ActivationStore
    from pipeline.data.text import TextSource
    from pipeline.evals.config import parse_eval_config
    from pipeline.evals.metrics import EvalContext
    from pipeline.evals.sae_records import SAERecord

    node = yaml.safe_load((CONF / "eval" / "smoke.yaml").read_text())
    node["core"].update(
        context_size=EVAL_CONTEXT,
        batch_size_prompts=BATCH,
        n_eval_reconstruction_batches=1,
        n_eval_sparsity_variance_batches=N_BATCHES,
        positions=positions,
    )
    node["cache"] = {"enabled": True, "root": str(tmp_path / "eval_cache")}  # this test's own: no entries of others
    e = parse_eval_config(node)
    model = eval_inputs["model"]
    sae = RuinsLargeNorms(model.cfg.d_model, threshold=None)
    return EvalContext(
        model=model,
        model_config=ModelConfig(name="tiny-local"),
        n_params=0,
        saes=[SAERecord("ident", {"name": "ident"}, sae=sae)],
        results_dir=tmp_path / "eval_results",
        artifacts_dir=tmp_path / "artifacts",
        device="cpu",
        llm_dtype="float32",
        llm_batch_size=8,
        force_rerun=False,
        store=ActivationStore(eval_inputs["store"]),
        text_source=TextSource(kind="files", paths=[str(eval_inputs["corpus"])]),
        labelled=None,
        eval=e,
        hub_reachable=False,
        info={"sizes": {}, "notes": []},
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "positions, folders", [("fit", {"core_fit_positions"}), ("both", {"core", "core_fit_positions"})]
)
def test_positions_writes_what_it_asks_for(eval_inputs, tmp_path, positions, folders):
    from pipeline.evals.metrics import MetricOutcome, run_metric

    ctx = _ctx(eval_inputs, tmp_path, positions)
    outcome = MetricOutcome()
    run_metric(ctx, "core", outcome)
    assert outcome.failed == [] and outcome.skipped == []
    assert {p.name for p in ctx.results_dir.iterdir()} == folders
    for f in folders:
        assert [p.name for p in (ctx.results_dir / f).iterdir()] == ["ident_custom_sae_eval_results.json"]
    assert ctx.info["sizes"]["core"]["positions"] == positions
    notes = {n["metric"]: n["note"] for n in ctx.info["notes"]}
    assert set(notes) == {"core_fit_positions"} | ({"core"} if positions == "both" else set())
    n = BATCH * EVAL_CONTEXT
    counts = ctx.info["sizes"]["core"]["fit_positions"]["ident"]["passed_through"]
    assert counts["reconstruction"]["positions"] == n and counts["sparsity_variance"]["positions"] == N_BATCHES * n
    assert (
        f"reconstruction batches: {counts['reconstruction']['passed_through']} of {n} positions passed through"
        in notes["core_fit_positions"]
    )
    assert "(the store had no outlier-norm rule)" in notes["core_fit_positions"]


@pytest.mark.parametrize("bad", ["fitted", "", "ALL"])
def test_bad_positions_names_the_key(bad):
    from pipeline.evals.config import parse_eval_config

    node = yaml.safe_load((CONF / "eval" / "smoke.yaml").read_text())
    node["core"]["positions"] = bad
    with pytest.raises(ValueError, match=r"eval\.core\.positions.*all, fit, both"):
        parse_eval_config(node)


def test_presets_ask_for_both():
    """Every eval preset, as composed, reports core on every position and on the fit's (``both``)."""
    from pipeline.evals.config import parse_eval_config

    for preset in ("offline_small", "smoke", "paper"):
        assert (
            parse_eval_config(yaml.safe_load((CONF / "eval" / f"{preset}.yaml").read_text())).core.positions == "both"
        )
