"""Benchmark (c): what the learner's knobs do, on this CPU.

1. FVU and time vs atom-batch size (1, 16, 256, K) at a fixed number of iterations, on real LM activations
   (an activation store, e.g. SmolLM2-135M layer 15 on Austen) or, without a store, on a planted problem.
2. Planted recovery (Aharon-Elad-Bruckstein 2006: d=20, K=50, k=3, n=1500, 20 dB) vs iterations, 3 seeds,
   for the defaults and with near-duplicate replacement off, MP and OMP coders.

Usage: python benchmarks/bench_learner_cpu.py [--store outputs/.../store] [--out benchmarks/results_learner_cpu.json]
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

from pipeline.core.learner import learn_dictionary  # noqa: E402
from pipeline.core.synthetic import planted_problem, recovered_fraction  # noqa: E402


def atom_batch_sweep(Y: torch.Tensor, Yh: torch.Tensor, K: int, k: int, iters: int, sizes: list[int]) -> list[dict]:
    out = []
    for ab in sizes:
        t = time.perf_counter()
        D = learn_dictionary(
            Y, K, k, atom_batch_size=ab, max_iters=iters, tol=None, progress=False, seed=0, batch_size=Y.shape[0]
        )
        secs = time.perf_counter() - t
        rec = {
            "atom_batch_size": ab,
            "seconds": secs,
            "heldout_fvu": D.fvu(Yh),
            "train_fvu_per_iter": [round(h["fvu"], 5) for h in D.history],
            "update_seconds_per_iter": None,
        }
        out.append(rec)
        print(json.dumps({k_: v for k_, v in rec.items() if k_ != "train_fvu_per_iter"}), flush=True)
    return out


def recovery_curve(checkpoints: list[int], variants: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for name, opts in variants.items():
        curve = {c: [] for c in checkpoints}
        for seed in range(3):
            p = planted_problem(seed=seed, nonnegative=opts.get("nonnegative", True))

            def cb(it, rec, D, _p=p):
                if it in curve:
                    curve[it].append(recovered_fraction(_p.D, D))

            learn_dictionary(
                p.Y, 50, 3, seed=seed, progress=False, max_iters=max(checkpoints), tol=None, callback=cb, **opts
            )
        out[name] = {str(c): sum(v) / len(v) for c, v in curve.items()}
        print(name, out[name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=None, help="activation store folder (else a planted problem)")
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--n-atoms", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results_learner_cpu.json")
    args = ap.parse_args()
    res = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    if args.store:
        from pipeline.data.store import ActivationStore

        store = ActivationStore(args.store)
        Y = store.load_all()[: args.rows]
        Yh = store.heldout()[:4096]
        res["data"] = f"{store.path} ({store.hook}), {Y.shape[0]} train rows, d={Y.shape[1]}"
    else:
        p = planted_problem(d=64, n_atoms=2 * args.n_atoms, k=args.k // 4, n=args.rows + 4096, seed=0)
        Y, Yh = p.Y[: args.rows], p.Y[args.rows :]
        res["data"] = "planted"
    K = args.n_atoms
    res["atom_batch_sweep"] = {
        "K": K,
        "k": args.k,
        "iterations": args.iters,
        "runs": atom_batch_sweep(Y, Yh, K, args.k, args.iters, [1, 16, 256, K]),
    }
    Path(args.out).write_text(json.dumps(res, indent=2))
    res["planted_recovery_vs_iterations"] = recovery_curve(
        [5, 10, 20, 40, 80],
        {
            "defaults (MP, non-negative)": {},
            "defaults, signed": {"nonnegative": False},
            "no duplicate replacement": {"duplicate_threshold": None},
            "OMP coder": {"method": "omp"},
            "reference-like (uniform init, random re-seed, no duplicates)": dict(
                init="uniform", reseed="random", duplicate_threshold=None
            ),
        },
    )
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
