"""Benchmark: the learning rate of each SAE architecture, swept on the default store under the default budget.

Each (architecture, lr) trains with sae-lens's trainer exactly as the baselines stage does (the architecture's
``conf/baseline`` spec, the default comparison's batch size, width and k) under the default ``plateau`` budget
(to the held-out curve's plateau or the sample cap, lr decaying over the last 20%), and is scored on the store's
held-out rows. The figures that decide are held-out FVU and L0 at the end (machine-independent: the run's length
is in samples); wall seconds are recorded but depend on the machine and on what else runs.

Results are written after every run, and runs already in ``--out`` (same architecture, lr and cap) are skipped, so
an interrupted sweep resumes. ``--cap-samples`` (default: the default run's, ``conf/experiment/default.yaml``)
records each run's cap. An architecture's best lr (``best_lr``) is its lowest held-out FVU among its runs at the
default run's cap (or, swept only at other caps, at the nearest above it, else its largest: ``best_lr_cap``) whose
held-out L0 is within :data:`L0_TOLERANCE` of k, or where none is, the run whose L0 came nearest k: FVU at another
L0 is not comparable (a Standard SAE's L0 follows its lr as well as its L1 coefficient, and a JumpReLU's moves
towards k at a pace the lr sets).

``--merge A.json B.json`` adds the runs of sweeps made in parallel (separate ``--out`` files) to ``--out``.

Usage: python benchmarks/bench_baseline_lr.py --store <store dir> [--archs topk,batchtopk] [--lrs 3e-4,1e-3,3e-3]
       python benchmarks/bench_baseline_lr.py --merge A.json B.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.baselines import BaselineSpec, train_baseline  # noqa: E402
from pipeline.baselines.compare import CompareConfig, matched_budget  # noqa: E402
from pipeline.core.spend import FitSpend  # noqa: E402
from pipeline.data.loader import training_data  # noqa: E402
from pipeline.data.store import ActivationStore  # noqa: E402
from pipeline.utils.atomic import atomic_write_text  # noqa: E402

#: The default comparison's batch size on CPU (conf/experiment/default.yaml) and the default dictionary's K, k.
BATCH_SIZE, WIDTH, K = 1024, 2048, 32
#: The default run's sample cap, which the sweep runs at unless told otherwise.
DEFAULT_CAP = int(
    OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/experiment/default.yaml").compare.cap_samples
)
#: A run counts towards ``best_lr`` when its held-out L0 is within this share of k.
L0_TOLERANCE = 0.25


def best_lrs(runs: list[dict], cap: int) -> dict[str, float]:
    """Each architecture's lr at ``cap`` (or, for an architecture swept only at other caps, at the largest of
    them: :func:`sweep_caps`): the lowest held-out FVU among its runs whose L0 is within :data:`L0_TOLERANCE` of
    k; where none is, the run whose L0 came nearest k (FVU at another L0 says little)."""
    best: dict[str, float] = {}
    for a, at in sweep_caps(runs, cap).items():
        mine = [r for r in runs if r["architecture"] == a and r["cap_samples"] == at]
        near = [r for r in mine if abs(r["heldout_l0"] - K) <= L0_TOLERANCE * K]
        pick = min(near, key=lambda r: r["heldout_fvu"]) if near else min(mine, key=lambda r: abs(r["heldout_l0"] - K))
        best[a] = pick["lr"]
    return best


def sweep_caps(runs: list[dict], cap: int) -> dict[str, int]:
    """The cap each architecture's ``best_lr`` is read at: ``cap`` where it was swept there, else the smallest
    swept cap above it, else its largest."""
    caps: dict[str, int] = {}
    for a in sorted({r["architecture"] for r in runs}):
        mine = {r["cap_samples"] for r in runs if r["architecture"] == a}
        above = [c for c in mine if c >= cap]
        caps[a] = min(above) if above else max(mine)
    return caps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", help="the default run's harvest store (required unless --merge)")
    ap.add_argument("--archs", default="topk,batchtopk")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    ap.add_argument("--cap-samples", type=int, default=DEFAULT_CAP)
    ap.add_argument("--merge", nargs="*", default=[], help="results files of parallel sweeps to add to --out")
    ap.add_argument("--out", default="benchmarks/results_baseline_lr.json")
    args = ap.parse_args()
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {"runs": []}
    if args.merge:
        for other in args.merge:
            for run in json.loads(Path(other).read_text())["runs"]:
                same = [
                    r
                    for r in res["runs"]
                    if (r["architecture"], r["lr"], r["cap_samples"])
                    == (run["architecture"], run["lr"], run["cap_samples"])
                ]
                if not same:
                    res["runs"].append(run)
        res["best_lr"] = best_lrs(res["runs"], DEFAULT_CAP)
        res["best_lr_cap"] = sweep_caps(res["runs"], DEFAULT_CAP)
        atomic_write_text(out, json.dumps(res, indent=1))
        print("best:", res["best_lr"], "at caps", res["best_lr_cap"])
        return
    if not args.store:
        raise SystemExit("--store is required for a sweep: the default run's outputs/default/harvest-*/store")
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
    )
    res.pop("budget", None)  # each run records its own cap
    heldout = store.heldout()
    for arch in args.archs.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            if any(
                r["architecture"] == arch and r["lr"] == lr and r["cap_samples"] == compare.cap_samples
                for r in res["runs"]
            ):
                continue
            spec = BaselineSpec(arch, lr=lr, batch_size=BATCH_SIZE)
            data = training_data(store, spec.batch_size, torch.device("cpu"), 0)
            t = time.perf_counter()
            r = train_baseline(data, store.d, WIDTH, K, spec, budget, heldout=heldout).record
            run = {
                "architecture": arch,
                "lr": lr,
                "date": time.strftime("%Y-%m-%d"),
                "cap_samples": compare.cap_samples,
                "budget": budget.describe(),
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
    res["best_lr"] = best_lrs(res["runs"], DEFAULT_CAP)
    res["best_lr_cap"] = sweep_caps(res["runs"], DEFAULT_CAP)
    atomic_write_text(out, json.dumps(res, indent=1))
    print("best:", res["best_lr"], "at caps", res["best_lr_cap"])


if __name__ == "__main__":
    main()
