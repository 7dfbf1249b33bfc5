"""SCR/TPP's latent ablations with each batch's codes computed once (``pipeline.evals.metrics.ablation_codes``).

Pinned to SAEBench's own ``ablated_precomputed_activations``: over a sequence of ablations on the same
activations, as ``perform_feature_ablations`` makes them, every result equals SAEBench's bit for bit, while each
batch is encoded once.
"""

from __future__ import annotations

from typing import Any

import torch

D, F, B, L = 24, 96, 10, 7


class CountingSAE:
    """A ReLU SAE with random weights that counts its encodes: ``encode: (..., D) -> (..., F)``."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.W_enc = torch.randn(D, F, generator=g)
        self.b_enc = torch.randn(F, generator=g) * 0.5 - 0.5
        self.W_dec = torch.randn(F, D, generator=g) / F**0.5
        self.b_dec = torch.randn(D, generator=g) * 0.1
        self.encodes = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.encodes += 1
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec


def _acts(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(B, L, D, generator=g)
    acts[:, 5:] = 0.0  # padding positions, zeroed as SAEBench's caller does
    acts[3, 2:] = 0.0
    return acts


def test_equals_saebench_bit_for_bit_and_encodes_each_batch_once():
    import sae_bench.evals.scr_and_tpp.main as st

    from pipeline.evals.metrics.ablation_codes import CodesMemo, ablated_activations

    sae = CountingSAE()
    classes = {"a": _acts(1), "b": _acts(2)}
    memo = CodesMemo()
    batch = 4  # batches of 4, 4, 2
    n_calls = 0
    for n in (1, 5, 30):
        to_ablate = torch.zeros(F, dtype=torch.bool)
        to_ablate[torch.randperm(F, generator=torch.Generator().manual_seed(n))[:n]] = True
        for acts in classes.values():
            want = st.ablated_precomputed_activations(acts, sae, to_ablate, batch)
            got = ablated_activations(memo, acts, sae, to_ablate, batch)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            n_calls += 1
    assert memo.computed == 2 * 3 and memo.reused == (n_calls - 2) * 3
    # SAEBench encoded every batch of every call; the memo, each batch once
    assert sae.encodes == n_calls * 3 + memo.computed


def test_memo_copies_codes_and_tells_tensors_apart():
    from pipeline.evals.metrics.ablation_codes import CodesMemo

    sae, memo = CountingSAE(), CodesMemo()
    acts = _acts(3)
    f, _ = memo.codes_and_error(sae, acts, 0, 4)
    f.zero_()  # the caller zeroes latents in place: the memo keeps its own
    again, _ = memo.codes_and_error(sae, acts, 0, 4)
    torch.testing.assert_close(again, sae.encode(acts[:4]), rtol=0, atol=0)
    memo.codes_and_error(sae, acts.clone(), 0, 4)  # equal values, another tensor: computed again
    assert memo.computed == 2 and memo.reused == 1


def test_the_stand_in_is_installed_for_perform_feature_ablations_only():
    """Inside the context, ``perform_feature_ablations`` finds the memo's ablation function; around it, and after
    the context, SAEBench's own functions are back."""
    import sae_bench.evals.scr_and_tpp.main as st

    from pipeline.evals.metrics.ablation_codes import _with_memo, shared_codes_ablations

    original_perform, original_ablated = st.perform_feature_ablations, st.ablated_precomputed_activations
    seen: list[Any] = []
    with shared_codes_ablations():
        assert st.perform_feature_ablations is not original_perform
        _with_memo(st, lambda: seen.append(st.ablated_precomputed_activations))()
        assert st.ablated_precomputed_activations is original_ablated
    assert seen and seen[0] is not original_ablated
    assert st.perform_feature_ablations is original_perform and st.ablated_precomputed_activations is original_ablated
