"""Hydra callbacks registered in ``conf/config.yaml`` (``hydra.callbacks``).

:class:`RedactSecrets`: Hydra writes the composed config (``config.yaml``), its own config (``hydra.yaml``, with
the command line's overrides) and the overrides (``overrides.yaml``) into each job's ``.hydra/`` folder, and a
sweep's whole config into ``multirun.yaml``, verbatim. Before the job runs, the callback rewrites them with the
secrets :mod:`pipeline.utils.redact` knows replaced (a ``base_url``'s user-info, query string and fragment;
secret-named ``extra_body`` / ``scoring_extra_body`` fields), atomically; the job itself gets the real values.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.utils.atomic import atomic_write_text
from pipeline.utils.redact import redact_config, redact_override, redact_overrides_text

log = logging.getLogger(__name__)

#: The files Hydra writes into a job's output subfolder (``.hydra/``), and a sweep's record in its sweep folder.
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
MULTIRUN_FILE = "multirun.yaml"


def redact_hydra_data(data: Any) -> Any:
    """One of Hydra's records as plain data, redacted: a list is a list of overrides (``overrides.yaml``); a
    mapping goes through :func:`~pipeline.utils.redact.redact_config`, and its ``hydra`` node's override lists
    (``hydra.overrides.task`` / ``.hydra``) and ``hydra.job.override_dirname`` through the override redaction."""
    if isinstance(data, list):
        return [redact_override(x) if isinstance(x, str) else x for x in data]
    if not isinstance(data, dict):
        return data
    out = redact_config(data)
    node = out.get("hydra") if isinstance(out.get("hydra"), dict) else None
    if node is not None:
        overrides = node.get("overrides")
        if isinstance(overrides, dict):
            for key, value in overrides.items():
                if isinstance(value, list):
                    overrides[key] = redact_hydra_data(value)
        job = node.get("job")
        if isinstance(job, dict) and isinstance(job.get("override_dirname"), str):
            job["override_dirname"] = redact_overrides_text(job["override_dirname"])
    return out


def redact_hydra_file(path: Path) -> bool:
    """Rewrite the YAML file ``path`` (one of :data:`HYDRA_FILES` or :data:`MULTIRUN_FILE`) redacted, atomically,
    when it holds a secret; returns whether it was rewritten."""
    path = Path(path)
    if not path.is_file():
        return False
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    out = redact_hydra_data(data)
    if out == data:
        return False
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(out)))
    return True


class RedactSecrets(Callback):
    """Rewrites Hydra's records of the config (a job's ``.hydra/*.yaml``, a sweep's ``multirun.yaml``) with the
    secrets redacted (:func:`redact_hydra_data`) before the job runs, and a sweep's again when it ends."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra = config.hydra
        out = Path(hydra.runtime.output_dir)
        if hydra.output_subdir is not None:
            for name in HYDRA_FILES:
                redact_hydra_file(out / str(hydra.output_subdir) / name)
        if hydra.mode == RunMode.MULTIRUN:
            for folder in (out, *out.parents[:2]):  # the sweep folder: <sweep.dir>/<subdir>
                redact_hydra_file(folder / MULTIRUN_FILE)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        redact_hydra_file(Path(config.hydra.sweep.dir) / MULTIRUN_FILE)


__all__ = ["HYDRA_FILES", "MULTIRUN_FILE", "RedactSecrets", "redact_hydra_data", "redact_hydra_file"]
