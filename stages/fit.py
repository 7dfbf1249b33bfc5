"""Fit stage: learn the DB-KSVD dictionary on the run's activation store (the baselines stage follows).

    python -m pipeline stage=fit dictionary.coder.k=64         # via the orchestrator (harvest reused)
    python -m stages.fit dictionary.n_atoms=4096          # this stage alone
    torchrun --nproc_per_node=8 -m pipeline stage=fit     # data parallel over 8 GPUs (exact; rank 0 writes)

Writes into ``<output_root>/<experiment>/fit-<hash>/``: ``dictionary/`` (Dictionary.save; its metadata holds
the fit's spend: wall seconds, samples, updates, device, which the baselines are matched to; its history the
held-out FVU on the log grid of updates, the dictionary's curve in the report), ``fit.ckpt`` (the
learner's checkpoint; an interrupted fit resumes from it), ``metrics.json`` (held-out FVU, L0, dead fraction,
coherence, the spend) and the completion marker.

Under torchrun every rank fits (each codes its share of every batch, sums are all-reduced) and every rank
resumes from the same checkpoint; only rank 0 writes, and whether to fit at all is rank 0's decision.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from pipeline.core.dictionary import DICTIONARY_META, Dictionary
from pipeline.core.learner import fit_dictionary
from pipeline.core.learner_config import LearnerConfig
from pipeline.core.spend import FitSpend
from pipeline.data.harvest import hook_layer
from pipeline.data.loader import fits_in_memory, training_data
from pipeline.data.store import ActivationStore
from pipeline.runs.config import check_config_or_exit, open_stage_tracker, register_configs, section
from pipeline.runs.distributed import agree, agree_all, join, leave, rank_device, ranks
from pipeline.runs.layout import (
    DICTIONARY_DIRNAME,
    STORE_DIRNAME,
    finished_stage_dir,
    is_done,
    mark_done,
    prepare,
    stage_config,
    stage_dir,
)
from pipeline.saes.dictionary_sae import DictionarySAE
from pipeline.saes.heldout import heldout_stats
from pipeline.utils.atomic import atomic_write_text
from pipeline.utils.devices import resolve_device

log = logging.getLogger(__name__)

CHECKPOINT = "fit.ckpt"
METRICS = "metrics.json"


def fit_device(cfg: DictConfig) -> torch.device:
    """Where this rank fits: ``dictionary.device`` (auto: CUDA when available), ``cuda:LOCAL_RANK`` under torchrun."""
    return rank_device(resolve_device(section(cfg, "dictionary").device))


def join_ranks(cfg: DictConfig):
    """The torchrun launch's process group, joined on the fit device (None for one process)."""
    return join(section(cfg, "distributed"), fit_device(cfg))


def run(cfg: DictConfig) -> Path:
    """Fit (or reuse) the dictionary for ``cfg``; returns the fit stage folder."""
    learner = section(cfg, "dictionary")
    device = fit_device(cfg)
    group = join_ranks(cfg)  # None unless launched by torchrun with several ranks
    main = ranks().is_main
    out = stage_dir(cfg, "fit")
    if main:
        prepare(out, cfg, "fit")
    dict_dir = out / DICTIONARY_DIRNAME
    done, fitted = agree(group, (is_done(out), (dict_dir / DICTIONARY_META).exists()))  # rank 0's view, for all
    if done or (fitted and not main):  # the ranks > 0 only help fitting
        log.info("fit already finished: %s", out)
        return out
    store = ActivationStore(finished_stage_dir(cfg, "harvest") / STORE_DIRNAME)
    learner = dataclasses.replace(learner, device=str(device), checkpoint_path=str(out / CHECKPOINT), resume=True)
    metrics: dict[str, Any] = {
        "store": str(store.path),
        "hook": store.hook,
        "d": store.d,
        "train_rows": store.n_rows(),
        "heldout_rows": store.n_rows("heldout"),
    }
    heldout = store.heldout(device=device)
    if fitted:
        D = Dictionary.load(dict_dir, device)
        log.info("dictionary already fitted: %s", dict_dir)
    else:
        # one choice for all ranks (in memory and streamed give different batches): in memory if every rank fits
        fits = fits_in_memory(store, device, readers=ranks().local_world)
        in_memory = agree_all(group, fits)
        if fits and not in_memory:
            log.info("streaming the store: another rank has too little free memory to hold it")
        data = training_data(  # in memory the learner orders the rows (BatchSource), streamed the loader does
            store, learner.batch_size, device, learner.seed, in_memory=in_memory, **streamed_order(learner)
        )
        t = time.perf_counter()
        D = fit_dictionary(data, learner, process_group=group, heldout=heldout)
        if not main:
            return out  # rank 0 saves the dictionary, which every rank holds
        spend = FitSpend.from_history(
            D.history,
            batch_size=learner.batch_size,
            device=str(device),
            fit_seconds=time.perf_counter() - t - D.metadata.get("heldout_eval_seconds", 0.0),
            ranks=ranks().world,
        )
        D.metadata.update(
            store=str(store.path),
            hook=store.hook,
            model=store.manifest.get("meta", {}).get("model"),
            fit_seconds=spend.seconds,
            spend=spend.as_dict(),
        )
        D.save(dict_dir)
    view = DictionarySAE(D, section(cfg, "model").name, hook_layer(store.hook), store.hook, device=device)
    metrics["dictionary"] = heldout_metrics(
        view,
        heldout,
        iterations=len(D.history),
        fit_seconds=D.metadata.get("fit_seconds"),
        spend=D.metadata.get("spend"),
    )
    atomic_write_text(out / METRICS, json.dumps(metrics, indent=2))
    with open_stage_tracker(cfg, "fit", out.name, stage_config(cfg, "fit")) as tracker:
        tracker.log_curve("fit", D.history, x="iteration")
        tracker.log_metrics("heldout", {k: v for k, v in metrics["dictionary"].items() if k != "spend"})
    mark_done(out, dictionary=str(dict_dir), heldout_fvu=metrics["dictionary"]["heldout_fvu"])
    log.info("fit done: %s (held-out FVU %.4f)", out, metrics["dictionary"]["heldout_fvu"])
    return out


def streamed_order(learner: LearnerConfig) -> dict[str, bool]:
    """How the loader orders a streamed store for ``learner`` (:func:`~pipeline.data.loader.training_data`'s
    ``shuffle`` and ``reshuffle``): reshuffled every epoch ("shuffled"), in store order ("contiguous"), or shuffled
    once, the same order every epoch ("contiguous" with ``shuffle_once``, the reference preset)."""
    shuffled = learner.sample_order == "shuffled"
    return {"shuffle": shuffled or learner.shuffle_once, "reshuffle": shuffled}


def heldout_metrics(sae: Any, Y: torch.Tensor, **extra: Any) -> dict[str, Any]:
    """``metrics.json``'s entry for one SAE: :func:`~pipeline.saes.heldout.heldout_stats` on ``Y: (n, d)``."""
    s = heldout_stats(sae, Y)
    return {
        "heldout_fvu": s["fvu"],
        "heldout_l0": s["l0"],
        "heldout_dead_fraction": s["dead_fraction"],
        "mean_max_abs_cos": s["mean_max_abs_cos"],
        **extra,
    }


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    check_config_or_exit(cfg)
    try:
        out = run(cfg)
    finally:
        leave()
    if ranks().is_main:
        print(out)


if __name__ == "__main__":
    main()
