"""Which of an evaluate folder's existing result files may be kept (SAEBench keeps any that exists, unless
``eval.force_rerun``).

* A file that does not parse (a run killed mid-write before writes were atomic, a full disk) is dropped at the
  start of the stage, with a warning naming it (:func:`drop_unreadable`); so are temporary files a killed write
  left behind.
* Every result of one of this run's SAEs is recorded, in :data:`pipeline.evals.results.RESULT_WEIGHTS_FILE`, with
  the sha256 of that SAE's weights file (:func:`weights_sha256`). When the dictionary is re-fitted or a baseline
  retrained, its weights differ and its results are dropped, so they are re-run; a result with no record (an
  older run, or a kill between SAEBench's write and the record) is dropped too (:class:`ResultLedger`). Results of
  SAEs this run does not hold the weights of (hub SAEs, copied published results) are left alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipeline.evals.results import RESULT_WEIGHTS_FILE
from pipeline.evals.sae_records import SAERecord
from pipeline.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

#: Leftovers of an interrupted write under ``eval_results/``: :mod:`pipeline.utils.atomic`'s temporary files and
#: the core runner's unfinished ``core_fit_positions`` file.
LEFTOVER_GLOBS = (".*.tmp-*", ".*.partial")
_BLOCK = 1 << 20


def drop_unreadable(results_dir: Path) -> list[Path]:
    """Delete every ``*.json`` under ``results_dir`` that does not parse as JSON (logged as a warning, with the
    error) and every leftover of an interrupted write (:data:`LEFTOVER_GLOBS`); returns the deleted files."""
    results_dir = Path(results_dir)
    dropped: list[Path] = []
    if not results_dir.is_dir():
        return dropped
    for pattern in LEFTOVER_GLOBS:
        for path in sorted(results_dir.rglob(pattern)):
            if path.is_file():
                path.unlink()
                dropped.append(path)
    for path in sorted(results_dir.rglob("*.json")):
        if not path.is_file():
            continue
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("dropping result file %s: it does not parse as JSON (%s); its metric re-runs", path, exc)
            path.unlink()
            dropped.append(path)
    return dropped


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def weights_file(record: SAERecord, dictionary_dir: Path | None) -> Path | None:
    """The file holding ``record``'s weights: the fit's ``dictionary.safetensors`` for the dictionary, a baseline
    folder's ``sae_weights.safetensors``; None for an SAE this run does not hold (a hub SAE)."""
    from pipeline.core.dictionary import DICTIONARY_WEIGHTS
    from pipeline.saes.sae_lens_io import WEIGHTS_FILE

    kind = record.description.get("kind")
    if kind == "dictionary" and dictionary_dir is not None:
        return Path(dictionary_dir) / DICTIONARY_WEIGHTS
    if kind == "baseline" and record.description.get("folder"):
        return Path(record.description["folder"]) / WEIGHTS_FILE
    return None


def baseline_content(record: SAERecord) -> tuple[str, str] | None:
    """sha256 of a baseline's weights file and of its sae-lens config (``cfg.json``), the two files its SAE is
    loaded from: two baseline folders with equal digests hold the same SAE, and score the same. A sweep over a
    dictionary setting the baselines do not depend on (``dictionary.max_iters`` under the default budget) trains
    the same baselines again at each point, byte for byte on one machine. None for a record that is not a
    baseline or lacks either file."""
    from pipeline.saes.sae_lens_io import CFG_FILE

    weights = weights_file(record, None)  # a baseline's; None for any other record (no dictionary folder given)
    if weights is None:
        return None
    config = weights.parent / CFG_FILE
    if not (weights.is_file() and config.is_file()):
        return None
    return record.description.get("weights_sha256") or file_sha256(weights), file_sha256(config)


def weights_sha256(records: Iterable[SAERecord], dictionary_dir: Path | None) -> dict[str, str]:
    """SAE name -> sha256 of its weights file (:func:`weights_file`), for every record that has one; also written
    into the record's description (``weights_sha256``, in ``saes.json``)."""
    out: dict[str, str] = {}
    for record in records:
        path = weights_file(record, dictionary_dir)
        if path is not None and path.is_file():
            out[record.name] = record.description["weights_sha256"] = file_sha256(path)
    return out


class ResultLedger:
    """``<evaluate folder>/result_weights.json``: result file (relative to ``eval_results/``) -> the SAE and the
    sha256 of the weights it was computed from."""

    def __init__(self, folder: Path, results_dir: Path, shas: dict[str, str]):
        self.path = Path(folder) / RESULT_WEIGHTS_FILE
        self.results_dir = Path(results_dir)
        self.shas = dict(shas)
        self.entries: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            log.warning("%s does not parse; every result of this run's SAEs re-runs", self.path)
            return {}
        return data if isinstance(data, dict) else {}

    def _key(self, path: Path) -> str:
        return path.relative_to(self.results_dir).as_posix()

    def drop_stale(self, records: Iterable[SAERecord]) -> list[Path]:
        """Delete every existing result file of ``records`` (in any metric folder) that is not recorded with the
        sha256 of its SAE's current weights; returns the deleted files."""
        dropped: list[Path] = []
        if not self.results_dir.is_dir():
            return dropped
        folders = sorted(p for p in self.results_dir.iterdir() if p.is_dir())
        for record in records:
            sha = self.shas.get(record.name)
            if sha is None:
                continue
            for folder in folders:
                path = record.result_path(self.results_dir, folder.name)
                if not path.is_file():
                    continue
                entry = self.entries.get(self._key(path)) or {}
                if entry.get("weights_sha256") == sha:
                    continue
                why = "its SAE's weights changed since" if entry else "no record of the weights it was computed from"
                log.info("re-running %s: %s", path, why)
                path.unlink()
                self.entries.pop(self._key(path), None)
                dropped.append(path)
        if dropped:
            self.save()
        return dropped

    def note(self, records: Iterable[SAERecord], files: Callable[[SAERecord], list[Path]]) -> None:
        """Record every existing result file of ``records`` (``files(record)``) with its SAE's current sha256
        (after a metric ran: any such file was kept by :meth:`drop_stale` or computed now), and save."""
        changed = False
        for record in records:
            sha = self.shas.get(record.name)
            if sha is None:
                continue
            for path in files(record):
                if path.is_file():
                    entry = {"sae": record.name, "weights_sha256": sha}
                    changed |= self.entries.get(self._key(path)) != entry
                    self.entries[self._key(path)] = entry
        if changed:
            self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(dict(sorted(self.entries.items())), indent=2))


__all__ = [
    "LEFTOVER_GLOBS",
    "ResultLedger",
    "baseline_content",
    "drop_unreadable",
    "file_sha256",
    "weights_file",
    "weights_sha256",
]
