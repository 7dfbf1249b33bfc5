"""Fit stage: learn the DB-KSVD dictionary, and the TopK SAE baseline, on the run's activation store.

    python -m pipeline stage=fit dictionary.k=64          # via the orchestrator (harvest reused)
    python -m stages.fit dictionary.n_atoms=4096          # this stage alone

Writes into ``<output_root>/<experiment>/fit-<hash>/``: ``dictionary/`` (Dictionary.save), ``topk/`` (the
baseline), ``fit.ckpt`` (the learner's checkpoint; an interrupted fit resumes from it), ``metrics.json``
(held-out FVU, L0, dead fraction, coherence, wall time of both) and the completion marker.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.data.store import ActivationStore
from pipeline.core.learner import learn_dictionary
from pipeline.core.dictionary import DICTIONARY_META, Dictionary
from pipeline.utils.atomic import atomic_write_text
from pipeline.core.coders import free_memory
from pipeline.runs.layout import is_done, mark_done, prepare, stage_dir
from pipeline.evals.topk_sae import TOPK_CONFIG, TopKSAE, train_topk_sae

log = logging.getLogger(__name__)

DICTIONARY_DIR = "dictionary"
TOPK_DIR = "topk"
CHECKPOINT = "fit.ckpt"
METRICS = "metrics.json"
#: The store is fitted from memory when it takes at most this share of free memory, else streamed.
IN_MEMORY_SHARE = 0.25


def store_path(cfg: DictConfig) -> Path:
    """The activation store of this run (written by the harvest stage)."""
    from stages.harvest import STORE_DIRNAME

    folder = stage_dir(cfg, "harvest")
    if not is_done(folder):
        raise FileNotFoundError(f"no finished harvest at {folder}; run `python -m pipeline stage=harvest` "
                                f"(or the whole pipeline) with the same model/data/harvest settings first.")
    return folder / STORE_DIRNAME


def run(cfg: DictConfig) -> Path:
    """Fit (or reuse) the dictionary and baseline for ``cfg``; returns the fit stage folder."""
    out = prepare(stage_dir(cfg, "fit"), cfg, "fit")
    if is_done(out):
        log.info("fit already finished: %s", out)
        return out
    store = ActivationStore(store_path(cfg))
    opts: dict[str, Any] = OmegaConf.to_container(cfg.dictionary, resolve=True)
    n_atoms, k = opts.pop("n_atoms"), opts.pop("k")
    device = torch.device(opts.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    opts["device"] = str(device)
    data = training_data(store, opts["batch_size"], device, opts.get("seed", 0))
    heldout = store.heldout(device=device)
    metrics: dict[str, Any] = {"store": str(store.path), "hook": store.hook, "d": store.d,
                               "train_rows": store.n_rows(), "heldout_rows": store.n_rows("heldout")}
    dict_dir = out / DICTIONARY_DIR
    if (dict_dir / DICTIONARY_META).exists():
        D = Dictionary.load(dict_dir, device)
        log.info("dictionary already fitted: %s", dict_dir)
    else:
        t = time.perf_counter()
        D = learn_dictionary(data, n_atoms, k, checkpoint_path=str(out / CHECKPOINT), resume=True, **opts)
        D.metadata.update(store=str(store.path), hook=store.hook, model=store.manifest.get("meta", {}).get("model"),
                          fit_seconds=time.perf_counter() - t)
        D.save(dict_dir)
    metrics["dictionary"] = dictionary_metrics(D, heldout)
    metrics["dictionary"]["fit_seconds"] = D.metadata.get("fit_seconds")
    if cfg.baseline.topk:
        topk_dir = out / TOPK_DIR
        if (topk_dir / TOPK_CONFIG).exists():
            sae = TopKSAE.load(topk_dir, str(device))
        else:
            b = OmegaConf.to_container(cfg.baseline, resolve=True)
            b.pop("topk")
            t = time.perf_counter()
            sae = train_topk_sae(data, n_atoms, k, device=str(device), **b)
            sae.history.append({"fit_seconds": time.perf_counter() - t})
            sae.save(topk_dir)
        metrics["topk"] = topk_metrics(sae, heldout)
    atomic_write_text(out / METRICS, json.dumps(metrics, indent=2))
    mark_done(out, dictionary=str(dict_dir), heldout_fvu=metrics["dictionary"]["heldout_fvu"])
    log.info("fit done: %s (held-out FVU %.4f)", out, metrics["dictionary"]["heldout_fvu"])
    return out


def training_data(store: ActivationStore, batch_size: int, device: torch.device, seed: int):
    """The store's training rows as one tensor on ``device`` when they fit comfortably, else a loader."""
    need = store.n_rows() * store.d * 4
    if need <= IN_MEMORY_SHARE * free_memory(device):
        return store.load_all(device=device)
    log.info("streaming the store (%.1f GB does not fit in memory comfortably)", need / 1e9)
    return store.loader(batch_size, seed=seed, device=device, drop_last=True)


@torch.no_grad()
def dictionary_metrics(D: Dictionary, Y: torch.Tensor) -> dict[str, float]:
    codes = D.encode(Y)
    err = (Y - D.decode(codes)).pow(2).sum()
    used = torch.zeros(D.n_atoms, dtype=torch.bool, device=codes.indices.device)
    used[codes.indices[codes.values != 0]] = True
    return {"heldout_fvu": float(err / (Y - Y.mean(0)).pow(2).sum()), "heldout_l0": float(codes.l0().float().mean()),
            "heldout_dead_fraction": float(1 - used.float().mean()),
            "mean_max_abs_cos": mean_max_abs_cos(D.atoms), "iterations": len(D.history)}


@torch.no_grad()
def topk_metrics(sae: TopKSAE, Y: torch.Tensor) -> dict[str, float]:
    codes = sae.encode_sparse(Y)
    used = torch.zeros(sae.n_latents, dtype=torch.bool, device=Y.device)
    used[codes.indices[codes.values > 0]] = True
    W = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    return {"heldout_fvu": sae.fvu(Y), "heldout_l0": float((codes.values > 0).sum(1).float().mean()),
            "heldout_dead_fraction": float(1 - used.float().mean()), "mean_max_abs_cos": mean_max_abs_cos(W),
            "fit_seconds": next((h["fit_seconds"] for h in sae.history if "fit_seconds" in h), None)}


@torch.no_grad()
def mean_max_abs_cos(W: torch.Tensor, block: int = 4096) -> float:
    """Mean over atoms of the largest |cos| with any other atom (coherence)."""
    W = W.float()
    out = []
    for s in range(0, W.shape[0], block):
        c = (W[s:s + block] @ W.T).abs()
        c[torch.arange(c.shape[0]), torch.arange(s, s + c.shape[0])] = 0
        out.append(c.max(dim=1).values)
    return float(torch.cat(out).mean())


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    print(run(cfg))


if __name__ == "__main__":
    main()
