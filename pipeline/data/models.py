"""Load a transformer-lens ``HookedTransformer`` for harvesting, and describe it for manifests.

Three kinds of source, chosen by :func:`load_model`:

* an **offline real model** that installs from the package registries (``smollm2-135m``,
  ``gemma-3-270m``; registry and GGUF conversion in :mod:`pipeline.data.offline_models`);
* a **local directory** of Hugging Face weights + tokenizer (``config.json`` inside), converted by
  transformer-lens by the architecture its ``config.json`` declares (:func:`load_local_hf`; Gemma-2's config
  from the folder's own, as transformer-lens has it for hub names only: :mod:`pipeline.data.tl_configs`);
* a **transformer-lens name** (``gemma-2-2b``, ``pythia-160m-deduped``, any official TL model), loaded with
  ``HookedTransformer.from_pretrained_no_processing`` from the Hugging Face hub or its local cache (hub checks
  and messages in :mod:`pipeline.data.hub`).

Weights are loaded "no processing" (no LayerNorm folding, no centring) so hooked activations are the model's
own residual stream, as SAEBench evaluates it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.data import hub
from pipeline.data.hub import HubUnreachableError
from pipeline.data.offline_models import GEMMA3_TL_NAME, OFFLINE_MODELS, OfflineModel, converted_dir
from pipeline.data.tl_configs import local_tl_config
from pipeline.utils.devices import resolve_device

log = logging.getLogger(__name__)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "fp32" | "bfloat16" | "bf16" | "float16" | "fp16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def load_model(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    device: str | None = "cpu",
    dtype: str | torch.dtype = "float32",
    n_ctx: int | None = None,
):
    """Load a ``HookedTransformer`` (eval mode, no gradients needed).

    Args:
        name: an offline model (``smollm2-135m``, ``gemma-3-270m``), a transformer-lens model name
            (``gemma-2-2b``, ``pythia-160m-deduped``, …) or, with ``path``, a label for a local model.
        path: a local directory of HF weights + tokenizer (``config.json``, ``*.safetensors``, tokenizer files).
            Takes precedence over the hub. For a TL name whose weights you downloaded elsewhere, pass that dir.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``"auto"``.
        dtype: compute dtype (fp32 on CPU; bf16 on GPU for Gemma).
        n_ctx: context window to build the model with (``None``: the model's own / 1024 for offline models).
    """
    device, torch_dtype = str(resolve_device(device)), resolve_dtype(dtype)
    if path is not None:
        model = load_local_hf(path, device=device, dtype=torch_dtype, n_ctx=n_ctx)
    elif name in OFFLINE_MODELS:
        model = _load_offline(OFFLINE_MODELS[name], device=device, dtype=torch_dtype, n_ctx=n_ctx)
    else:
        model = _load_tl_name(name, device=device, dtype=torch_dtype, n_ctx=n_ctx)
    model.eval()
    return model


# --------------------------------------------------------------------------- local HF directories
def load_local_hf(
    path: str | os.PathLike,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    n_ctx: int | None = None,
    tokenizer: Any = None,
):
    """Convert a local Hugging Face causal-LM directory to a ``HookedTransformer`` (no hub access), by the
    architecture its ``config.json`` declares (:func:`pipeline.data.tl_configs.local_tl_config`), so a
    ``save_pretrained`` copy of a hub model (``gemma-2-2b``, ``pythia-160m-deduped``) loads as that model does."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model directory {path} has no config.json; point model.path at a directory written by "
            "`save_pretrained` (weights, config.json and tokenizer files)"
        )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path, local_files_only=True)
    try:
        cfg = local_tl_config(path, hf.config, device=device, dtype=dtype, n_ctx=n_ctx)
    except (KeyError, NotImplementedError, ValueError) as exc:
        raise ValueError(
            f"transformer-lens cannot convert the architecture of {path} ({hf.config.architectures}): {exc}"
        ) from exc
    # TL's generic Llama branch drops rope_theta (defaults to 10000): restore the model's own.
    if cfg.positional_embedding_type == "rotary" and getattr(hf.config, "rope_theta", None):
        cfg.rotary_base = float(hf.config.rope_theta)
    model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    state = loading.get_pretrained_state_dict(str(path), cfg, hf_model=hf, dtype=dtype)
    load_unprocessed(model, state)
    del hf, state
    return model.to(device)


def load_unprocessed(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` (the HookedTransformer format) into ``model`` with no processing: what TL's
    ``load_and_process_state_dict`` does with every processing flag off, in one ``load_state_dict`` call.

    TL's method loads one key per call (``load_state_dict({key: value}, strict=False)``), and each call walks
    every module of the model: about 7 s for SmolLM2-135M's 270 tensors on 2 CPU cores, against a fraction of a
    second here; the parameters are the same copies (``tests/data/test_models.py`` checks them bit for bit).
    The peak memory is the same: the whole state dict is held when either starts."""
    state = model.fill_missing_keys(state)
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- offline GGUF models
def _load_offline(spec: OfflineModel, *, device: str, dtype: torch.dtype, n_ctx: int | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = converted_dir(spec)
    n_ctx = n_ctx or spec.n_ctx
    if spec.name == "smollm2-135m":
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
        return load_local_hf(src, device=device, dtype=dtype, n_ctx=n_ctx, tokenizer=tok)
    from transformer_lens import HookedTransformer

    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    model = HookedTransformer.from_pretrained_no_processing(
        GEMMA3_TL_NAME, hf_model=hf, tokenizer=tok, device=device, dtype=dtype, n_ctx=n_ctx
    )
    del hf
    return model


# --------------------------------------------------------------------------- transformer-lens names (hub)
def _load_tl_name(name: str, *, device: str, dtype: torch.dtype, n_ctx: int | None):
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    try:
        repo = loading.get_official_model_name(name)
    except ValueError:
        raise ValueError(
            f"unknown model {name!r}: not an offline model ({', '.join(OFFLINE_MODELS)}), not a transformer-lens "
            "model name (e.g. gemma-2-2b, pythia-160m-deduped), and no model.path was given. "
            "Fix model.name, or pass model.path=<local HF directory>."
        ) from None
    # through the module, so tests (and callers) can patch pipeline.data.hub's checks in one place
    if not hub.in_hub_cache(repo) and not hub.hub_reachable():
        raise HubUnreachableError(hub.unreachable_model_message(name, repo, OFFLINE_MODELS))
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    if n_ctx is not None:
        kwargs["n_ctx"] = n_ctx
    try:
        return HookedTransformer.from_pretrained_no_processing(name, **kwargs)
    except OSError as exc:  # transformers' "couldn't connect" / LocalEntryNotFoundError / gated repo
        if not hub.hub_reachable():
            raise HubUnreachableError(hub.unreachable_model_message(name, repo, OFFLINE_MODELS)) from exc
        raise OSError(hub.hub_load_failed_message(name, repo, exc)) from exc


def describe_model(model: Any, name: str, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """JSON-able identity of a loaded model, for manifests."""
    tok = model.tokenizer
    return {
        "name": name,
        "path": str(path) if path is not None else None,
        "tl_model_name": model.cfg.model_name,
        "n_layers": model.cfg.n_layers,
        "d_model": model.cfg.d_model,
        "n_ctx": model.cfg.n_ctx,
        "compute_dtype": str(model.cfg.dtype).replace("torch.", ""),
        "tokenizer": None
        if tok is None
        else {
            "class": type(tok).__name__,
            "name_or_path": str(getattr(tok, "name_or_path", "")),
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
    }


__all__ = [
    "load_model",
    "load_local_hf",
    "describe_model",
    "resolve_dtype",
]
