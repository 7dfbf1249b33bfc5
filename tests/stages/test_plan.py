"""``python -m stages.plan``: the paper presets' planned memory at their real sizes, with nothing loaded.

The plan's figures follow from the composed preset and the published shapes (``tests/data/test_model_shapes.py``);
here: the store's size on disk against a real harvested store, the coder's and the atom update's per-row
constants against the library's own, each stage's terms on both presets, the command line, and the committed
``benchmarks/results_preset_plan.json`` (the README's figures) against a fresh computation.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from pipeline.data.architectures import GEMMA_2_2B, PYTHIA_160M_DEDUPED
from pipeline.runs import plan as P
from stages import plan as plan_cli
from tests.conftest import REPO, make_documents

PRESETS = {"gemma2b_paper": GEMMA_2_2B, "pythia160m_paper": PYTHIA_160M_DEDUPED}


@pytest.fixture(scope="module")
def plans() -> dict[str, P.Plan]:
    return {preset: plan_cli.plan([f"experiment={preset}"]) for preset in PRESETS}


def terms(stage: P.StagePlan) -> dict[str, int]:
    return {t.name: t.bytes for t in stage.terms}


def stage(plan: P.Plan, name: str, ranks: int) -> P.StagePlan:
    return next(s for s in plan.stages if s.stage == name and s.ranks == ranks)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_store_at_the_presets_sizes(plans, preset):
    p, arch = plans[preset], PRESETS[preset]
    store_bytes = {"gemma2b_paper": 2, "pythia160m_paper": 4}[preset]  # bf16 store for the bf16 model, else fp32
    layer = {"gemma2b_paper": 12, "pythia160m_paper": 8}[preset]
    assert p.hooks == (f"blocks.{layer}.hook_resid_post",)
    s = p.store
    assert s.contexts == 21_875 and s.heldout_contexts == 136  # ceil(2.8 M / 128), floor(21,875 × 0.00625)
    assert s.train_rows == (21_875 - 136) * 127 and s.heldout_rows == 136 * 127  # each context's BOS left out
    assert s.bytes_per_token == arch.d_model * store_bytes
    assert s.disk_bytes == (s.train_rows + s.heldout_rows) * (s.bytes_per_token + 8) + 21_875 * (4 * 128 + 8)
    assert s.fp32_bytes == s.train_rows * arch.d_model * 4 and s.in_memory_needs_free == 4 * s.fp32_bytes


def test_gemma_is_streamed_on_an_h100_and_held_on_an_h200(plans):
    assert plans["gemma2b_paper"].store.in_memory_on() == {"H100 80GB": False, "H200 141GB": True}
    assert plans["pythia160m_paper"].store.in_memory_on() == {"H100 80GB": True, "H200 141GB": True}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_stage_holds_what_its_config_says(plans, preset):
    p, arch = plans[preset], PRESETS[preset]
    mb = {"gemma2b_paper": 2, "pythia160m_paper": 4}[preset]
    harvest = terms(stage(p, "harvest", 1))
    assert harvest["model weights (HookedTransformer)"] == arch.tl_params() * mb
    assert terms(stage(p, "harvest", 8)) == harvest  # every rank loads the model
    one, eight = terms(stage(p, "fit streamed", 1)), terms(stage(p, "fit streamed", 8))
    K, d = 16384, arch.d_model
    assert one["dictionary"] == eight["dictionary"] == K * d * 4
    assert one["Gram matrix, old and new"] == 2 * K * K * 4
    assert one["streamed batch (this rank's rows)"] == 65536 * d * 4 == 8 * eight["streamed batch (this rank's rows)"]
    assert one["coder working set"] == 8 * eight["coder working set"]  # each rank codes 1/8 of every batch
    assert one["codes + the update's sorted entries"] == 65536 * 41 * 36  # k + 1 slots: the reference's rules
    held = terms(stage(p, "fit in memory", 8))
    assert held["store in memory (fp32, whole on every rank)"] == p.store.fp32_bytes
    evaluate = terms(stage(p, "evaluate", 1))
    assert evaluate["core logits"] == P.CORE_LIVE_LOGITS * 16 * 128 * arch.d_vocab * mb
    assert stage(p, "evaluate", 8).where == "rank 0" and terms(stage(p, "evaluate", 8)) == evaluate
    for s in p.stages:  # every preset stage fits an 80 GB GPU but the Gemma fit with its store in memory, which
        # the fit only chooses on a GPU with >= 102 GB free (the test above)
        assert s.fits()["H200 141GB"]


def test_the_coder_and_update_constants_are_the_librarys(monkeypatch):
    """:func:`~pipeline.runs.plan.coder_row_bytes` is what ``auto_chunk_size`` divides a third of free memory by;
    the block budget and the chunk cap are the library's."""
    import torch

    from pipeline.core import atom_update, coders

    cuda = torch.device("cuda")
    for K, k, method, candidates in ((16384, 40, "mp", None), (4096, 20, "omp", None), (16384, 40, "mp", 512)):
        row = P.coder_row_bytes(K, k, method, candidates)
        monkeypatch.setattr(coders, "free_memory", lambda device, row=row: 3 * 1000 * row)
        assert coders.auto_chunk_size(K, k, method, candidates, cuda) == 1000
        monkeypatch.setattr(coders, "free_memory", lambda device, row=row: 3 * 1000 * row - 3)
        assert coders.auto_chunk_size(K, k, method, candidates, cuda) == 999
    monkeypatch.setattr(coders, "free_memory", lambda device: 1 << 50)
    assert coders.auto_chunk_size(16384, 40, "mp", None, cuda) == P.CODER_CHUNK_CAP
    assert atom_update._GATHER_BUDGET["cuda"] == P.UPDATE_BLOCK_ENTRIES


def test_the_disk_formula_matches_a_harvested_store(tiny_hooked_model, tmp_path):
    """Rows, positions and token ids as the plan counts them are the shard files' tensor bytes."""
    from pipeline.data.harvest import harvest
    from pipeline.data.store import ActivationStore

    L, n_tokens = 16, 16 * 40
    out = harvest(
        tiny_hooked_model,
        make_documents(30),
        tmp_path / "store",
        hooks=["blocks.1.hook_resid_post"],
        n_tokens=n_tokens,
        context_length=L,
        batch_size=4,
        shard_rows=128,
        heldout_fraction=0.1,
        dtype="bfloat16",
        progress=False,
    )
    store = ActivationStore(out)
    planned = P.store_plan(store.d, n_tokens, L, 0.1, 2)
    rows = store.n_rows() + store.n_rows("heldout")
    assert store.n_rows() <= planned.train_rows and store.n_rows("heldout") <= planned.heldout_rows
    tensor_bytes = 0
    for file in Path(out).rglob("*.safetensors"):
        data = file.read_bytes()
        tensor_bytes += len(data) - 8 - struct.unpack("<Q", data[:8])[0]  # less the header
    assert tensor_bytes == rows * (store.d * 2 + 8) + planned.contexts * (4 * L + 8)


def test_the_command_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    plan_cli.main(["experiment=gemma2b_paper", f"output_root={tmp_path / 'runs'}", "--json", str(out)])
    text = capsys.readouterr().out
    assert "d_model 2304, 26 layers, vocab 256,000" in text and "fit streamed, 8 GPUs, each rank" in text
    assert "left out:" in text
    doc = json.loads(out.read_text())
    assert doc["stages"]["8"]["fit streamed"]["total_bytes"] < doc["stages"]["1"]["fit streamed"]["total_bytes"]
    assert not (tmp_path / "runs").exists()  # composed, not run: no Hydra folder


def test_a_model_without_shapes_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        plan_cli.main([])  # the offline default: SmolLM2-135M
    assert exc.value.code == 2 and "no published shapes for model 'smollm2-135m'" in capsys.readouterr().err


def test_the_committed_plan_is_current():
    """``benchmarks/results_preset_plan.json`` (the README's figures) is what the plan computes now; after changing
    a preset or the plan: ``python benchmarks/bench_preset_plan.py``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_preset_plan", REPO / "benchmarks" / "bench_preset_plan.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    committed = (REPO / "benchmarks" / "results_preset_plan.json").read_text(encoding="utf-8")
    assert committed == bench.render_json(bench.preset_plans()), "re-run python benchmarks/bench_preset_plan.py"
