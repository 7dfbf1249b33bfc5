"""Benchmark (a): our batched coders vs scikit-learn's orthogonal_mp_gram on this CPU, side by side.

Planted data (d = 512, K = 4096, k = 32): samples are k-sparse signed combinations of a random unit-norm
dictionary plus 20 dB noise. Both OMPs run the same algorithm on the same Gram matrix, so the codes should
agree; the timed runs alternate (sklearn, ours, sklearn, ours, …) so background load hits both alike.

Usage: python benchmarks/bench_coder_cpu.py [--out benchmarks/results_coder_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import orthogonal_mp_gram

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.coders import encode, gram  # noqa: E402
from pipeline.core.synthetic import planted_problem  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results_coder_cpu.json")
    ap.add_argument("--n-sklearn", type=int, default=200)
    ap.add_argument("--n-ours", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    d, K, k = 512, 4096, 32
    p = planted_problem(d=d, n_atoms=K, k=k, n=args.n_ours, snr_db=20.0, nonnegative=False, seed=0)
    Y, D = p.Y, p.D
    G = gram(D)
    Gn = G.numpy()
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "d": d,
        "K": K,
        "k": k,
        "torch": torch.__version__,
    }
    t_sk, t_ours = [], []
    for _ in range(args.rounds):
        Ys = Y[: args.n_sklearn]
        t = time.perf_counter()
        X_sk = orthogonal_mp_gram(Gn, (D @ Ys.T).numpy(), n_nonzero_coefs=k).T
        t_sk.append(args.n_sklearn / (time.perf_counter() - t))
        t = time.perf_counter()
        ours = encode(Y, D, k, method="omp", nonnegative=False, rtol=0.0, G=G)
        t_ours.append(args.n_ours / (time.perf_counter() - t))
    X_ours = ours.to_dense(K)[: args.n_sklearn].numpy()
    same_support = float(((X_ours != 0) == (X_sk != 0)).all(axis=1).mean())
    rel = lambda X, Yr: float(np.linalg.norm(Yr.numpy() - X @ D.numpy()) / np.linalg.norm(Yr.numpy()))  # noqa: E731
    res["sklearn_omp_samples_per_s"] = float(np.median(t_sk))
    res["omp_samples_per_s"] = float(np.median(t_ours))
    res["omp_speedup_vs_sklearn"] = res["omp_samples_per_s"] / res["sklearn_omp_samples_per_s"]
    res["omp_same_support_fraction"] = same_support
    res["omp_max_abs_code_diff"] = float(np.abs(X_ours - X_sk).max())
    res["sklearn_omp_rel_err"] = rel(X_sk, Y[: args.n_sklearn])
    res["omp_rel_err"] = rel(ours.to_dense(K).numpy(), Y)
    for name, kw in {
        "mp_signed": dict(nonnegative=False),
        "mp_signed_refit": dict(nonnegative=False, refit=True),
        "mp_nonneg": dict(nonnegative=True),
    }.items():
        rates = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            c = encode(Y, D, k, method="mp", rtol=0.0, G=G, **kw)
            rates.append(args.n_ours / (time.perf_counter() - t))
        res[f"{name}_samples_per_s"] = float(np.median(rates))
        res[f"{name}_rel_err"] = float((Y - c.decode(D)).norm() / Y.norm())
    print(json.dumps(res, indent=2))
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
