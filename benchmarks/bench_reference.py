"""Benchmark (f): the reference mode (``dictionary=reference`` / ``PAPER_SCHEDULE``) against our defaults.

1. Planted recovery (Aharon-Elad-Bruckstein 2006: d=20, K=50, k=3, n=1500, 20 dB, signed planted codes) vs
   iterations, 3 seeds: our defaults with signed codes, and the reference's algorithm (signed MP with KSVD.jl's
   rules, uniform init, random re-seeding, no duplicate replacement), both on the whole sample every iteration.
2. With ``--store``: the two on real activations at equal samples seen: ours (the default preset's schedule,
   24 updates of 16,384 shuffled rows) and the reference's (65,536-row contiguous batches, one update each,
   3 epochs), each's held-out FVU with its own saved coder (the reference's with its evaluation refit, and
   without), mean L0, dead atoms and wall time.
3. With ``--orders``: only the reference fit on the store read in store order (whole consecutive contexts per
   batch) against the preset's ``shuffle_once`` (batches cut from one seeded shuffle of the rows, as the paper's
   file was written), each with the same seeds: held-out FVU, L0, wall time.

Usage: python benchmarks/bench_reference.py [--store outputs/default/harvest-*/store]
                                             [--out benchmarks/results_reference.json]
       python benchmarks/bench_reference.py --orders --store outputs/default/harvest-*/store
                                             --out benchmarks/results_reference_order.json
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

from pipeline.core.learner import PAPER_SCHEDULE, learn_dictionary  # noqa: E402
from pipeline.core.synthetic import planted_problem, recovered_fraction  # noqa: E402

#: The reference's algorithm without its schedule (the planted problem is fitted whole every iteration).
REFERENCE_ALGORITHM = {
    k: v for k, v in PAPER_SCHEDULE.items() if k not in ("batch_size", "epochs", "max_iters", "tol", "sample_order")
}


def recovery(checkpoints: list[int]) -> dict[str, dict[str, float]]:
    variants = {"ours (defaults, signed codes)": dict(nonnegative=False), "reference": dict(REFERENCE_ALGORITHM)}
    out = {}
    for name, opts in variants.items():
        curve: dict[int, list[float]] = {c: [] for c in checkpoints}
        for seed in range(3):
            p = planted_problem(seed=seed, nonnegative=False)

            def cb(it, rec, D, _p=p):
                if it in curve:
                    curve[it].append(recovered_fraction(_p.D, D))

            learn_dictionary(
                p.Y,
                50,
                3,
                seed=seed,
                progress=False,
                max_iters=max(checkpoints),
                tol=None,
                batch_size=p.Y.shape[0],
                callback=cb,
                **opts,
            )
        out[name] = {str(c): round(sum(v) / len(v), 3) for c, v in curve.items()}
        print(name, out[name], flush=True)
    return out


def on_store(store_path: str, K: int, k: int) -> list[dict]:
    from pipeline.data.store import ActivationStore

    store = ActivationStore(store_path)
    Y, Yh = store.load_all(), store.heldout()
    runs = {
        "ours (default preset)": dict(batch_size=16384, max_iters=24, tol=None),
        "reference (dictionary=reference)": dict(PAPER_SCHEDULE),
    }
    out = []
    for name, opts in runs.items():
        t = time.perf_counter()
        D = learn_dictionary(Y, K, k, progress=False, **opts)
        secs = time.perf_counter() - t
        codes = D.encode(Yh)
        rec = {
            "run": name,
            "updates": len(D.history),
            "rows_seen": sum(h["rows"] for h in D.history),
            "fit_seconds": round(secs, 1),
            "heldout_fvu": round(D.fvu(Yh), 4),
            "heldout_l0": round(float(codes.l0().float().mean()), 2),
            "dead_fraction_last": round(D.history[-1]["dead_fraction"], 4),
            "signed": D.signed,
            "code_width": D.code_width,
        }
        if D.coder.refit:  # the reference evaluates with its refit; also without
            raw = D.encode(Yh, refit=False)
            err = float((Yh - D.decode(raw)).pow(2).sum()) / float((Yh - Yh.mean(0)).pow(2).sum())
            rec["heldout_fvu_without_refit"] = round(err, 4)
        out.append(rec)
        print(json.dumps(rec), flush=True)
    return out


def sample_orders(store_path: str, K: int, k: int, seeds: list[int]) -> list[dict]:
    """The reference fit (``PAPER_SCHEDULE``) with ``shuffle_once`` on and off, per seed: held-out FVU (its
    evaluation refit, and without), mean L0, per-batch FVU and wall time."""
    from pipeline.data.store import ActivationStore

    store = ActivationStore(store_path)
    Y, Yh = store.load_all(), store.heldout()
    out = []
    for seed in seeds:
        for once in (False, True):
            t = time.perf_counter()
            D = learn_dictionary(Y, K, k, progress=False, **{**PAPER_SCHEDULE, "shuffle_once": once, "seed": seed})
            secs = time.perf_counter() - t
            raw = D.encode(Yh, refit=False)
            err = float((Yh - D.decode(raw)).pow(2).sum()) / float((Yh - Yh.mean(0)).pow(2).sum())
            rec = {
                "shuffle_once": once,
                "seed": seed,
                "updates": len(D.history),
                "fit_seconds": round(secs, 1),
                "heldout_fvu": round(D.fvu(Yh), 4),
                "heldout_fvu_without_refit": round(err, 4),
                "heldout_l0": round(float(D.encode(Yh).l0().float().mean()), 2),
                "batch_fvu": [round(h["fvu"], 4) for h in D.history],
            }
            out.append(rec)
            print(json.dumps(rec), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=None, help="activation store folder (the default run's harvest store)")
    ap.add_argument("--n-atoms", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results_reference.json")
    ap.add_argument("--orders", action="store_true", help="only the store-order comparison (needs --store)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    if args.orders:
        if not args.store:
            ap.error("--orders needs --store")
        res = {
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "store": args.store,
            "n_atoms": args.n_atoms,
            "k": args.k,
            "runs": sample_orders(args.store, args.n_atoms, args.k, args.seeds),
        }
        Path(args.out).write_text(json.dumps(res, indent=2))
        return
    res = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "planted_recovery": recovery([5, 10, 20, 40, 80]),
    }
    if args.store:
        res["store"] = {
            "path": args.store,
            "n_atoms": args.n_atoms,
            "k": args.k,
            "runs": on_store(args.store, args.n_atoms, args.k),
        }
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
