"""Benchmark: the learning rate of each SAE architecture, swept on the default store under the default budget.

Each (architecture, lr) trains with sae-lens's trainer exactly as the baselines stage does (the architecture's
``conf/baseline`` spec, the default comparison's batch size, width and k) under the default ``plateau`` budget
(to the held-out curve's plateau or the sample cap, lr decaying over the last 20%), and is scored on the store's
held-out rows. The figures that decide are held-out FVU and L0 at the end (machine-independent: the run's length
is in samples); wall seconds are recorded but depend on the machine and on what else runs.

Results are written after every run, and runs already in ``--out`` are skipped, so an interrupted sweep resumes.

Usage: python benchmarks/bench_baseline_lr.py --store <store dir> [--archs topk,batchtopk] [--lrs 3e-4,1e-3,3e-3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.baselines import BaselineSpec, train_baseline  # noqa: E402
from pipeline.baselines.compare import CompareConfig, matched_budget  # noqa: E402
from pipeline.core.spend import FitSpend  # noqa: E402
from pipeline.data.loader import training_data  # noqa: E402
from pipeline.data.store import ActivationStore  # noqa: E402
from pipeline.utils.atomic import atomic_write_text  # noqa: E402

#: The default comparison's batch size on CPU (conf/experiment/default.yaml) and the default dictionary's K, k.
BATCH_SIZE, WIDTH, K = 1024, 2048, 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--archs", default="topk,batchtopk")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    ap.add_argument("--cap-samples", type=int, default=CompareConfig().cap_samples)
    ap.add_argument("--out", default="benchmarks/results_baseline_lr.json")
    args = ap.parse_args()
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {"runs": []}
    store = ActivationStore(args.store)
    compare = CompareConfig(cap_samples=args.cap_samples)
    budget = matched_budget(compare, FitSpend(seconds=1.0, samples=1, updates=1, device="cpu"))
    res.update(
        machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        torch=torch.__version__,
        store=f"{store.manifest.get('meta', {}).get('model', {}).get('name', '?')} {store.hook}, "
        f"{store.n_rows()} train rows, {store.n_rows('heldout')} held-out rows, d={store.d}",
        width=WIDTH,
        k=K,
        batch_size=BATCH_SIZE,
        budget=budget.describe(),
    )
    heldout = store.heldout()
    for arch in args.archs.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            if any(r["architecture"] == arch and r["lr"] == lr for r in res["runs"]):
                continue
            spec = BaselineSpec(arch, lr=lr, batch_size=BATCH_SIZE)
            data = training_data(store, spec.batch_size, torch.device("cpu"), 0)
            t = time.perf_counter()
            r = train_baseline(data, store.d, WIDTH, K, spec, budget, heldout=heldout).record
            run = {
                "architecture": arch,
                "lr": lr,
                "date": time.strftime("%Y-%m-%d"),
                "heldout_fvu": r.heldout_fvu,
                "heldout_l0": r.heldout_l0,
                "heldout_dead_fraction": r.heldout_dead_fraction,
                "steps": r.steps,
                "samples": r.samples,
                "seconds": r.seconds,
                "wall_seconds": time.perf_counter() - t,
                "stop_reason": r.stop_reason,
                "flattened": r.flattened,
                "improvement_per_doubling": r.improvement_per_doubling,
                "dead_mask_steps": r.dead_mask_steps,
                "heldout_curve": r.heldout_curve,
            }
            res["runs"].append(run)
            atomic_write_text(out, json.dumps(res, indent=1))
            print(
                f"{arch} lr={lr:g}: FVU {r.heldout_fvu:.4f} L0 {r.heldout_l0:.1f} dead {r.heldout_dead_fraction:.3f} "
                f"{r.steps} steps {r.seconds:.0f} s, stop {r.stop_reason}",
                flush=True,
            )
    best = {}
    for run in res["runs"]:
        a = run["architecture"]
        if a not in best or run["heldout_fvu"] < best[a]["heldout_fvu"]:
            best[a] = run
    res["best_lr"] = {a: run["lr"] for a, run in best.items()}
    atomic_write_text(out, json.dumps(res, indent=1))
    print("best:", res["best_lr"])


if __name__ == "__main__":
    main()
