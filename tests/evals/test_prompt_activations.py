"""Absorption's prompt lists run once (:mod:`pipeline.evals.metrics.prompt_activations`): the activations at the
hook equal the full forward's bit for bit, a repeat is answered from memory, other calls pass through, and what
one wrapper kept answers another after a save and a load."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SAEBENCH_TINY_RUN_WARNINGS

pytestmark = SAEBENCH_TINY_RUN_WARNINGS

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["tiny words here", "some other text", "a"]


def test_activations_equal_the_full_forward_and_repeats_are_reused(eval_inputs):
    from pipeline.evals.metrics.prompt_activations import PromptActivations

    model = eval_inputs["model"]
    want = model.run_with_cache(PROMPTS, names_filter=[HOOK])[1][HOOK]
    acts = PromptActivations(model, cap_mb=16)
    first = acts.run_with_cache(PROMPTS, names_filter=[HOOK])
    assert first[0] is None  # no logits: a caller reading them fails loudly
    torch.testing.assert_close(first[1][HOOK], want, rtol=0, atol=0)
    first[1][HOOK].add_(1.0)  # the caller edits its result: a later hit must not see it
    again = acts.run_with_cache(list(PROMPTS), names_filter=[HOOK])[1][HOOK]
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    assert (acts.stats.runs, acts.stats.reused) == (1, 1)
    # other prompts, another call form, a non-residual hook: run by the model as asked
    acts.run_with_cache(PROMPTS[::-1], names_filter=[HOOK])
    logits, _ = acts.run_with_cache(PROMPTS, names_filter=[HOOK], stop_at_layer=None)
    assert logits is not None
    acts.run_with_cache(PROMPTS, names_filter=["blocks.1.hook_mlp_out"])
    assert (acts.stats.runs, acts.stats.passed_on) == (2, 2)


def test_saved_activations_answer_another_wrapper_and_the_cap_holds(eval_inputs, tmp_path):
    from pipeline.evals.metrics.prompt_activations import ACTS_SUFFIX, PromptActivations

    model = eval_inputs["model"]
    first = PromptActivations(model, cap_mb=16)
    want = first.run_with_cache(PROMPTS, names_filter=[HOOK])[1][HOOK]
    written = first.save(tmp_path)
    assert len(written) == 1 and written[0].name.endswith(ACTS_SUFFIX) and first.save(tmp_path) == []
    second = PromptActivations(model, cap_mb=16)
    assert second.load(tmp_path) == 1
    torch.testing.assert_close(second.run_with_cache(PROMPTS, names_filter=[HOOK])[1][HOOK], want, rtol=0, atol=0)
    assert (second.stats.runs, second.stats.reused) == (0, 1)
    assert PromptActivations(model, cap_mb=0).load(tmp_path) == 0
    written[0].rename(tmp_path / f"{'0' * 64}{ACTS_SUFFIX}")  # a file whose name is not its key
    with pytest.raises(ValueError, match="does not match"):
        PromptActivations(model, cap_mb=16).load(tmp_path)
