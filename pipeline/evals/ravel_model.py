"""Which Hugging Face model SAEBench's RAVEL loads: a local ``save_pretrained`` folder, or a hub name.

RAVEL does not use the transformer-lens model the other metrics share: it loads its own HF causal LM (it hooks
HF blocks and calls ``generate``). SAEBench maps the stage's model name through its ``LLM_NAME_MAP`` (two hub
names) and loads that. Here, in order:

1. ``eval.ravel.model_dir``;
2. ``model.path`` (the local folder the stage itself loaded);
3. an offline model's converted folder (:func:`pipeline.data.offline_models.converted_dir`);
4. SAEBench's hub name, when the hub answers.

The name SAEBench then carries (:attr:`RavelModel.saebench_name`: its result JSON, its cache file names and an
artifact sub-folder) stays a plain name, never the folder's path: SAEBench joins it into a path, and an absolute
path there would send its writes into the model folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: The file a ``save_pretrained`` folder must have.
HF_CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class RavelModel:
    """The HF model of a RAVEL run."""

    saebench_name: str
    """The name SAEBench's config carries once mapped (``google/gemma-2-2b``, ``smollm2-135m``)."""
    local_dir: Path | None
    """The ``save_pretrained`` folder it is loaded from, or None: from the hub."""

    @property
    def source(self) -> str:
        """Where it comes from, for ``eval_info.json``."""
        return f"local {self.local_dir}" if self.local_dir is not None else f"hub {self.saebench_name}"


def saebench_llm_names() -> dict[str, str]:
    """SAEBench's RAVEL ``LLM_NAME_MAP`` (stage model name -> hub name)."""
    import sae_bench.evals.ravel.main as ravel_main

    return dict(ravel_main.LLM_NAME_MAP)


def plain_name(name: str) -> str:
    """``name`` as SAEBench may join it into a path: one relative component per ``/`` part, no ``..``."""
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "-", p).strip(".") for p in name.split("/")]
    return "/".join(p for p in parts if p) or "model"


def _folder_reason(key: str, folder: str | Path) -> str | None:
    if not (Path(folder).expanduser() / HF_CONFIG_FILE).is_file():
        return (
            f"{key}={folder} has no {HF_CONFIG_FILE}: point it at a folder written by `save_pretrained` "
            "(config.json, weights and tokenizer files)"
        )
    return None


def resolve_ravel_model(
    model_name: str, model_path: str | None, model_dir: str | None, hub_reachable: bool
) -> tuple[RavelModel | None, str | None]:
    """``(model, None)``, or ``(None, reason)`` naming what is missing and the config key that fixes it."""
    from pipeline.data.offline_models import OFFLINE_MODELS, converted_dir

    names = saebench_llm_names()
    saebench_name = names.get(model_name) or plain_name(model_name)
    for key, folder in (("eval.ravel.model_dir", model_dir), ("model.path", model_path)):
        if folder is not None:
            reason = _folder_reason(key, folder)
            if reason is not None and key == "model.path":
                reason += "; or set eval.ravel.model_dir=<save_pretrained folder>"
            return (None, reason) if reason else (RavelModel(saebench_name, Path(folder).expanduser()), None)
    if model_name in OFFLINE_MODELS:
        try:
            return RavelModel(saebench_name, converted_dir(OFFLINE_MODELS[model_name])), None
        except (ModuleNotFoundError, OSError) as exc:
            return None, (
                f"the offline model {model_name!r} has no converted HF folder ({exc}); set "
                "eval.ravel.model_dir=<save_pretrained folder of it>"
            )
    if model_name in names:
        if hub_reachable:
            return RavelModel(saebench_name, None), None
        return None, (
            f"RAVEL loads {saebench_name!r} from the Hugging Face hub and the hub is unreachable; set "
            f"eval.ravel.model_dir=<local save_pretrained folder of {saebench_name}>"
        )
    return None, (
        f"RAVEL supports only SAEBench's hub models {sorted(names)}, the offline models "
        f"{sorted(OFFLINE_MODELS)} and local HF folders: the model {model_name!r} is none of them; set "
        "eval.ravel.model_dir=<save_pretrained folder of the model> (or model.path)"
    )


__all__ = ["HF_CONFIG_FILE", "RavelModel", "saebench_llm_names", "plain_name", "resolve_ravel_model"]
