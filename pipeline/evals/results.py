"""The evaluate folder's layout: file names, where SAEBench writes a result, and the stage's record files.

<evaluate folder>/
    eval_results/<metric>/<sae name>_custom_sae_eval_results.json   SAEBench's own result files
    artifacts/<metric>/                                            SAEBench's probes, activations, logs
    data/labelled/                                                 the labelled passages (parquet + spec)
    sae_lens/<sae name>/                                           the dictionary in the sae-lens format
    saes.json  skipped.json  failed.json  eval_info.json           what the stage records
    result_weights.json                                            each result's SAE and its weights' sha256
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import torch

from pipeline.utils.atomic import atomic_write_text

RESULTS_SUBDIR = "eval_results"
"""SAEBench's result files, one folder per metric."""
ARTIFACTS_SUBDIR = "artifacts"
"""SAEBench's intermediate files (probes, cached activations, logs), one folder per metric."""
LABELLED_SUBDIR = Path("data") / "labelled"
"""The labelled passages built for sparse probing / SCR / TPP."""
SAE_LENS_SUBDIR = "sae_lens"
"""The dictionary exported in the sae-lens format, one folder per SAE."""
SAES_FILE = "saes.json"
"""Each evaluated SAE: architecture, width, k, held-out L0 / FVU / dead fraction, coherence, fit history."""
SKIPPED_FILE = "skipped.json"
"""Every metric (or SAE) not evaluated, with the reason."""
FAILED_FILE = "failed.json"
"""Metrics that raised, with the error."""
INFO_FILE = "eval_info.json"
"""Eval sizes used, per-metric wall time, the model, the data, notes."""
RESULT_WEIGHTS_FILE = "result_weights.json"
"""Result file (relative to ``eval_results/``) -> the SAE and the sha256 of the weights it was computed from: a
result whose SAE's weights changed since is re-run (:mod:`pipeline.evals.kept_results`)."""
CUSTOM_SAE_ID = "custom_sae"
"""SAEBench's id of an SAE passed in as an object (a sae-lens ``(release, sae_id)`` pair keeps its own id)."""


def saebench_sae_id(sae: Any) -> str:
    """SAEBench's id of the SAE ``sae`` it is given: the id string of a sae-lens ``(release, sae_id)`` pair, else
    :data:`CUSTOM_SAE_ID` (an SAE object)."""
    return sae if isinstance(sae, str) else CUSTOM_SAE_ID


def result_path(results_dir: Path, metric: str, sae_name: str, sae: Any = None) -> Path:
    """Where SAEBench writes the result of ``(sae_name, sae)`` for ``metric`` under ``results_dir``: SAE objects
    get the id ``custom_sae``; for a sae-lens ``(release, sae_id)`` pair, ``sae`` is the id string."""
    from sae_bench.sae_bench_utils.general_utils import get_results_filepath

    return Path(get_results_filepath(str(Path(results_dir) / metric), sae_name, saebench_sae_id(sae)))


def format_exception(exc: BaseException) -> str:
    """``Type: message`` of an exception (what ``failed.json`` records)."""
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically; tensors become lists, anything else unknown a string."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)
