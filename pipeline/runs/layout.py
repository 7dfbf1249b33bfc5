"""Where each stage of a run writes, and how a finished stage is recognised.

Layout: ``<output_root>/<experiment_name>/<stage>-<hash>/`` where the hash covers exactly the configuration
the stage depends on: its own config nodes and those of every stage before it. Runs that differ only after
harvest therefore share one activation store, sweeps over ``dictionary.k`` share harvest, and so on.

Each stage folder holds ``config.yaml`` (the resolved config it depends on) and, once finished,
``DONE.json`` (the completion marker, written last and atomically). A folder without the marker is an
unfinished stage: it is resumed, never trusted. Jobs that run at once (sweep points on a launcher) share stage
folders; :func:`stage_lock` lets one of them run a stage while the others wait, then find it done.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.utils.atomic import atomic_write_text
from pipeline.utils.redact import redact_config

#: The stages, in order.
STAGES = ("harvest", "fit", "baselines", "evaluate", "dashboards", "report")
#: Config nodes each stage reads (beyond those of earlier stages).
STAGE_NODES = {
    "harvest": ("model", "data", "harvest"),
    "fit": ("dictionary",),
    "baselines": ("baseline", "compare"),
    "evaluate": ("eval",),
    "dashboards": ("dashboards",),
    "report": ("report",),
}
#: Completion marker of a stage folder.
DONE_MARKER = "DONE.json"
#: Lock file of a stage folder (held while a job runs the stage).
LOCK_FILE = ".lock"
#: The resolved config a stage folder depends on.
STAGE_CONFIG = "config.yaml"
#: Inside the harvest folder: the activation store.
STORE_DIRNAME = "store"
#: Inside the fit folder: the dictionary (``Dictionary.save``). The baselines stage folder holds one sae-lens
#: folder per baseline, named as in the ``baseline`` config node.
DICTIONARY_DIRNAME = "dictionary"


log = logging.getLogger(__name__)


@contextlib.contextmanager
def stage_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock (an exclusive ``flock`` on its :data:`LOCK_FILE`, released when the job ends, even
    killed): concurrent jobs of one sweep (joblib, SLURM on a shared filesystem with locking) run a shared stage
    one at a time, and the later ones find it done."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another job is running %s; waiting for it", folder)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def stage_config(cfg: DictConfig | dict, stage: str) -> dict[str, Any]:
    """The config nodes ``stage`` depends on (its own and all earlier stages'), resolved to plain data, with the
    secrets a config may hold redacted (:func:`pipeline.utils.redact.redact_config`: a judge ``base_url``'s
    user-info and query string, secret-named ``extra_body`` fields): what ``config.yaml`` records and the stage
    hash covers, so two runs that differ only in a secret share their folders."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}.")
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    out: dict[str, Any] = {}
    for s in STAGES[: STAGES.index(stage) + 1]:
        for node in STAGE_NODES[s]:
            if node in container:
                out[node] = _drop_volatile(container[node])
    if isinstance(out.get("model"), dict):
        out["model"] = {k: v for k, v in out["model"].items() if k not in MODEL_FACTS}
    for node, keys in UNHASHED.items():
        if isinstance(out.get(node), dict):
            out[node] = {k: v for k, v in out[node].items() if k not in keys}
    return redact_config(out)


#: Keys of the ``model`` node that are facts checked before a run, not settings of what it computes: the shape
#: ``conf/model/*.yaml`` records for the config check.
MODEL_FACTS = ("d_model", "n_layers")

#: Keys of a stage's node that say how it computes, not what: left out of the stage config and hash, so turning
#: them on or off reuses the stage's folder. ``eval.cache``: results with and without the cache are equal.
UNHASHED = {"eval": ("cache",)}


def _drop_volatile(node: Any) -> Any:
    """Remove keys that change how a run looks, not what it computes (progress bars, devices for harvest
    are kept since they change the bytes)."""
    if isinstance(node, dict):
        return {k: _drop_volatile(v) for k, v in node.items() if k not in ("progress",)}
    return node


def stage_hash(cfg: DictConfig | dict, stage: str) -> str:
    blob = json.dumps(stage_config(cfg, stage), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def experiment_dir(cfg: DictConfig | dict) -> Path:
    return Path(cfg["output_root"]) / str(cfg["experiment_name"])


def stage_dir(cfg: DictConfig | dict, stage: str) -> Path:
    """``<output_root>/<experiment_name>/<stage>-<hash>``."""
    return experiment_dir(cfg) / f"{stage}-{stage_hash(cfg, stage)}"


def store_dir(cfg: DictConfig | dict) -> Path:
    """The activation store of ``cfg``'s run: ``<harvest stage folder>/store``."""
    return stage_dir(cfg, "harvest") / STORE_DIRNAME


def finished_stage_dir(cfg: DictConfig | dict, stage: str) -> Path:
    """The folder of an earlier stage that a later one reads; ``FileNotFoundError`` naming the command to run
    when it has not finished."""
    folder = stage_dir(cfg, stage)
    if not is_done(folder):
        raise FileNotFoundError(
            f"no finished {stage} stage at {folder}: run `python -m pipeline stage={stage}` "
            f"(or the whole pipeline, `python -m pipeline`) with the same settings first."
        )
    return folder


def is_done(folder: Path) -> bool:
    return (Path(folder) / DONE_MARKER).is_file()


def prepare(folder: Path, cfg: DictConfig | dict, stage: str) -> Path:
    """Create the stage folder and write its config (kept if already there and identical)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(OmegaConf.create(stage_config(cfg, stage)))
    path = folder / STAGE_CONFIG
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)
    return folder


def mark_done(folder: Path, **info: Any) -> None:
    """Write the completion marker (last, atomically)."""
    atomic_write_text(
        Path(folder) / DONE_MARKER,
        json.dumps({"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}, indent=2, default=str),
    )
