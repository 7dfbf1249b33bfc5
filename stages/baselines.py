"""Baselines stage: train every configured SAE baseline with sae-lens on the store the dictionary saw, matched to
the dictionary's fit (by default, each to its held-out curve's plateau or the sample cap) at its width and k.

    python -m pipeline stage=baselines 'baseline=[topk,batchtopk,jumprelu]'   # the dictionary is reused
    python -m stages.baselines compare.budget=equal_samples compare.factor=5

Writes into ``<output_root>/<experiment>/baselines-<hash>/``: one plain sae-lens folder per baseline, named as
in the ``baseline`` node (``cfg.json`` + ``sae_weights.safetensors``, opened by ``sae_lens.SAE.load_from_disk``,
plus our ``record.json``: budget, samples, steps, wall time, training curve, held-out curve and statistics, why it
stopped),
``baselines.json`` (the same, one entry per baseline) and the completion marker. A baseline already saved is
reused when the stage is re-run (each folder is written whole, then renamed into place).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline.baselines import BaselineSpec, load_record, save_baseline, train_baseline
from pipeline.baselines.compare import budget_summary, comparison_width, matched_budget
from pipeline.baselines.io import RECORD_FILE, SUMMARY_FILE
from pipeline.core.dictionary import Dictionary
from pipeline.core.spend import FitSpend
from pipeline.data.loader import training_data
from pipeline.data.store import ActivationStore
from pipeline.runs.config import baseline_specs, check_config_or_exit, open_stage_tracker, register_configs, section
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
from pipeline.utils.atomic import atomic_write_text
from pipeline.utils.devices import resolve_device
from pipeline.utils.tracking import sae_lens_logging

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path:
    """Train (or reuse) every baseline of ``cfg``; returns the stage folder."""
    out = prepare(stage_dir(cfg, "baselines"), cfg, "baselines")
    if is_done(out):
        log.info("baselines already trained: %s", out)
        return out
    specs = baseline_specs(cfg)
    compare = section(cfg, "compare")
    compare.validate()
    fit = finished_stage_dir(cfg, "fit")
    D = Dictionary.load(fit / DICTIONARY_DIRNAME)
    learner = section(cfg, "dictionary")
    spend = FitSpend.of_dictionary(D)
    budget = matched_budget(compare, spend)
    width = comparison_width(compare, D.n_atoms, signed=not D.coder.nonnegative)
    store = ActivationStore(finished_stage_dir(cfg, "harvest") / STORE_DIRNAME)
    model = section(cfg, "model")
    summary: dict[str, Any] = {}
    for name, spec in specs.items():
        if compare.batch_size is not None:
            spec = dataclasses.replace(spec, batch_size=compare.batch_size)
        folder = out / name
        if not (folder / RECORD_FILE).exists():
            config = {**stage_config(cfg, "baselines"), "baseline": {name: dataclasses.asdict(spec)}}
            with open_stage_tracker(cfg, "baselines", f"{name}-{out.name}", config) as tracker:
                trained = train_one(
                    name,
                    spec,
                    store,
                    folder,
                    width=width,
                    k=D.coder.k,
                    budget=budget,
                    seed=learner.seed,
                    metadata=_lens_metadata(model.name, store),
                    logging=sae_lens_logging(tracker),
                )
                tracker.log_curve("curve", trained.record.curve or [], x="seconds")  # after fit(): see tracking
                tracker.log_metrics(
                    "heldout",
                    {
                        "fvu": trained.record.heldout_fvu,
                        "l0": trained.record.heldout_l0,
                        "dead_fraction": trained.record.heldout_dead_fraction,
                        "seconds": trained.record.seconds,
                        "samples": trained.record.samples,
                    },
                )
        record = load_record(folder)
        summary[name] = {
            **record,
            "budget_summary": budget_summary(compare, spend, record),
        }
        if record.get("device") and record["device"] != spend.device and compare.budget == "equal_time":
            log.warning(
                "baseline %s trained on %s but the dictionary on %s: equal_time across devices is not a "
                "like-for-like budget",
                name,
                record["device"],
                spend.device,
            )
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
    mark_done(out, baselines=sorted(summary), budget=compare.budget, dictionary_spend=spend.as_dict())
    return out


def train_one(
    name: str,
    spec: BaselineSpec,
    store: ActivationStore,
    folder: Path,
    *,
    width: int,
    k: int,
    budget: Any,
    seed: int,
    metadata: dict[str, Any],
    logging: dict[str, Any] | None = None,
) -> Any:
    """Train one baseline on ``store``'s training rows (held-out rows for its statistics), save it to ``folder``
    and return it (:class:`~pipeline.baselines.TrainedBaseline`)."""
    device = resolve_device(spec.device)
    data = training_data(store, spec.batch_size, device, seed)
    log.info(
        "baseline %s: %s, width %d, k %d, budget %s on %s", name, spec.architecture, width, k, budget.describe(), device
    )
    trained = train_baseline(
        data, store.d, width, k, spec, budget, heldout=store.heldout(device=device), progress=True, logging=logging
    )
    r = trained.record
    log.info(
        "baseline %s: %d steps, %d samples in %.1f s, held-out FVU %.4f, L0 %.1f; stopped by %s, curve %s",
        name,
        r.steps,
        r.samples,
        r.seconds,
        r.heldout_fvu,
        r.heldout_l0,
        r.stop_reason,
        "flattened" if r.flattened else "not flattened",
    )
    save_baseline(trained, folder, metadata)
    return trained


def _lens_metadata(model_name: str, store: ActivationStore) -> dict[str, Any]:
    """What SAEBench reads from a sae-lens SAE's ``cfg.metadata``: the model, the hook, the context size."""
    return {
        "model_name": model_name,
        "hook_name": store.hook,
        "context_size": int(store.manifest.get("context_length") or 0) or None,
        "prepend_bos": bool(store.manifest.get("prepend_bos", True)),
    }


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    check_config_or_exit(cfg)
    print(run(cfg))


if __name__ == "__main__":
    main()
