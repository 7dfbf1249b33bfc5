"""Benchmark: DB-KSVD against sae-lens SAEs on the default store, at equal time, at 5x, and to the plateau.

Reads a finished default run (``python -m pipeline``): its store, its dictionary (fit time and held-out FVU) and its
baselines, which trained under the default ``plateau`` budget (to the held-out curve's plateau or the sample
cap). Then trains each baseline architecture again under ``equal_time`` budgets of 1x and 5x the dictionary's fit
time, with the same recipe (sae-lens's lr shape decaying over the last 20% of the seconds, dead window scaled to
the run), and scores every SAE on the store's held-out rows. Equal-time figures depend on the machine's speed (the
script records its machine and the fit's seconds); the plateau runs' lengths are in samples.

Usage: python benchmarks/bench_compare.py --run outputs/default [--factors 1,5] [--archs topk,batchtopk]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_folders import latest_finished  # noqa: E402

from pipeline.baselines import BaselineSpec, train_baseline  # noqa: E402
from pipeline.baselines.compare import CompareConfig, matched_budget  # noqa: E402
from pipeline.core.dictionary import Dictionary  # noqa: E402
from pipeline.core.spend import FitSpend  # noqa: E402
from pipeline.data.loader import training_data  # noqa: E402
from pipeline.data.store import ActivationStore  # noqa: E402
from pipeline.evals.sae_records import dictionary_curve  # noqa: E402
from pipeline.utils.atomic import atomic_write_text  # noqa: E402
from pipeline.utils.curves import first_reaching, value_at  # noqa: E402

#: What each SAE's entry keeps from its training record.
RECORD_KEYS = (
    "architecture",
    "budget",
    "heldout_fvu",
    "heldout_l0",
    "heldout_dead_fraction",
    "seconds",
    "samples",
    "steps",
    "stop_reason",
    "flattened",
    "improvement_per_doubling",
    "dead_mask_steps",
    "heldout_curve",
)


def quality(rec: dict, target_fvu: float, fit_seconds: float) -> dict:
    """``rec``'s record fields plus its time to quality: its held-out FVU at the dictionary's fit time (None when
    its curve ended before), and the seconds and samples its held-out curve took to reach ``target_fvu`` (None:
    not reached by its end)."""
    out = {key: rec.get(key) for key in RECORD_KEYS}
    curve = rec.get("heldout_curve") or []
    out["fvu_at_fit_seconds"] = value_at(curve, fit_seconds, "seconds")
    out["seconds_to_dictionary_fvu"] = first_reaching(curve, target_fvu, "seconds")
    out["samples_to_dictionary_fvu"] = first_reaching(curve, target_fvu, "samples")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="outputs/default", help="the default run's experiment folder")
    ap.add_argument("--factors", default="1,5")
    ap.add_argument("--archs", default="topk,batchtopk")
    ap.add_argument("--out", default="benchmarks/results_compare.json")
    args = ap.parse_args()
    run = Path(args.run)
    store = ActivationStore(latest_finished(run, "harvest-*") / "store")
    fit = latest_finished(run, "fit-*")
    D = Dictionary.load(fit / "dictionary")
    fit_metrics = json.loads((fit / "metrics.json").read_text())["dictionary"]
    baselines = json.loads((latest_finished(run, "baselines-*") / "baselines.json").read_text())
    spend = FitSpend.of_dictionary(D)
    target = float(fit_metrics["heldout_fvu"])
    heldout = store.heldout()
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "store": f"{store.hook}, {store.n_rows()} train rows, {store.n_rows('heldout')} held-out rows, d={store.d}",
        "dictionary": {
            "n_atoms": D.n_atoms,
            "k": D.coder.k,
            "fit_seconds": spend.seconds,
            "samples": spend.samples,
            "updates": spend.updates,
            "heldout_fvu": target,
            "heldout_l0": fit_metrics["heldout_l0"],
            "heldout_curve": dictionary_curve(D.history, key="heldout_fvu"),
        },
        "plateau": {name: quality(rec, target, spend.seconds) for name, rec in baselines.items()},
        "equal_time": {},
    }
    for factor in (float(f) for f in args.factors.split(",")):
        budget = matched_budget(CompareConfig(budget="equal_time", factor=factor), spend)
        for arch in args.archs.split(","):
            spec_fields = (baselines.get(arch) or {}).get("spec") or {}
            spec = BaselineSpec(arch, lr=spec_fields.get("lr", 3e-4), batch_size=spec_fields.get("batch_size", 1024))
            data = training_data(store, spec.batch_size, torch.device("cpu"), 0)
            r = train_baseline(data, store.d, D.n_atoms, D.coder.k, spec, budget, heldout=heldout).record
            entry = quality(dataclasses.asdict(r), target, spend.seconds)
            res["equal_time"][f"{arch} x{factor:g}"] = {"factor": factor, "lr": spec.lr, **entry}
            atomic_write_text(Path(args.out), json.dumps(res, indent=1))
            print(f"{arch} x{factor:g}: {r.steps} steps, FVU {r.heldout_fvu:.4f}, flattened {r.flattened}", flush=True)
    atomic_write_text(Path(args.out), json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
