"""Harvest stage: the activation store of the configured model, hook(s) and text, in the run's harvest folder.

    python -m stages.harvest                                   # SmolLM2-135M, layer 15, Austen (offline)
    python -m stages.harvest model=gemma3_270m harvest.n_tokens=500000
    python -m pipeline stage=harvest                           # the same through the orchestrator

:func:`run` is the plain function (tests and the orchestrator call it); :func:`main` the Hydra wrapper.
Writes ``<output_root>/<experiment>/harvest-<hash>/store/`` (shards + manifest, see
:mod:`pipeline.data.store`), its ``config.yaml`` and, last, its completion marker. An unfinished store is
resumed from its last complete shard; a store with another identity (model, hooks, text, token count,
settings) in the folder is refused. Run by name (``stage=harvest``) on a finished store, it checks every shard's
sha256 and re-makes exactly the corrupted or missing ones.

Under torchrun every rank harvests every world-th shard on its own device (``cuda:LOCAL_RANK``), rank 0 merges
their ledgers into the manifest and writes the marker, the others wait for it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.data.config import store_identity
from pipeline.data.harvest import harvest
from pipeline.data.models import describe_model, load_model
from pipeline.data.store import find_bad_shards
from pipeline.data.text import describe_source, iter_documents
from pipeline.runs.config import check_config_or_exit, register_configs, section
from pipeline.runs.distributed import rank_device, ranks, wait_for
from pipeline.runs.layout import STORE_DIRNAME, is_done, mark_done, prepare, stage_dir
from pipeline.utils.devices import resolve_device

log = logging.getLogger(__name__)


def run(cfg: DictConfig | dict) -> Path:
    """Harvest (or reuse) the store of ``cfg``; returns the harvest stage folder."""
    me = ranks()
    folder = stage_dir(cfg, "harvest")
    if me.is_main:
        prepare(folder, cfg, "harvest")
    if is_done(folder) and (not me.is_main or _intact(folder / STORE_DIRNAME)):
        log.info("harvest already finished and every shard matches its sha256: %s", folder)
        return folder
    model_cfg, source, h = section(cfg, "model"), section(cfg, "data"), section(cfg, "harvest")
    h.validate()  # before the model loads (check_config has done so on the command line)
    identity = store_identity(model_cfg, source, h)
    device = model_cfg.device if not me.distributed else str(rank_device(resolve_device(model_cfg.device)))
    model = load_model(model_cfg.name, path=model_cfg.path, device=device, dtype=model_cfg.dtype, n_ctx=model_cfg.n_ctx)
    meta = {"model": describe_model(model, model_cfg.name, model_cfg.path), "text": describe_source(source)}
    store = harvest(
        model,
        lambda: iter_documents(source),
        folder / STORE_DIRNAME,
        hooks=h.hook_list(model_cfg.layer),
        n_tokens=h.n_tokens,
        context_length=h.context_length,
        batch_size=h.batch_size,
        dtype=h.dtype,
        shard_rows=h.shard_rows,
        heldout_fraction=h.heldout_fraction,
        masking=h.masking(),
        identity=identity,
        meta=meta,
        progress=h.progress,
        part=(me.rank, me.world) if me.distributed else None,
        wait_s=section(cfg, "distributed").wait_s,
    )
    if not me.is_main:
        wait_for(folder, "harvest", section(cfg, "distributed"))  # rank 0 merges the parts, then marks it done
        return folder
    mark_done(folder, store=str(store))
    log.info("activation store: %s", store)
    return folder


def _intact(store: Path) -> bool:
    """True when every shard of every hook matches its sha256 (else the harvest re-makes the bad ones)."""
    bad = find_bad_shards(store)
    for b in bad:
        log.warning("shard %s of the finished store is %s; re-making it", b.file, b.reason)
    return not bad


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    check_config_or_exit(cfg)
    folder = run(cfg)
    if ranks().is_main:
        print(f"activation store: {folder / STORE_DIRNAME}")


if __name__ == "__main__":
    main()
