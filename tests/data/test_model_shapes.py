"""The paper presets' model shapes (:mod:`pipeline.data.architectures`) against their published configs, offline.

Gemma-2-2B: transformers' ``Gemma2Config()`` defaults and transformer-lens's hard-coded official config (neither
needs the hub). Pythia-160M-deduped: EleutherAI's published figures (the training config's 12 layers of width
768, the HF ``config.json``'s padded vocabulary 50,304, the Pythia paper's 162,322,944 parameters, 85,056,000 of
them outside the embeddings) and SAEBench's installed table. The parameter and buffer counts are checked against
models built at full size on the meta device (no memory, no weights): the HF checkpoint class and the
``HookedTransformer`` the harvest's loader builds from the same config.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.data.architectures import ARCHITECTURES, GEMMA_2_2B, PYTHIA_160M_DEDUPED, architecture
from tests.conftest import compose_config

#: The Pythia paper's (Biderman et al. 2023, Table 1) counts for pythia-160m: total and non-embedding parameters.
PYTHIA_160M_PARAMS, PYTHIA_160M_NON_EMBEDDING = 162_322_944, 85_056_000


def hf_config(arch):
    """The transformers config of ``arch`` (its published ``config.json`` fields)."""
    from transformers import Gemma2Config, GPTNeoXConfig

    if arch is GEMMA_2_2B:
        return Gemma2Config(architectures=["Gemma2ForCausalLM"])  # its defaults are gemma-2-2b's (checked below)
    return GPTNeoXConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        vocab_size=50304,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        use_parallel_residual=True,
        architectures=["GPTNeoXForCausalLM"],
    )


def test_gemma2config_defaults_are_gemma_2_2b():
    """transformers 4.57's docstring says its defaults resemble "Gemma2-7B"; the values are gemma-2-2b's."""
    c = hf_config(GEMMA_2_2B)
    got = (
        c.hidden_size,
        c.num_hidden_layers,
        c.vocab_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
        c.max_position_embeddings,
        c.tie_word_embeddings,
    )
    assert got == (2304, 26, 256000, 8, 4, 256, 9216, 8192, True)
    a = GEMMA_2_2B
    assert got == (a.d_model, a.n_layers, a.d_vocab, a.n_heads, a.n_kv_heads, a.d_head, a.d_mlp, a.n_ctx, True)


def test_transformer_lens_official_gemma_2_2b_config_matches():
    import transformer_lens.loading_from_pretrained as loading

    tl = loading.get_pretrained_model_config("google/gemma-2-2b", device="cpu")  # hard-coded: no hub
    a = GEMMA_2_2B
    assert (tl.d_model, tl.n_layers, tl.d_vocab, tl.n_heads, tl.n_key_value_heads, tl.d_head, tl.d_mlp) == (
        a.d_model,
        a.n_layers,
        a.d_vocab,
        a.n_heads,
        a.n_kv_heads,
        a.d_head,
        a.d_mlp,
    )
    assert tl.gated_mlp and tl.normalization_type == "RMS" and tl.rotary_dim == a.rotary_dim


def test_pythia_160m_published_figures():
    from sae_bench.custom_saes.run_all_evals_dictionary_learning_saes import MODEL_CONFIGS

    a = PYTHIA_160M_DEDUPED
    assert (a.d_model, a.n_layers, a.d_vocab, a.n_heads, a.d_head, a.d_mlp) == (768, 12, 50304, 12, 64, 3072)
    assert a.d_vocab % 128 == 0 and a.d_vocab - 128 < 50277  # GPT-NeoX-20B's 50,277 tokens padded to 128
    assert a.rotary_dim == round(0.25 * a.d_head)
    assert a.hf_params() == PYTHIA_160M_PARAMS
    assert a.hf_params() - 2 * a.d_vocab * a.d_model == PYTHIA_160M_NON_EMBEDDING
    assert MODEL_CONFIGS["pythia-160m-deduped"]["d_model"] == a.d_model
    assert MODEL_CONFIGS["gemma-2-2b"]["d_model"] == GEMMA_2_2B.d_model


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_the_presets_models_are_in_the_table(name):
    """Each paper preset's ``model.name`` has shapes, and ``conf/model`` records the same width and depth."""
    preset = {"gemma-2-2b": "gemma2b_paper", "pythia-160m-deduped": "pythia160m_paper"}[name]
    model = compose_config(f"experiment={preset}").model
    a = architecture(model.name)
    assert a.name == name and (model.d_model, model.n_layers) == (a.d_model, a.n_layers)
    assert 0 <= model.layer < a.n_layers


def test_an_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="gemma-2-2b, pythia-160m-deduped"):
        architecture("smollm2-135m")


@pytest.mark.parametrize("arch", [GEMMA_2_2B, PYTHIA_160M_DEDUPED], ids=lambda a: a.name)
def test_counts_equal_full_size_models_on_the_meta_device(arch, tmp_path):
    """``hf_params`` = the transformers class at full size; ``tl_params`` and ``tl_buffer_bytes`` = the
    ``HookedTransformer`` the loader (:func:`pipeline.data.tl_configs.local_tl_config`) builds from that config."""
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM

    from pipeline.data.tl_configs import local_tl_config

    config = hf_config(arch)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    assert type(hf).__name__ == arch.hf_class
    assert sum(p.numel() for p in hf.parameters()) == arch.hf_params()
    config.save_pretrained(tmp_path)
    n_ctx, dtype = 1024, torch.bfloat16
    cfg = local_tl_config(tmp_path, config, device="cpu", dtype=dtype, n_ctx=n_ctx)
    cfg.tokenizer_name = None  # a config alone: no tokenizer to load
    with torch.device("meta"):
        tl = HookedTransformer(cfg, move_to_device=False)
    assert sum(p.numel() for p in tl.parameters()) == arch.tl_params()
    assert sum(b.numel() * b.element_size() for b in tl.buffers()) == arch.tl_buffer_bytes(n_ctx, 2)
    assert dataclasses.replace(arch) == arch  # frozen, comparable
