"""Core's reconstruction metrics with the zero-ablation half computed once (``pipeline.evals.metrics.recons_loss``).

Pinned to SAEBench's own ``get_recons_loss`` on the plain model: all five per-token tensors equal bit for bit, for
SAEs that reconstruct differently, with and without positions passed through; the zero-ablated forward runs once
per batch whatever the number of SAEs; anything the stand-in does not cover goes to SAEBench's function.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from tests.evals.test_core_positions import LAYER, RuinsLargeNorms
from tests.evals.test_shared_forwards import _tokens

HOOK = f"blocks.{LAYER}.hook_resid_post"


def _saebench() -> Any:
    import sae_bench.evals.core.main as core

    return core.get_recons_loss


def test_kl_is_saebench_s_formula():
    """The installed SAEBench computes its KL with the operations :func:`kl` repeats (so the same bits)."""
    src = inspect.getsource(_saebench())
    for line in (
        "original_probs = torch.nn.functional.softmax(original_logits, dim=-1)",
        "log_original_probs = torch.log(original_probs)",
        "new_probs = torch.nn.functional.softmax(new_logits, dim=-1)",
        "log_new_probs = torch.log(new_probs)",
        "kl_div = original_probs * (log_original_probs - log_new_probs)",
        "kl_div = kl_div.sum(dim=-1)",
        "recons_kl_div = kl(original_logits, recons_logits)",
        "zero_abl_kl_div = kl(original_logits, zero_abl_logits)",
    ):
        assert line in src, line


@pytest.mark.parametrize("exclude", [False, True])
def test_equals_saebench_bit_for_bit_and_ablates_once(eval_inputs, exclude):
    from pipeline.evals.metrics.recons_loss import shared_recons_loss
    from pipeline.evals.metrics.shared_forwards import SharedForwards

    model = eval_inputs["model"]
    d = model.cfg.d_model
    tokens = _tokens(model, n=3, length=16)
    ignore = {int(tokens[0, 3]), int(tokens[1, 5])}  # positions passed through when ``exclude``
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    half = float(cache[HOOK].norm(dim=-1).median())
    saes = [RuinsLargeNorms(d, threshold=t) for t in (None, 0.0, half)]  # exact, zero, half zero
    shared = SharedForwards(model, cap_mb=64, hook=HOOK)
    ours = shared_recons_loss(_saebench())
    kw = dict(compute_kl=True, compute_ce_loss=True, ignore_tokens=ignore)
    for sae in saes:
        want = _saebench()(sae, model, tokens, None, exclude_special_tokens_from_reconstruction=exclude, **kw)
        got = ours(sae, shared, tokens, None, exclude_special_tokens_from_reconstruction=exclude, **kw)
        assert got.keys() == want.keys() and len(want) == 5
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    kl_sae, kl_zero = want["kl_div_with_sae"], want["kl_div_with_ablation"]
    assert 0 < float(kl_sae.sum()) < float(kl_zero.sum())  # the last SAE changes the predictions, less than zero
    # per SAE: the clean forward (run once, then reused) and the splice from the hook; the zero ablation once
    assert shared.stats.started_at_hook == len(saes)
    assert shared.stats.forwards_run == 1 + 1 + len(saes) and shared.stats.forwards_reused == 2 * (len(saes) - 1)


def test_the_memo_is_saved_and_read_by_another_run(eval_inputs, tmp_path):
    from pipeline.evals.metrics.recons_loss import shared_recons_loss
    from pipeline.evals.metrics.shared_forwards import SharedForwards

    model = eval_inputs["model"]
    tokens = _tokens(model, n=2, length=12)
    sae = RuinsLargeNorms(model.cfg.d_model, threshold=0.0)
    kw = dict(compute_kl=True, compute_ce_loss=True)
    first = SharedForwards(model, cap_mb=64, hook=HOOK)
    want = shared_recons_loss(_saebench())(sae, first, tokens, None, **kw)
    first.save(tmp_path)
    second = SharedForwards(model, cap_mb=64, hook=HOOK)
    second.load(tmp_path)
    got = shared_recons_loss(_saebench())(sae, second, tokens, None, **kw)
    # read back: the clean forward and the ablated KL and CE; run: only the splice, from the hook
    assert second.stats.forwards_reused == 2 and second.stats.forwards_run == second.stats.started_at_hook == 1
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_what_it_does_not_cover_goes_to_saebench(eval_inputs):
    """A model that keeps nothing, extra model arguments or a hook with a head dimension: SAEBench's function."""
    from pipeline.evals.metrics.recons_loss import shared_recons_loss
    from pipeline.evals.metrics.shared_forwards import SharedForwards

    model = eval_inputs["model"]
    calls: list[Any] = []
    ours = shared_recons_loss(lambda *a, **k: calls.append((a, k)) or {})
    sae = RuinsLargeNorms(model.cfg.d_model, threshold=None)
    tokens = _tokens(model)
    kw = dict(compute_kl=True, compute_ce_loss=True)
    ours(sae, model, tokens, None, **kw)
    ours(sae, SharedForwards(model, cap_mb=0, hook=HOOK), tokens, None, **kw)
    ours(sae, SharedForwards(model, cap_mb=64, hook=HOOK), tokens, None, model_kwargs={"x": 1}, **kw)
    sae.cfg.hook_name = "blocks.1.attn.hook_z"
    ours(sae, SharedForwards(model, cap_mb=64, hook=HOOK), tokens, None, **kw)
    assert len(calls) == 4


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("positions", [(3, 37), (1, 33), (2, 16), (1, 1), (1, 65)])
def test_chunked_kl_equals_the_whole_tensor_s(positions, threads):
    """:func:`kl` in chunks of positions gives SAEBench's formula on the whole tensor bit for bit (chunk ends that
    leave one row, fewer rows than a chunk, a single position), on 1 and 2 threads."""
    from pipeline.evals.metrics.recons_loss import KL_CHUNK_ROWS, _kl_rows, kl

    g = torch.Generator().manual_seed(sum(positions))
    a = torch.randn(*positions, 3001, generator=g) * 4
    b = a + torch.randn(a.shape, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, want = kl(a, b), _kl_rows(a, b)
    finally:
        torch.set_num_threads(before)
    assert KL_CHUNK_ROWS < 37 * 3 and got.shape == positions
    torch.testing.assert_close(got, want, rtol=0, atol=0)
