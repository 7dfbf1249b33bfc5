"""Dashboards stage: feature dashboards of the dictionary and every baseline, as static HTML in its folder.

    python -m stages.dashboards                          # the configured experiment's SAEs and store
    python -m pipeline stage=dashboards dashboards.n_random=32 dashboards.include=[12,40]

Inputs: the fit stage's dictionary, the baselines stage's sae-lens SAEs, the harvest store (its rows and token ids:
no second forward pass over the text), the model (tokenizer and unembedding), and, when the evaluate stage ran
autointerp, its explanations. Outputs: ``index.html``, ``<sae>.html`` per SAE and ``dashboards.json``
(:mod:`pipeline.report.dashboards`); the report's ``index.html`` links them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline.data.config import parse_harvest_config
from pipeline.data.harvest import hook_layer
from pipeline.data.models import load_model
from pipeline.data.store import ActivationStore
from pipeline.evals.results import RESULTS_SUBDIR
from pipeline.evals.sae_records import SAERecord, fit_records
from pipeline.report.dashboards import INDEX_FILE, build_dashboards
from pipeline.report.dashboards.render import write_index
from pipeline.runs.config import baseline_specs, check_config_or_exit, register_configs, section
from pipeline.runs.layout import DICTIONARY_DIRNAME, finished_stage_dir, mark_done, prepare, stage_dir
from pipeline.runs.layout import store_dir as run_store_dir
from pipeline.utils.devices import resolve_device

log = logging.getLogger(__name__)


def run(cfg: DictConfig | dict, *, model: Any = None) -> Path:
    """Draw the dashboards of the configured experiment's SAEs; returns the stage folder."""
    d = section(cfg, "dashboards")
    d.validate()
    folder = prepare(stage_dir(cfg, "dashboards"), cfg, "dashboards")
    if not d.enabled:
        write_index(folder / INDEX_FILE, [], [], "Dashboards are switched off (dashboards.enabled=false).")
        mark_done(folder, drawn=[])
        return folder
    model_cfg, _, harvest = parse_harvest_config(cfg)
    store = ActivationStore(run_store_dir(cfg))
    if not store.has_tokens():
        reason = (
            f"the store at {store.path} keeps no token ids (an imported array, or a harvest made before "
            "token ids were kept); re-harvest into a fresh output folder to get dashboards"
        )
        write_index(folder / INDEX_FILE, [], [{"what": "every SAE", "reason": reason}], "No dashboards.")
        mark_done(folder, drawn=[], skipped=reason)
        return folder
    evals = section(cfg, "eval")
    device = str(resolve_device(d.device or evals.device or model_cfg.device))
    names = list(baseline_specs(cfg))
    baselines_dir = finished_stage_dir(cfg, "baselines") if names and any(s != "dictionary" for s in d.saes) else None
    context = int(store.manifest.get("context_length") or harvest.context_length)
    saes, skipped = fit_records(
        d.saes,
        finished_stage_dir(cfg, "fit") / DICTIONARY_DIRNAME,
        baselines_dir,
        names,
        model_name=model_cfg.name,
        hook=store.hook,
        layer=hook_layer(store.hook),
        device=device,
        cache_mb=0,
        context_size=context,
        prepend_bos=bool(store.manifest.get("prepend_bos", True)),
    )
    if model is None:
        model = load_model(
            model_cfg.name, path=model_cfg.path, device=device, dtype=model_cfg.dtype, n_ctx=model_cfg.n_ctx
        )
    judged = autointerp_notes(saes, stage_dir(cfg, "evaluate") / RESULTS_SUBDIR)
    summary = build_dashboards(
        [(r.name, r.sae) for r in saes], store, model, d, folder, device=device, judged=judged, skipped=skipped
    )
    mark_done(folder, drawn=[s["name"] for s in summary["saes"]])
    return folder


def autointerp_notes(saes: list[SAERecord], results_dir: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """Autointerp's explanation and score of each judged latent, per SAE, from the evaluate stage's result files
    (SAEBench's ``eval_result_unstructured``); empty where autointerp did not run."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in saes:
        path = r.result_path(results_dir, "autointerp")
        if path.is_file():
            per = json.loads(path.read_text(encoding="utf-8")).get("eval_result_unstructured") or {}
            out[r.name] = {
                int(k): {"explanation": v.get("explanation"), "score": v.get("score")} for k, v in per.items()
            }
    return out


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    check_config_or_exit(cfg)
    folder = run(cfg)
    print(f"dashboards: {folder / INDEX_FILE}")


if __name__ == "__main__":
    main()
