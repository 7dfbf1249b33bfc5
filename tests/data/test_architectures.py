"""The paper presets' architectures through the harvest's loader: a local Gemma-2 or GPT-NeoX folder converts to
transformer-lens by the architecture its ``config.json`` declares, as the preset's model would load from
``model.path``, and its hooks and logits equal the Hugging Face model's.

Tolerance: fp32 throughout; ``blocks.<layer>.hook_resid_post`` at the preset's hook layer and the logits within
``atol = rtol = 1e-4`` of HF's ``hidden_states[layer + 1]`` and logits (measured: at most 1.6e-5 on residuals of
magnitude ~19, 3.7e-6 on logits), on a context three times Gemma-2's toy sliding window. Each feature that makes
an architecture itself is then left out in turn: the match must break by at least :data:`BREAK` (100 times the
tolerance), so these tests catch a conversion that drops it (soft-capping, the window, the layer order, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.data.models import load_model
from pipeline.data.tl_configs import gemma2_attn_types, local_tl_config
from tests.conftest import compose_config, make_sentences
from tests.toy_models import (
    PAPER_PRESETS,
    TOY_ATTN_SOFTCAP,
    TOY_LOGIT_SOFTCAP,
    TOY_SLIDING_WINDOW,
    TOY_WIDTH,
    preset_layer,
)

TOL = {"atol": 1e-4, "rtol": 1e-4}
BREAK = 1e-2
"""The least a left-out feature must move the residual or the logits (max abs difference)."""
N_TOKENS = 3 * TOY_SLIDING_WINDOW
PRESETS = sorted(PAPER_PRESETS)


def hf_model(path: Path) -> Any:
    """The HF reference: the folder in fp32 with eager attention (the only one that soft-caps scores)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def loaded(toy_paper_dirs) -> dict[str, dict[str, Any]]:
    """Per preset: the toy loaded as the harvest loads the preset's model (its ``model.name`` with
    ``model.path``), the HF model, tokens of a context longer than the window, and HF's outputs on them."""
    out = {}
    for preset, path in toy_paper_dirs.items():
        model = load_model(compose_config(f"experiment={preset}").model.name, path=path)
        hf = hf_model(path)
        tokens = model.to_tokens([" ".join(make_sentences(40, seed=9))])[:, :N_TOKENS]
        assert tokens.shape[1] == N_TOKENS
        with torch.inference_mode():
            ref = hf(tokens, output_hidden_states=True)
        out[preset] = {"path": path, "model": model, "hf": hf, "tokens": tokens, "ref": ref}
    return out


def resid_and_logits(model: Any, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    hook = f"blocks.{layer}.hook_resid_post"
    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens, names_filter=[hook])
    return cache[hook], logits


@pytest.mark.parametrize("preset", PRESETS)
def test_hooks_and_logits_equal_the_hf_model(loaded, preset):
    toy, layer = loaded[preset], preset_layer(preset)
    assert toy["model"].cfg.original_architecture == PAPER_PRESETS[preset]
    # a block output, not HF's last entry (the final-normed one): the toy has two blocks past the hook
    assert len(toy["ref"].hidden_states) == toy["model"].cfg.n_layers + 1 > layer + 2
    resid, logits = resid_and_logits(toy["model"], toy["tokens"], layer)
    torch.testing.assert_close(resid, toy["ref"].hidden_states[layer + 1], **TOL)
    torch.testing.assert_close(logits, toy["ref"].logits, **TOL)


def test_gemma2_converts_with_its_own_features(loaded):
    cfg = loaded["gemma2b_paper"]["model"].cfg
    assert (cfg.attn_scores_soft_cap, cfg.output_logits_soft_cap) == (TOY_ATTN_SOFTCAP, TOY_LOGIT_SOFTCAP)
    assert cfg.use_local_attn and cfg.window_size == TOY_SLIDING_WINDOW
    assert cfg.attn_types == ["local", "global"] * (cfg.n_layers // 2)  # layer 0 sliding, as in transformers
    assert (cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (4, 2, 16)  # grouped-query attention
    assert cfg.attn_scale == math.sqrt(24)  # sqrt(query_pre_attn_scalar), not sqrt(d_head)
    assert cfg.normalization_type == "RMS" and cfg.use_normalization_before_and_after and cfg.gated_mlp


def test_neox_converts_with_its_own_features(loaded):
    cfg = loaded["pythia160m_paper"]["model"].cfg
    assert cfg.parallel_attn_mlp and cfg.normalization_type == "LN"
    assert cfg.rotary_dim == round(0.25 * cfg.d_head) == 4


def test_hook_names_differ_by_block(loaded):
    """Gemma-2's sequential block has ``hook_resid_mid`` and the post-norm hooks; NeoX's parallel block (attention
    and MLP read the same input) has neither: ``harvest.hook_point=hook_resid_mid`` exists only for Gemma-2."""
    gemma = loaded["gemma2b_paper"]["model"].hook_dict
    neox = loaded["pythia160m_paper"]["model"].hook_dict
    g, n = preset_layer("gemma2b_paper"), preset_layer("pythia160m_paper")
    for name in ("hook_resid_post", "hook_resid_pre", "hook_mlp_out", "hook_attn_out"):
        assert f"blocks.{g}.{name}" in gemma and f"blocks.{n}.{name}" in neox
    assert f"blocks.{g}.hook_resid_mid" in gemma and f"blocks.{n}.hook_resid_mid" not in neox
    assert f"blocks.{g}.ln1_post.hook_normalized" in gemma and f"blocks.{g}.ln2_post.hook_normalized" in gemma
    assert not any("_post." in h for h in neox)


@pytest.mark.parametrize("preset", PRESETS)
def test_ravel_hooks_the_same_residual_in_the_hf_model(loaded, preset):
    """SAEBench's RAVEL hooks the HF model's block ``layer`` (``model.layers`` in Gemma-2, ``gpt_neox.layers`` in
    NeoX: :func:`pipeline.evals.saebench_patches.hf_layer_module`); its output is the store's hook."""
    from pipeline.evals.saebench_patches import hf_layer_module

    toy, layer = loaded[preset], preset_layer(preset)
    blocks = toy["hf"].model.layers if preset == "gemma2b_paper" else toy["hf"].gpt_neox.layers
    module = hf_layer_module(toy["hf"], layer)
    assert module.layer is blocks[layer]
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda mod, inputs, outputs: seen.append(outputs[0]))
    try:
        with torch.inference_mode():
            toy["hf"](toy["tokens"])
    finally:
        handle.remove()
    resid, _ = resid_and_logits(toy["model"], toy["tokens"], layer)
    torch.testing.assert_close(seen[0], resid, **TOL)


def _drop_embedding_scale(state: dict[str, torch.Tensor]) -> None:
    state["embed.W_E"] = state["embed.W_E"] / math.sqrt(TOY_WIDTH)


#: preset -> (feature, changes to the transformer-lens config, change to the converted state dict).
LEFT_OUT: list[tuple[str, str, dict[str, Any], Callable[[dict[str, torch.Tensor]], None] | None]] = [
    ("gemma2b_paper", "attention soft-capping", {"attn_scores_soft_cap": -1.0}, None),
    ("gemma2b_paper", "logit soft-capping", {"output_logits_soft_cap": -1.0}, None),
    ("gemma2b_paper", "sliding window", {"attn_types": ["global"] * 14}, None),
    ("gemma2b_paper", "transformer-lens's official layer order (#778)", {"attn_types": ["global", "local"] * 7}, None),
    ("gemma2b_paper", "query_pre_attn_scalar", {"attn_scale": math.sqrt(TOY_WIDTH // 4)}, None),
    ("gemma2b_paper", "post-attention / post-MLP norms", {"use_normalization_before_and_after": False}, None),
    ("gemma2b_paper", "sqrt(d_model) embedding scale", {}, _drop_embedding_scale),
    ("pythia160m_paper", "parallel residual", {"parallel_attn_mlp": False}, None),
    ("pythia160m_paper", "rotary_pct 0.25", {"rotary_dim": TOY_WIDTH // 4}, None),
]


@pytest.mark.parametrize(("preset", "feature", "changes", "state_change"), LEFT_OUT, ids=[f[1] for f in LEFT_OUT])
def test_leaving_out_a_feature_breaks_the_match(loaded, preset, feature, changes, state_change):
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    toy, layer = loaded[preset], preset_layer(preset)
    cfg = local_tl_config(toy["path"], toy["hf"].config)
    for key, value in changes.items():
        setattr(cfg, key, value)
    model = HookedTransformer(cfg, tokenizer=toy["model"].tokenizer, move_to_device=False)
    state = loading.get_pretrained_state_dict(str(toy["path"]), cfg, hf_model=toy["hf"])
    if state_change is not None:
        state_change(state)
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    resid, logits = resid_and_logits(model.eval(), toy["tokens"], layer)
    moved = max(
        float((resid - toy["ref"].hidden_states[layer + 1]).abs().max()),
        float((logits - toy["ref"].logits).abs().max()),
    )
    assert moved > BREAK, f"leaving out {feature} moved the output by only {moved:.2e}"


@pytest.mark.parametrize("preset", PRESETS)
def test_dashboard_logit_weights_use_the_models_final_norm(loaded, preset):
    """The dashboards' logit weights scale a direction by ``ln_final.w`` before ``W_U``: Gemma-2's RMSNorm scale
    is HF's ``1 + weight``, NeoX's LayerNorm its weight (its bias, a shift common to every direction, is left
    out)."""
    from pipeline.report.dashboards.features import logit_weights

    toy = loaded[preset]
    model, hf = toy["model"], toy["hf"]
    if PAPER_PRESETS[preset] == "Gemma2ForCausalLM":
        assert type(model.ln_final).__name__ == "RMSNorm" and not hasattr(model.ln_final, "b")
        scale = 1.0 + hf.model.norm.weight
    else:
        assert type(model.ln_final).__name__ == "LayerNorm" and hasattr(model.ln_final, "b")
        scale = hf.gpt_neox.final_layer_norm.weight
    W_dec = torch.randn(5, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    expected = (W_dec * scale.detach()) @ hf.get_output_embeddings().weight.detach().T
    torch.testing.assert_close(logit_weights(W_dec, model), expected, **TOL)


# ------------------------------------------------------------------------------------------ the conversion itself
#: transformers ``Gemma2Config`` fields of the released Gemma-2 sizes (their hub config.json files).
GEMMA2_SIZES = {
    "google/gemma-2-2b": {},  # Gemma2Config's defaults are gemma-2-2b's
    "google/gemma-2-9b": dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8
    ),
    "google/gemma-2-27b": dict(
        hidden_size=4608,
        intermediate_size=36864,
        num_hidden_layers=46,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        query_pre_attn_scalar=144,
    ),
}


@pytest.mark.parametrize("official", sorted(GEMMA2_SIZES))
def test_a_local_gemma2_gets_transformer_lens_official_config(official, tmp_path):
    """A ``save_pretrained`` copy of a released Gemma-2 converts to transformer-lens's own config for its hub name
    (no toy sizes anywhere), but for which layers are sliding-window: transformers' ``layer_types`` (layer 0
    sliding), where transformer-lens's hard-coded list starts with a global layer (TransformerLens issue #778)."""
    import transformer_lens.loading_from_pretrained as loading
    from transformers import Gemma2Config

    hf_config = Gemma2Config(architectures=["Gemma2ForCausalLM"], **GEMMA2_SIZES[official])
    ours = local_tl_config(tmp_path / official.split("/")[1], hf_config).to_dict()
    theirs = loading.get_pretrained_model_config(official, device="cpu").to_dict()
    differ = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
    assert differ == {"attn_types", "tokenizer_name"}, {k: (ours.get(k), theirs.get(k)) for k in differ}
    n = hf_config.num_hidden_layers
    assert ours["attn_types"] == gemma2_attn_types(hf_config) == ["local", "global"] * (n // 2)
    assert theirs["attn_types"][:n] == ["global", "local"] * (n // 2)
    assert ours["model_name"] == theirs["model_name"] == official.split("/")[1]


def test_transformer_lens_alone_cannot_convert_these_folders(toy_paper_dirs, tmp_path):
    """Why the loader converts by ``config.json``: transformer-lens 2.17 picks a local folder's architecture by
    model names in its path, and has Gemma-2 configs for hub names only."""
    import transformer_lens.loading_from_pretrained as loading

    gemma, neox = toy_paper_dirs["gemma2b_paper"], toy_paper_dirs["pythia160m_paper"]
    links = {name: tmp_path / name for name in ("gemma2", "model", "llama_neox")}
    for link, target in zip(links.values(), (gemma, gemma, neox)):
        link.symlink_to(target, target_is_directory=True)
    with pytest.raises(NotImplementedError, match="GemmaForCausalLM is not currently supported"):
        loading.get_pretrained_model_config(str(links["gemma2"]))  # "gemma" in the path: read as Gemma-1
    with pytest.raises(NotImplementedError, match="Gemma2ForCausalLM is not currently supported"):
        loading.get_pretrained_model_config(str(links["model"]))
    with pytest.raises(UnboundLocalError):  # "llama" in the path: its Llama branch never reads config.json
        loading.get_pretrained_model_config(str(links["llama_neox"]))
    for name, link in links.items():
        model = load_model("local", path=link)
        assert model.cfg.original_architecture == ("GPTNeoXForCausalLM" if "neox" in name else "Gemma2ForCausalLM")
        assert model.cfg.model_name == name
