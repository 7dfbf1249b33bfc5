"""The points of a sweep, found on disk, and their SAEs combined into one evaluation.

A point is a finished baselines stage folder of the experiment whose fit finished too: its ``config.yaml`` holds
every node up to the baselines (model, data, harvest, dictionary, baseline, compare), and the command's config
with those nodes (:func:`point_config`) is the point's config: its stage folders, evaluate included (with the
command's ``eval`` node), are the ones its own ``python -m pipeline`` run uses.

Points evaluated together (:func:`combine`) hold each distinct SAE once (the same weights file, baselines with
the same weights and config bytes, or the same hub SAE, in two points is evaluated once) under a name unique in
the combined run (two points' distinct baselines may both be ``topk_K64_k4``); :class:`CombinedSAE` maps it back
to each point's own record.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.evals.sae_records import SAERecord
from pipeline.runs.evaluation import PointSAEs
from pipeline.runs.layout import STAGE_CONFIG, experiment_dir, is_done, stage_dir

log = logging.getLogger(__name__)

#: Separator of the suffix that makes a colliding SAE name unique in a combined run (``topk_K64_k4__2``).
UNIQUE_SUFFIX = "__"


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: its config and its stage folders."""

    cfg: DictConfig
    """The command's config with the nodes the point's baselines folder records (:func:`point_config`)."""
    harvest_dir: Path
    fit_dir: Path
    baselines_dir: Path
    evaluate_dir: Path
    """Where its evaluate stage writes (the command's ``eval`` node)."""


def point_config(cfg: DictConfig | dict, folder: Path) -> DictConfig:
    """``cfg`` (resolved) with every node that ``folder``'s ``config.yaml`` records replaced by the recorded one."""
    own = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    recorded = OmegaConf.to_container(OmegaConf.load(Path(folder) / STAGE_CONFIG), resolve=True)
    return OmegaConf.create({**own, **recorded})


def discover_points(cfg: DictConfig | dict) -> tuple[list[SweepPoint], list[str]]:
    """Every point of ``cfg``'s experiment (its finished ``baselines-*`` folders whose fit finished), in folder
    order; and why each other baselines / fit folder was left out."""
    root = experiment_dir(cfg)
    points: list[SweepPoint] = []
    left_out: list[str] = []
    for folder in sorted(root.glob("baselines-*")):
        if not folder.is_dir():
            continue
        if not is_done(folder) or not (folder / STAGE_CONFIG).is_file():
            left_out.append(f"{folder}: the baselines stage has not finished")
            continue
        point = point_config(cfg, folder)
        if stage_dir(point, "baselines") != folder:
            left_out.append(f"{folder}: its {STAGE_CONFIG} does not hash to this folder (another code version?)")
            continue
        fit = stage_dir(point, "fit")
        if not is_done(fit):
            left_out.append(f"{folder}: its fit stage {fit} has not finished")
            continue
        points.append(SweepPoint(point, stage_dir(point, "harvest"), fit, folder, stage_dir(point, "evaluate")))
    used = {p.fit_dir for p in points}
    for fit in sorted(root.glob("fit-*")):
        if is_done(fit) and fit not in used:
            left_out.append(
                f"{fit}: a finished fit with no finished baselines stage (run the point with until=baselines)"
            )
    return points, left_out


def by_store(points: Iterable[SweepPoint]) -> dict[Path, list[SweepPoint]]:
    """``points`` grouped by their harvest folder (one model and store per group), in order."""
    groups: dict[Path, list[SweepPoint]] = {}
    for p in points:
        groups.setdefault(p.harvest_dir, []).append(p)
    return groups


@dataclass
class CombinedSAE:
    """One distinct SAE of a combined run and the points that hold it."""

    record: SAERecord
    """The record the combined run evaluates (named :attr:`name`)."""
    members: list[tuple[PointSAEs, SAERecord]] = field(default_factory=list)
    """Each point holding it, with the point's own record (its own name)."""

    @property
    def name(self) -> str:
        return self.record.name


def renamed(record: SAERecord, name: str) -> SAERecord:
    """``record`` under ``name`` (a hub record is named by its ``(release, sae_id)`` and keeps its own)."""
    if record.hub is not None or record.name == name:
        return record
    return dataclasses.replace(record, name=name, description={**record.description, "name": name})


def combine(points: list[PointSAEs]) -> list[CombinedSAE]:
    """One :class:`CombinedSAE` per distinct SAE of ``points`` (:meth:`PointSAEs.identity`), in order of first
    appearance; each keeps its own name unless an earlier distinct SAE has it, then gets the first free
    ``<name>__<n>`` (n = 2, 3, ...)."""
    combined: dict[tuple[str, ...], CombinedSAE] = {}
    taken: set[str] = set()
    for point in points:
        for record in point.records:
            key = point.identity(record)
            if key not in combined:
                name = record.name
                if record.hub is None:
                    n = 2
                    while name in taken:
                        name, n = f"{record.name}{UNIQUE_SUFFIX}{n}", n + 1
                taken.add(name)
                combined[key] = CombinedSAE(renamed(record, name))
            combined[key].members.append((point, record))
    return list(combined.values())


def rename_values(data: Any, names: dict[str, str], drop: frozenset[str] | set[str] = frozenset()) -> Any:
    """``data`` (parsed JSON) with every string, and every key, that is one of ``names`` replaced by its value;
    entries keyed by one of ``drop`` (other points' SAEs) left out."""
    if isinstance(data, dict):
        return {
            names.get(k, k) if isinstance(k, str) else k: rename_values(v, names, drop)
            for k, v in data.items()
            if k not in drop
        }
    if isinstance(data, list):
        return [rename_values(v, names, drop) for v in data]
    if isinstance(data, str):
        return names.get(data, data)
    return data


def point_names(combined: list[CombinedSAE], point: PointSAEs) -> tuple[dict[str, str], set[str]]:
    """Combined-run name -> ``point``'s own name of every SAE ``point`` holds under another name; and the
    combined-run names of the SAEs it does not hold (the other points')."""
    names: dict[str, str] = {}
    held: set[str] = set()
    for c in combined:
        for member, own in c.members:
            if member is point:
                held.add(c.record.selected[0])
                if own.selected[0] != c.record.selected[0]:
                    names[c.record.selected[0]] = own.selected[0]
    return names, {c.record.selected[0] for c in combined} - held
