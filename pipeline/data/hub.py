"""The Hugging Face hub: is it reachable, is a repo in the local cache, and what to tell the user when neither.

Text (:mod:`pipeline.data.text`) and models loaded by transformer-lens name (:mod:`pipeline.data.models`)
come from the hub; these helpers let them fail early with a message that says how to work offline.
"""

from __future__ import annotations

import socket
import urllib.parse
from collections.abc import Iterable


class HubUnreachableError(ConnectionError):
    """The Hugging Face hub cannot be reached and the requested files are not in the local cache."""


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


def in_hub_cache(repo_id: str) -> bool:
    """True when ``repo_id``'s ``config.json`` is in the local HF cache (a model that loads without the hub)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def unreachable_model_message(name: str, repo: str, offline_models: Iterable[str]) -> str:
    """What to do when model ``name`` (hub repo ``repo``) is neither reachable nor cached."""
    return (
        f"cannot load {name!r}: the Hugging Face hub is unreachable (or HF_HUB_OFFLINE=1) and {repo!r} is "
        "not in the local HF cache. Either run where the hub is reachable, copy the model into the HF cache "
        "(HF_HOME), or download its weights + tokenizer elsewhere (`save_pretrained`) and pass the directory "
        "as model.path=/path/to/dir. Offline models that need no hub: "
        f"{', '.join(offline_models)}."
    )


def hub_load_failed_message(name: str, repo: str, exc: BaseException) -> str:
    """What to do when the hub is reachable but loading ``name`` from it failed (gated repo, no token, ...)."""
    return (
        f"loading {name!r} ({repo}) from the Hugging Face hub failed: {exc}. Gated models (the "
        "Gemma family) need their licence accepted on the hub and a token (HF_TOKEN or "
        "`huggingface-cli login`); or pass model.path=<local HF directory>."
    )


__all__ = [
    "HubUnreachableError",
    "hub_reachable",
    "in_hub_cache",
    "unreachable_model_message",
    "hub_load_failed_message",
]
