"""SAEBench core's SAE-independent forwards, run once for every SAE and position set (``eval.core.reuse_forwards_mb``).

Pinned to the unshared run: with forwards reused, every core metric of two different SAEs on both position sets
equals the run that recomputes everything, and exactly the SAE-independent calls are answered from memory (the
counts follow from SAEBench's calls per batch). Unit checks: a hit is a copy, the SAE splice always runs, the cap
holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import SAEBENCH_TINY_RUN_WARNINGS
from tests.evals.test_core_positions import N_BATCHES, RuinsLargeNorms, _ctx

pytestmark = SAEBENCH_TINY_RUN_WARNINGS


def _tokens(model: Any, n: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, model.cfg.d_vocab, (n, length), generator=torch.Generator().manual_seed(0))


def _zero_hook_like_saebench() -> Any:
    """A hook with the qualified name of SAEBench's zero ablation (``get_recons_loss``'s local function)."""

    def standard_zero_ablate_hook(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(acts)

    standard_zero_ablate_hook.__qualname__ = "get_recons_loss.<locals>.standard_zero_ablate_hook"
    return standard_zero_ablate_hook


def _splice_like_saebench(scale: float) -> Any:
    """An SAE splice with the qualified name of SAEBench's (``get_recons_loss``'s replacement hook), wrapped in
    ``functools.partial`` as SAEBench passes it."""
    from functools import partial

    def standard_replacement_hook(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        return acts * scale + 0.25

    standard_replacement_hook.__qualname__ = "get_recons_loss.<locals>.standard_replacement_hook"
    return partial(standard_replacement_hook)


def test_saebench_hook_names_are_the_ones_matched():
    """The qualified names matched are the ones the installed SAEBench gives its zero-ablation and splice hooks,
    and the splice is passed as the only hook at the SAE's hook name."""
    import inspect

    import sae_bench.evals.core.main as core

    from pipeline.evals.metrics.shared_forwards import SAE_INDEPENDENT_HOOKS, SPLICE_HOOK

    src = inspect.getsource(core.get_recons_loss)
    for qualname in (*SAE_INDEPENDENT_HOOKS, SPLICE_HOOK):
        outer, _, name = qualname.partition(".<locals>.")
        assert outer == "get_recons_loss" and f"def {name}(" in src
    assert "torch.zeros_like(activations)" in src
    assert "fwd_hooks=[(hook_name, partial(replacement_hook))]" in src


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre"])
def test_splice_from_the_kept_residual_equals_the_full_forward(eval_inputs, hook):
    """The splice run from the hook gives the full forward's logits and per-token loss bit for bit."""
    from pipeline.evals.metrics.shared_forwards import SharedForwards

    model = eval_inputs["model"]
    tokens = _tokens(model, n=3, length=16)
    splice = _splice_like_saebench(0.5)
    want = model.run_with_hooks(tokens, return_type="both", loss_per_token=True, fwd_hooks=[(hook, splice)])
    shared = SharedForwards(model, cap_mb=64, hook=hook)
    shared(tokens, return_type="both", loss_per_token=True)  # the clean forward keeps the residual
    got = shared.run_with_hooks(tokens, return_type="both", loss_per_token=True, fwd_hooks=[(hook, splice)])
    assert shared.stats.started_at_hook == 1
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    # other tokens (no residual kept), another hook point, or a hook of another name: the full forward
    shared.run_with_hooks(tokens.flip(0), return_type="logits", fwd_hooks=[(hook, splice)])
    shared.run_with_hooks(tokens, return_type="logits", fwd_hooks=[("blocks.0.hook_resid_post", splice)])
    shared.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook, lambda a, hook: a * 0.5)])
    assert shared.stats.started_at_hook == 1


def test_saved_forwards_answer_a_new_process(eval_inputs, tmp_path):
    """What one run kept, written and read back by another wrapper, answers its calls with the same tensors."""
    from pipeline.evals.metrics.shared_forwards import FORWARD_SUFFIX, SharedForwards

    model = eval_inputs["model"]
    hook = "blocks.1.hook_resid_post"
    tokens = _tokens(model)
    first = SharedForwards(model, cap_mb=64, hook=hook)
    clean = first(tokens, return_type="both", loss_per_token=True)
    _, cache = first.run_with_cache(tokens, names_filter=[hook], stop_at_layer=2)
    zero = _zero_hook_like_saebench()
    ablated = first.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook, zero)])
    written = first.save(tmp_path)
    assert len(written) == 4 and first.save(tmp_path) == []  # clean, residual, cache, ablated; kept once
    assert all(p.name.endswith(FORWARD_SUFFIX) for p in written)

    second = SharedForwards(model, cap_mb=64, hook=hook)
    assert second.load(tmp_path) == 4
    again = second(tokens, return_type="both", loss_per_token=True)
    _, cache2 = second.run_with_cache(tokens, names_filter=[hook], stop_at_layer=2)
    ablated2 = second.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook, zero)])
    splice = _splice_like_saebench(2.0)
    second.run_with_hooks(tokens, return_type="both", loss_per_token=True, fwd_hooks=[(hook, splice)])
    assert second.stats.forwards_reused == 3 and second.stats.started_at_hook == 1
    assert type(again) is type(clean) and type(cache2) is type(cache)
    torch.testing.assert_close(again.logits, clean.logits, rtol=0, atol=0)
    torch.testing.assert_close(again.loss, clean.loss, rtol=0, atol=0)
    torch.testing.assert_close(cache2[hook], cache[hook], rtol=0, atol=0)
    torch.testing.assert_close(ablated2, ablated, rtol=0, atol=0)
    assert SharedForwards(model, cap_mb=0, hook=hook).load(tmp_path) == 0  # the cap holds on load too


def test_hit_equals_the_forward_and_is_a_copy(eval_inputs):
    from pipeline.evals.metrics.shared_forwards import SharedForwards

    model = eval_inputs["model"]
    tokens = _tokens(model)
    shared = SharedForwards(model, cap_mb=64)
    first = shared(tokens, return_type="both", loss_per_token=True)
    first.logits.add_(1.0)  # the caller edits its result: a later hit must not see it
    second = shared(tokens.clone(), return_type="both", loss_per_token=True)
    want = model(tokens, return_type="both", loss_per_token=True)
    assert type(second) is type(want)
    torch.testing.assert_close(second.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(second.loss, want.loss, rtol=0, atol=0)
    hook = "blocks.1.hook_resid_post"
    _, c1 = shared.run_with_cache(tokens, names_filter=[hook], stop_at_layer=2)
    _, c2 = shared.run_with_cache(tokens, names_filter=[hook], stop_at_layer=2)
    _, c0 = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=2)
    torch.testing.assert_close(c2[hook], c0[hook], rtol=0, atol=0)
    assert c1[hook] is not c2[hook]
    other = _tokens(model).flip(0)  # other tokens: a new forward
    shared(other, return_type="both", loss_per_token=True)
    assert shared.stats.forwards_run == 3 and shared.stats.forwards_reused == 2


def test_only_the_zero_ablation_is_reused(eval_inputs):
    from pipeline.evals.metrics.shared_forwards import SharedForwards

    model = eval_inputs["model"]
    tokens = _tokens(model)
    hook = "blocks.1.hook_resid_post"
    shared = SharedForwards(model, cap_mb=64)
    splice = lambda acts, hook: acts * 0.5  # noqa: E731  (an SAE's replacement: never reused)
    for _ in range(2):
        shared.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook, splice)])
    assert shared.stats.forwards_run == 2 and shared.stats.forwards_reused == 0
    zero = _zero_hook_like_saebench()
    a = shared.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook, zero)])
    b = shared.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook, zero)])
    assert shared.stats.forwards_run == 3 and shared.stats.forwards_reused == 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the zero ablation at another hook point is another forward
    shared.run_with_hooks(tokens, return_type="logits", fwd_hooks=[("blocks.0.hook_resid_post", zero)])
    assert shared.stats.forwards_run == 4


def test_cap_is_held(eval_inputs):
    from pipeline.evals.metrics.shared_forwards import SharedForwards

    model = eval_inputs["model"]
    tokens = _tokens(model)
    none = SharedForwards(model, cap_mb=0)
    for _ in range(2):
        none(tokens, return_type="logits")
    assert (none.stats.forwards_run, none.stats.forwards_reused, none.stats.not_stored) == (2, 0, 2)
    one_mb = model(tokens, return_type="logits").numel() * 4 / 2**20
    tight = SharedForwards(model, cap_mb=1.5 * one_mb)  # room for one result, not two
    tight(tokens, return_type="logits")
    tight(tokens.flip(0), return_type="logits")
    tight(tokens, return_type="logits")
    assert (tight.stats.forwards_run, tight.stats.forwards_reused, tight.stats.not_stored) == (2, 1, 1)
    assert tight.stats.stored_mb == pytest.approx(one_mb)


def _run_core(eval_inputs: dict[str, Any], tmp_path: Path, reuse_mb: float) -> tuple[dict[str, Any], dict]:
    """Core on both position sets for two SAEs that reconstruct differently; ``{file: metrics}`` and the
    reuse counts."""
    from pipeline.evals.metrics import MetricOutcome, run_metric
    from pipeline.evals.sae_records import SAERecord

    ctx = _ctx(eval_inputs, tmp_path, "both")
    ctx.eval.core.reuse_forwards_mb = reuse_mb
    d = ctx.model.cfg.d_model
    ctx.saes.append(
        SAERecord("ruins", {"name": "ruins"}, sae=RuinsLargeNorms(d, threshold=0.0))
    )  # zero output: ablation
    outcome = MetricOutcome()
    run_metric(ctx, "core", outcome)
    assert outcome.failed == [] and outcome.skipped == []
    out = {}
    for f in sorted(ctx.results_dir.rglob("*.json")):
        r = json.loads(f.read_text())
        out[f"{f.parent.name}/{f.name}"] = (r["eval_result_metrics"], r["eval_result_details"])
    return out, ctx.info["sizes"]["core"]["shared_forwards"]


@pytest.mark.slow
def test_core_with_reused_forwards_equals_core_recomputed(eval_inputs, tmp_path):
    shared, stats = _run_core(eval_inputs, tmp_path / "shared", reuse_mb=256)
    alone, none = _run_core(eval_inputs, tmp_path / "alone", reuse_mb=0)
    assert len(shared) == 4 and shared.keys() == alone.keys()
    for name in shared:
        assert shared[name] == alone[name], name
    metrics = shared["core/ruins_custom_sae_eval_results.json"][0]
    assert metrics["model_performance_preservation"]["ce_loss_score"] < 0.99  # the two SAEs differ
    # Per SAE, SAEBench's core makes 3 forwards per reconstruction batch (clean, spliced, zero-ablated) and one
    # per sparsity batch; the fit positions add one run to the hook per batch (MarkedTokens). Shared: the clean
    # and zero-ablated forwards and the two kinds of run to the hook run once; every splice runs.
    r, s, n_saes = 1, N_BATCHES, 2
    calls = n_saes * ((3 * r + s) + (3 * r + s + r + s))
    assert none["forwards_run"] == calls and none["forwards_reused"] == 0
    run = (2 * r + s + (r + s)) + n_saes * 2 * r
    assert stats["forwards_run"] == run and stats["forwards_reused"] == calls - run
    assert stats["not_stored"] == 0 and stats["stored_mb"] > 0
    # every splice starts at the hook: the clean forward of each batch ran (and kept the residual) before it
    assert stats["started_at_hook"] == n_saes * 2 * r and none["started_at_hook"] == 0
