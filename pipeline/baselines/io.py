"""A trained baseline on disk: a plain sae-lens folder plus our record.

``<folder>/cfg.json`` and ``<folder>/sae_weights.safetensors`` are written by sae-lens's own ``save_model`` of the
inference SAE (exactly what ``save_inference_model`` writes), so ``sae_lens.SAE.load_from_disk(folder)`` opens it
with no code of ours; ``<folder>/record.json`` is the :class:`~pipeline.baselines.train.BaselineRecord`.
The folder is written whole into a temporary sibling, then renamed into place: a reader sees no folder, the old
one or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sae_lens import SAE

from pipeline.baselines.train import TrainedBaseline
from pipeline.saes.sae_lens_io import CFG_FILE, WEIGHTS_FILE
from pipeline.utils.atomic import atomic_write_text

#: Our record of the training run, beside sae-lens's files.
RECORD_FILE = "record.json"
#: In the folder holding several baselines: name -> record + the budget each was matched to.
SUMMARY_FILE = "baselines.json"


def save_baseline(
    trained: TrainedBaseline, folder: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``trained`` to ``folder`` (replacing any previous one): sae-lens's ``cfg.json`` and weights, and
    :data:`RECORD_FILE`. ``metadata`` entries (e.g. ``model_name``, ``hook_name``, which SAEBench reads) are set
    on ``trained.sae.cfg.metadata`` first. Returns the folder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for key, value in (metadata or {}).items():
        setattr(trained.sae.cfg.metadata, key, value)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        trained.sae.save_model(tmp)
        atomic_write_text(tmp / RECORD_FILE, json.dumps(_jsonable(trained.record), indent=2))
        for name in (CFG_FILE, WEIGHTS_FILE):
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_baseline(folder: str | os.PathLike, device: str = "cpu") -> SAE:
    """The saved SAE, loaded by plain sae-lens (``sae_lens.SAE.load_from_disk``)."""
    return SAE.load_from_disk(str(folder), device=device)


def load_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The saved :data:`RECORD_FILE` as a dict."""
    return json.loads((Path(folder) / RECORD_FILE).read_text(encoding="utf-8"))


def _jsonable(record: Any) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(record), default=str))


__all__ = ["CFG_FILE", "RECORD_FILE", "SUMMARY_FILE", "WEIGHTS_FILE", "load_baseline", "load_record", "save_baseline"]
