"""RAVEL's prompt files on disk: the layout SAEBench reads, checks of a local copy, and staging that copy where
SAEBench looks, so it never downloads.

SAEBench 0.6.0's RAVEL (``RAVELInstance.load_files``) reads, for every entity type of
``entity_attribute_selection``, four JSON files from ``<artifact_dir>/base/``, and downloads
``adamkarvonen/ravel_prompts`` from the hub when one of them is missing::

    ravel_<entity>_attribute_to_prompts.json   attribute -> templates   {"Country": ["%s is a city in the country of"]}
    ravel_<entity>_prompt_to_split.json        template -> train / val    {"%s is a city in the country of": "train"}
    ravel_<entity>_entity_attributes.json      entity -> attribute -> label   {"Paris": {"Country": "France"}}
    ravel_<entity>_entity_to_split.json        entity -> train / val      {"Paris": "train"}

``eval.ravel.data_dir`` may be the folder holding ``base/`` (SAEBench's artifact layout) or ``base/`` itself (a
snapshot of the hub data set has the files at its top): :func:`base_dir` decides. :func:`stage_ravel_data`
copies the selected files into an artifact folder named by their fingerprint, so the model answers SAEBench
caches per artifact folder never outlive a change of the data, and the user's folder is only read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BASE_SUBDIR = "base"
"""Sub-folder of SAEBench's RAVEL artifact folder holding the prompt files."""
FILE_KINDS = ("attribute_to_prompts", "prompt_to_split", "entity_attributes", "entity_to_split")
"""The four files of one entity type, as ``ravel_<entity>_<kind>.json``."""
FILE_NAME = "ravel_{entity}_{kind}.json"
"""Name of one prompt file."""
HUB_DATASET = "adamkarvonen/ravel_prompts"
"""The hub data set SAEBench downloads when a file is missing."""
STAGED_PREFIX = "local-"
"""Artifact sub-folder of a staged local copy: ``local-<fingerprint>/base/``."""
CACHED_INSTANCE_SUFFIXES = ("_unfiltered_full_instance.json", "_filtered_dataset.json")
"""SAEBench's cached model answers (per artifact folder); ``force_dataset_recompute`` removes them."""
PLACEHOLDER = "%s"
"""Where a template takes the entity."""
MAX_LISTED = 5
"""Problems of one kind listed before the rest are counted."""


def ravel_file_names(entity: str) -> dict[str, str]:
    """``kind -> file name`` of the four prompt files of ``entity``."""
    return {kind: FILE_NAME.format(entity=entity, kind=kind) for kind in FILE_KINDS}


def base_dir(data_dir: str | os.PathLike) -> Path:
    """The folder holding the prompt files: ``data_dir/base`` when it exists, else ``data_dir`` itself."""
    d = Path(data_dir).expanduser()
    return d / BASE_SUBDIR if (d / BASE_SUBDIR).is_dir() else d


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(repr(i) for i in items[:MAX_LISTED]) + more


def _entity_problems(files: dict[str, Any], entity: str, attributes: list[str]) -> list[str]:
    """What in one entity type's parsed files SAEBench would crash on, or could not form pairs from."""
    prompts, prompt_split = files["attribute_to_prompts"], files["prompt_to_split"]
    labels, entity_split = files["entity_attributes"], files["entity_to_split"]
    out = []
    if len(attributes) < 2:
        out.append(
            f"{entity}: needs at least two attributes in eval.ravel.config.entity_attribute_selection "
            f"(one MDBM per attribute, isolation measured on the others); got {attributes}"
        )
    for attr in attributes:
        templates = prompts.get(attr) or []
        if not templates:
            out.append(
                f"{entity}: attribute {attr!r} has no templates in "
                f"{FILE_NAME.format(entity=entity, kind='attribute_to_prompts')} (it has {sorted(prompts)})"
            )
        bad = [t for t in templates if t.count(PLACEHOLDER) != 1]
        if bad:
            out.append(f"{entity}/{attr}: templates need exactly one {PLACEHOLDER}: {_listed(bad)}")
        bare = [t for t in templates if t.count(PLACEHOLDER) == 1 and not t.split(PLACEHOLDER)[1].strip()]
        if bare:  # SAEBench finds the entity's last token from the text after %s; with none it relies on a BOS
            log.warning(
                "RAVEL %s/%s: templates ending in %s (the entity position is then only right for "
                "tokenizers that prepend BOS): %s",
                entity,
                attr,
                PLACEHOLDER,
                _listed(bare),
            )
        unsplit = [t for t in templates if t not in prompt_split]
        if unsplit:
            out.append(
                f"{entity}/{attr}: templates missing from "
                f"{FILE_NAME.format(entity=entity, kind='prompt_to_split')}: {_listed(unsplit)}"
            )
        unlabelled = [e for e, attrs in labels.items() if attr not in (attrs or {})]
        if unlabelled:
            out.append(f"{entity}/{attr}: entities without this attribute: {_listed(unlabelled)}")
        if len({(attrs or {}).get(attr) for attrs in labels.values()} - {None, ""}) < 2:
            out.append(
                f"{entity}/{attr}: fewer than two distinct labels (a cause pair needs a source whose "
                "label differs from the base's)"
            )
    unsplit = [e for e in labels if e not in entity_split]
    if unsplit:
        out.append(
            f"{entity}: entities missing from "
            f"{FILE_NAME.format(entity=entity, kind='entity_to_split')}: {_listed(unsplit)}"
        )
    return out


def data_problems(data_dir: str | os.PathLike, selection: dict[str, list[str]]) -> list[str]:
    """Why SAEBench could not run RAVEL on ``data_dir`` for ``selection`` (entity type -> attributes): the
    folder or files missing (named), unreadable JSON, or contents it would crash on. Empty when usable."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        return [f"{root} is not a folder"]
    base = base_dir(root)
    missing = [
        name for entity in selection for name in ravel_file_names(entity).values() if not (base / name).is_file()
    ]
    if missing:
        return [
            f"missing {_listed(missing)} in {base} (RAVEL reads ravel_<entity>_{{{', '.join(FILE_KINDS)}}}.json "
            f"for every entity type of eval.ravel.config.entity_attribute_selection: {sorted(selection)})"
        ]
    out: list[str] = []
    for entity, attributes in selection.items():
        try:
            files = {kind: json.loads((base / name).read_text()) for kind, name in ravel_file_names(entity).items()}
        except (OSError, ValueError) as exc:
            out.append(f"{entity}: unreadable JSON ({exc})")
            continue
        out.extend(_entity_problems(files, entity, list(attributes)))
    return out


def check_ravel_data(data_dir: str | os.PathLike, selection: dict[str, list[str]]) -> str | None:
    """A skip reason naming what is wrong with ``data_dir`` and the fix, or None when SAEBench can use it."""
    problems = data_problems(data_dir, selection)
    if not problems:
        return None
    return (
        f"eval.ravel.data_dir={data_dir} is not usable RAVEL data: {'; '.join(problems)}. Fix the files, point "
        f"eval.ravel.data_dir at the folder holding {BASE_SUBDIR}/ (or at {BASE_SUBDIR}/ itself), or set "
        "eval.ravel.config.entity_attribute_selection to the entity types and attributes the folder has"
    )


def data_fingerprint(data_dir: str | os.PathLike, selection: dict[str, list[str]], extra: dict[str, Any]) -> str:
    """12 hex digits over the selected files' bytes, ``selection`` and ``extra`` (what else SAEBench's cached
    answers depend on: the model, the generated tokens, the downsampling)."""
    h = hashlib.sha256(json.dumps({"selection": selection, "extra": extra}, sort_keys=True, default=str).encode())
    base = base_dir(data_dir)
    for entity in sorted(selection):
        for name in ravel_file_names(entity).values():
            h.update(name.encode())
            h.update((base / name).read_bytes())
    return h.hexdigest()[:12]


def staged_dir(
    data_dir: str | os.PathLike, selection: dict[str, list[str]], artifact_root: Path, extra: dict[str, Any]
) -> Path:
    """The folder :func:`stage_ravel_data` stages into (``artifact_root/local-<fingerprint>``), without copying."""
    return Path(artifact_root) / f"{STAGED_PREFIX}{data_fingerprint(data_dir, selection, extra)}"


def stage_ravel_data(
    data_dir: str | os.PathLike, selection: dict[str, list[str]], artifact_root: Path, extra: dict[str, Any]
) -> Path:
    """Copy the selected prompt files of ``data_dir`` into ``artifact_root/local-<fingerprint>/base/`` and return
    ``artifact_root/local-<fingerprint>`` (SAEBench's ``artifact_dir``: it finds every file, so it does not
    download). Each file is written beside its target and renamed, so an interrupted copy is never read."""
    src = base_dir(data_dir)
    staged = staged_dir(data_dir, selection, artifact_root, extra)
    dst = staged / BASE_SUBDIR
    dst.mkdir(parents=True, exist_ok=True)
    for entity in selection:
        for name in ravel_file_names(entity).values():
            if not (dst / name).is_file():
                tmp = dst / f".{name}.tmp-{os.getpid()}"
                shutil.copyfile(src / name, tmp)
                os.replace(tmp, dst / name)
    log.info("RAVEL data %s staged in %s", src, staged)
    return staged


def clear_cached_instances(artifact_dir: Path) -> list[Path]:
    """Remove SAEBench's cached model answers in ``artifact_dir`` (its ``force_dataset_recompute``, which
    SAEBench 0.6.0 declares but never reads); returns the removed files."""
    removed = [p for p in Path(artifact_dir).glob("*.json") if p.name.endswith(CACHED_INSTANCE_SUFFIXES)]
    for p in removed:
        p.unlink()
    return removed


def filtered_prompt_counts(artifact_dir: Path) -> dict[str, dict[str, int]]:
    """Prompts the model answered right and RAVEL kept, per entity type and attribute, from SAEBench's
    filtered data sets in ``artifact_dir`` (what the MDBMs were trained and scored on)."""
    out: dict[str, dict[str, int]] = {}
    for p in sorted(Path(artifact_dir).glob(f"*{CACHED_INSTANCE_SUFFIXES[1]}")):
        data = json.loads(p.read_text())
        entity = data.get("config", {}).get("entity_type", p.name)
        out[entity] = dict(sorted(Counter(q["attribute_type"] for q in data.get("prompts", [])).items()))
    return out


def write_ravel_data(
    folder: str | os.PathLike,
    entity: str,
    entity_attributes: dict[str, dict[str, str]],
    attribute_prompts: dict[str, list[str]],
    entity_split: dict[str, str],
    prompt_split: dict[str, str],
) -> Path:
    """Write one entity type's four prompt files into ``folder/base/`` (RAVEL's layout); returns ``folder``.

    For a data set of your own: ``entity_attributes`` maps each entity to its labels (``{"Paris": {"Country":
    "France"}}``), ``attribute_prompts`` each attribute to templates with one ``%s`` followed by text, and the
    two splits every entity / template to ``train`` or ``val``."""
    base = Path(folder) / BASE_SUBDIR
    base.mkdir(parents=True, exist_ok=True)
    data = {
        "attribute_to_prompts": attribute_prompts,
        "prompt_to_split": prompt_split,
        "entity_attributes": entity_attributes,
        "entity_to_split": entity_split,
    }
    for kind, name in ravel_file_names(entity).items():
        (base / name).write_text(json.dumps(data[kind], indent=1))
    return Path(folder)


__all__ = [
    "BASE_SUBDIR",
    "FILE_KINDS",
    "FILE_NAME",
    "HUB_DATASET",
    "STAGED_PREFIX",
    "ravel_file_names",
    "base_dir",
    "data_problems",
    "check_ravel_data",
    "data_fingerprint",
    "stage_ravel_data",
    "clear_cached_instances",
    "filtered_prompt_counts",
    "write_ravel_data",
]
