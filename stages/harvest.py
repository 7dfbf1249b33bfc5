"""Harvest stage: write the activation store of the configured model, hook(s) and text into a run folder.

    python -m stages.harvest                                   # SmolLM2-135M, layer 15, Austen (offline)
    python -m stages.harvest model=gemma3_270m harvest.n_tokens=500000
    python -m stages.harvest model=pythia160m_deduped data=pile_uncopyrighted harvest.n_tokens=2600000

:func:`run` is the plain function (tests and the orchestrator call it); :func:`main` the Hydra wrapper.
The store goes to ``<run_dir>/<STORE_DIRNAME>/``. An existing complete store there with the same identity
(model, hooks, data, token count, settings) is reused; a partial one is resumed; a different one is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline.data.store import MANIFEST_NAME
from pipeline.data.harvest import harvest, identity_hash
from pipeline.data.config import HarvestConfig, ModelConfig, parse_harvest_config
from pipeline.data.models import describe_model, load_model
from pipeline.data.text import TextSource, describe_source, iter_documents

log = logging.getLogger(__name__)

STORE_DIRNAME = "store"
DEFAULT_OUTPUTS = Path("outputs") / "harvest"


def store_identity(model: ModelConfig, source: TextSource, h: HarvestConfig) -> dict[str, Any]:
    """What makes two stores interchangeable: model, hooks, text (content hashes for local text), token count
    and every setting that changes the stored bytes."""
    text = dataclasses.asdict(source) if source.kind == "hub" else describe_source(source)
    settings = dataclasses.asdict(h)
    for key in ("layers", "hook_point", "hooks", "progress"):
        settings.pop(key)
    return {"model": {"name": model.name, "path": model.path, "dtype": model.dtype, "n_ctx": model.n_ctx},
            "hooks": h.hook_list(model.layer), "text": text, **settings}


def existing_store(path: Path, identity: dict[str, Any]) -> bool:
    """True when ``path`` holds a complete store with exactly this identity."""
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        return False
    m = json.loads(manifest.read_text())
    return bool(m.get("complete")) and m.get("identity") == json.loads(json.dumps(identity))


def run(cfg: DictConfig | dict, run_dir: str | Path | None = None) -> Path:
    """Harvest (or reuse) the store for ``cfg``; returns the store directory.

    ``run_dir`` defaults to ``cfg.run_dir``, else ``outputs/harvest/<identity hash>``.
    """
    model_cfg, source, h = parse_harvest_config(cfg)
    identity = store_identity(model_cfg, source, h)
    run_dir = run_dir or (cfg.get("run_dir") if hasattr(cfg, "get") else None)
    store = Path(run_dir or DEFAULT_OUTPUTS / identity_hash(identity)) / STORE_DIRNAME
    if existing_store(store, identity):
        log.info("reusing the identical activation store at %s", store)
        return store
    model = load_model(model_cfg.name, path=model_cfg.path, device=model_cfg.device, dtype=model_cfg.dtype,
                       n_ctx=model_cfg.n_ctx)
    meta = {"model": describe_model(model, model_cfg.name, model_cfg.path), "text": describe_source(source)}
    path = harvest(model, lambda: iter_documents(source), store, hooks=h.hook_list(model_cfg.layer),
                   n_tokens=h.n_tokens, context_length=h.context_length, batch_size=h.batch_size, dtype=h.dtype,
                   shard_rows=h.shard_rows, heldout_fraction=h.heldout_fraction, masking=h.masking(),
                   identity=identity, meta=meta, progress=h.progress)
    log.info("activation store: %s", path)
    return path


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    path = run(cfg, run_dir=cfg.get("run_dir") or HydraConfig.get().runtime.output_dir)
    print(f"activation store: {path}")


if __name__ == "__main__":
    main()
