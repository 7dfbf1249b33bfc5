"""transformer-lens configs of local Hugging Face folders, chosen by the architecture their ``config.json`` declares.

transformer-lens 2.17 converts a local folder (``get_pretrained_model_config(path)``) by looking for model
names *in the path* first: ``"llama"`` -> Llama (without reading the folder's config: it then fails),
``"gemma-2"`` -> Gemma-2, any other ``"gemma"`` -> Gemma-1, and only otherwise by the ``architectures`` entry of
its ``config.json``. And its Gemma / Gemma-2 configs exist only for the official hub names
(``google/gemma-2-2b``, ...: hard-coded shapes), so a local Gemma-2 folder always fails: "Gemma2ForCausalLM is
not currently supported", or "GemmaForCausalLM ..." when the path holds ``gemma``.

Here (:func:`local_tl_config`):

* ``Gemma2ForCausalLM``: :func:`gemma2_config`, the fields of transformer-lens's official Gemma-2 configs
  read from the folder's own config, any size: a local copy of ``gemma-2-2b`` gets the official
  ``google/gemma-2-2b`` config (``tests/data/test_architectures.py`` checks 2b, 9b, 27b). One deliberate
  difference: which layers are sliding-window comes from the model's ``layer_types`` (layer 0 sliding, as in
  transformers and Google's reference), where transformer-lens's official configs start with a global layer
  (TransformerLens issue #778; no effect on contexts within the 4096-token window);
* every other architecture: transformer-lens's own conversion, shown the folder under a neutral name (a
  symlink, :func:`tl_own_config`) so that only its ``config.json`` decides, checked to have converted the
  declared architecture, with GPT-NeoX's ``use_parallel_residual`` honoured (transformer-lens assumes the
  parallel block of Pythia).

The weights of every architecture then convert with transformer-lens's ``get_pretrained_state_dict``, which
dispatches on ``cfg.original_architecture`` (Gemma-2: ``convert_gemma_weights``: ``sqrt(d_model)``-scaled
embeddings, ``1 + w`` RMSNorm scales, norms before and after attention and MLP).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: transformer-lens's name for each transformers ``layer_types`` entry of a Gemma-2 config.
GEMMA2_ATTN_TYPES = {"sliding_attention": "local", "full_attention": "global"}


def hf_architecture(hf_config: Any) -> str:
    """The architecture a ``config.json`` declares (``architectures[0]``, e.g. ``Gemma2ForCausalLM``)."""
    names = getattr(hf_config, "architectures", None) or []
    if not names:
        raise ValueError(f"config.json declares no architectures (model_type {getattr(hf_config, 'model_type', '?')})")
    return str(names[0])


def gemma2_attn_types(hf_config: Any) -> list[str]:
    """``"local"`` / ``"global"`` per layer from the config's ``layer_types`` (transformers' default: even layers
    sliding-window, odd layers global)."""
    types = getattr(hf_config, "layer_types", None)
    if types is None:  # transformers before layer_types: sliding on even layers
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(hf_config.num_hidden_layers)]
    unknown = sorted(set(types) - set(GEMMA2_ATTN_TYPES))
    if unknown:
        raise ValueError(f"Gemma-2 layer_types {unknown} have no transformer-lens attention type")
    return [GEMMA2_ATTN_TYPES[t] for t in types]


def gemma2_config(hf_config: Any) -> dict[str, Any]:
    """transformer-lens's Gemma-2 config dict from a transformers ``Gemma2Config``: soft-capped attention scores
    and logits, alternating sliding-window / global layers, RMS norms before and after attention and MLP,
    grouped-query attention, ``1 / sqrt(query_pre_attn_scalar)`` attention scale, gated gelu-tanh MLP."""
    for key in ("attention_bias", "rope_scaling"):
        if getattr(hf_config, key, None):
            raise ValueError(f"a Gemma-2 config with {key}={getattr(hf_config, key)!r} has no transformer-lens form")
    attn_types = gemma2_attn_types(hf_config)
    local = "local" in attn_types and getattr(hf_config, "sliding_window", None) is not None
    return {
        "d_model": hf_config.hidden_size,
        "d_head": hf_config.head_dim,
        "n_heads": hf_config.num_attention_heads,
        "n_key_value_heads": hf_config.num_key_value_heads,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "eps": hf_config.rms_norm_eps,
        "d_vocab": hf_config.vocab_size,
        "act_fn": hf_config.hidden_activation,
        "initializer_range": hf_config.initializer_range,
        "normalization_type": "RMS",
        "rotary_base": float(hf_config.rope_theta),
        "rotary_dim": hf_config.head_dim,
        "positional_embedding_type": "rotary",
        "use_attn_scale": True,
        "attn_scale": math.sqrt(hf_config.query_pre_attn_scalar),
        "use_local_attn": local,
        "window_size": hf_config.sliding_window if local else None,
        "attn_types": attn_types if local else None,
        "attn_scores_soft_cap": float(hf_config.attn_logit_softcapping or -1.0),
        "output_logits_soft_cap": float(hf_config.final_logit_softcapping or -1.0),
        "gated_mlp": True,
        "final_rms": True,
        "use_normalization_before_and_after": True,
        "original_architecture": "Gemma2ForCausalLM",
    }


#: Architectures converted here from the folder's config (transformer-lens has them for hub names only).
CONVERSIONS: dict[str, Callable[[Any], dict[str, Any]]] = {"Gemma2ForCausalLM": gemma2_config}


def check_converted_architecture(converted: str, declared: str, path: str | os.PathLike) -> None:
    """``ValueError`` when transformer-lens converted ``path`` as another architecture than its config declares."""
    if converted != declared:
        raise ValueError(
            f"transformer-lens converted {path} as {converted}, but its config.json declares {declared} "
            "(transformer-lens picks the architecture by model names in the path: llama, gemma)"
        )


def tl_own_config(path: str | os.PathLike, **kwargs: Any) -> Any:
    """transformer-lens's ``get_pretrained_model_config`` of the folder ``path``, shown to it as ``<tmp>/model``
    (a symlink), so that the folder's ``config.json``, not a model name in its path, picks the architecture."""
    import tempfile

    import transformer_lens.loading_from_pretrained as loading

    with tempfile.TemporaryDirectory(prefix="tl-config-") as tmp:
        alias = Path(tmp) / "model"
        alias.symlink_to(Path(path).resolve(), target_is_directory=True)
        return loading.get_pretrained_model_config(str(alias), **kwargs)


def local_tl_config(
    path: str | os.PathLike,
    hf_config: Any,
    *,
    device: str = "cpu",
    dtype: Any = None,
    n_ctx: int | None = None,
) -> Any:
    """The ``HookedTransformerConfig`` of the local folder ``path`` (whose transformers config is ``hf_config``),
    by the architecture it declares (module docstring). ``n_ctx`` overrides the model's context window."""
    import torch
    from transformer_lens import HookedTransformerConfig

    dtype = dtype if dtype is not None else torch.float32
    arch = hf_architecture(hf_config)
    if arch in CONVERSIONS:
        # what transformer-lens's get_pretrained_model_config adds to a converted dict (no checkpoint, no folding)
        cfg_dict = {
            **CONVERSIONS[arch](hf_config),
            "init_weights": False,
            "device": device,
            "dtype": dtype,
            "n_devices": 1,
            "default_prepend_bos": True,
            "from_checkpoint": False,
            **({"n_ctx": n_ctx} if n_ctx is not None else {}),
        }
        cfg = HookedTransformerConfig.from_dict(cfg_dict)
    else:
        cfg = tl_own_config(path, device=device, dtype=dtype, **({"n_ctx": n_ctx} if n_ctx is not None else {}))
        check_converted_architecture(cfg.original_architecture, arch, path)
        if arch == "GPTNeoXForCausalLM":
            cfg.parallel_attn_mlp = bool(getattr(hf_config, "use_parallel_residual", True))
    cfg.model_name, cfg.tokenizer_name = Path(path).name, str(path)
    return cfg


__all__ = [
    "CONVERSIONS",
    "GEMMA2_ATTN_TYPES",
    "check_converted_architecture",
    "gemma2_attn_types",
    "gemma2_config",
    "hf_architecture",
    "local_tl_config",
    "tl_own_config",
]
