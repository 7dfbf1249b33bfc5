"""Toy random-weight stand-ins for the paper presets' models, saved as local HF folders with the tiny tokenizer.

``conf/experiment/gemma2b_paper.yaml`` runs Gemma-2-2B and ``pythia160m_paper.yaml`` Pythia-160M (GPT-NeoX). The
toys keep what makes each architecture itself at a size that runs in seconds on a CPU:

* Gemma-2 (``Gemma2Config``): soft-capped attention scores and logits, alternating sliding-window / global
  layers with a window shorter than the tests' contexts, grouped-query attention (2 key/value heads for 4
  query heads), ``query_pre_attn_scalar`` unlike ``head_dim`` (as Gemma-2-27B's), tied embeddings;
* GPT-NeoX (``GPTNeoXConfig``): the parallel residual block and rotary embeddings on a quarter of each head
  (``rotary_pct=0.25``), untied unembedding.

Each is two blocks deeper than its preset's hook layer (``model.layer``), so the preset's hook exists, is not
the last block, and HF's ``hidden_states[layer + 1]`` is a block output, not the final-normed last entry. The
soft caps are scaled down with the model (a random toy's scores never approach Gemma-2's 50 / 30), and the
initialisation scaled up, so that every one of these features changes the output (the fast tests check that
leaving any out breaks the match); norm weights and biases, constant at initialisation, are drawn at random too
(Gemma's ``1 + w`` norm scales and NeoX's biases then have to convert right).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from tests.conftest import compose_config

#: The paper presets (``conf/experiment/<name>.yaml``) and the transformers architecture of each one's model.
PAPER_PRESETS: dict[str, str] = {"gemma2b_paper": "Gemma2ForCausalLM", "pythia160m_paper": "GPTNeoXForCausalLM"}
TOY_WIDTH = 64
TOY_HEADS = 4
TOY_N_CTX = 256
TOY_SLIDING_WINDOW = 32
"""Gemma-2's sliding window in the toy: shorter than the tests' contexts (the paper's 128 tokens included)."""
TOY_ATTN_SOFTCAP = 5.0
TOY_LOGIT_SOFTCAP = 3.0
TOY_INIT_STD = 0.1


@functools.cache
def preset_layer(preset: str) -> int:
    """The hook layer of the paper preset ``preset`` (its ``model.layer``)."""
    return int(compose_config(f"experiment={preset}").model.layer)


def toy_config(preset: str, tokenizer: Any) -> Any:
    """The transformers config of the toy stand-in for ``preset``'s model."""
    from transformers import Gemma2Config, GPTNeoXConfig

    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": TOY_WIDTH,
        "num_hidden_layers": preset_layer(preset) + 2,
        "num_attention_heads": TOY_HEADS,
        "max_position_embeddings": TOY_N_CTX,
        "initializer_range": TOY_INIT_STD,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if PAPER_PRESETS[preset] == "Gemma2ForCausalLM":
        return Gemma2Config(
            **common,
            intermediate_size=2 * TOY_WIDTH,
            num_key_value_heads=TOY_HEADS // 2,
            head_dim=TOY_WIDTH // TOY_HEADS,
            query_pre_attn_scalar=24,  # != head_dim (16): a default 1 / sqrt(d_head) scale would show
            sliding_window=TOY_SLIDING_WINDOW,
            attn_logit_softcapping=TOY_ATTN_SOFTCAP,
            final_logit_softcapping=TOY_LOGIT_SOFTCAP,
            tie_word_embeddings=True,
            architectures=["Gemma2ForCausalLM"],
        )
    return GPTNeoXConfig(
        **common,
        intermediate_size=4 * TOY_WIDTH,
        use_parallel_residual=True,
        rotary_pct=0.25,
        hidden_act="gelu",
        tie_word_embeddings=False,
        architectures=["GPTNeoXForCausalLM"],
    )


def save_toy_model(preset: str, tokenizer: Any, out: Path, seed: int = 0) -> Path:
    """The toy stand-in for ``preset``'s model, randomly initialised (``seed``) and saved with ``tokenizer`` as a
    ``save_pretrained`` folder ``out``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(toy_config(preset, tokenizer), attn_implementation="eager").eval()
    with torch.no_grad():  # norms and biases start constant (Gemma's norm weights 0, i.e. scale 1 + 0): vary them
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(TOY_INIT_STD * torch.randn_like(param))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def toy_paper_overrides(preset: str, model_dir: Path) -> list[str]:
    """The command line of ``preset`` scaled down to a local model (``conf/experiment/toy_paper.yaml``; the README
    shows the same): ``python -m pipeline 'experiment=[<preset>,toy_paper]' model.path=<dir>``."""
    return [f"experiment=[{preset},toy_paper]", f"model.path={model_dir}"]
