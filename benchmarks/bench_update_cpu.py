"""Benchmark: the DB-KSVD atom update (exact Gram solver vs the matrix-free alternating one) and one full
iteration against a pass of sae-lens TopK training over the same rows, side by side in one process.

On one sample batch of an activation store (default: the default run's store, 16,384 rows, K = 2048, k = 32),
starting from a fitted dictionary (``--dictionary``) or one warmed up here for ``--warm-iters`` iterations:

1. the batch is coded once (the coder's time);
2. each update variant runs ``--repeats`` times on copies of the same codes and residual: wall time (median),
   the objective after the update, the FVU after re-coding with the updated atoms, refits capped or finished
   by the eigensolver, and the atoms' agreement with the tightest variant;
3. sae-lens TopK training (batch 1024, the default run's recipe) over the same rows: the marginal time of one
   pass, from runs of 1 and 4 passes (so set-up is not counted);
4. ``--rounds`` rounds that each time the coder, the default update, the capped update and a TopK pass one after
   another: the medians of the per-round ratios are the headline figures (the VM's speed drifts);
5. signed codes (KSVD.jl's pursuit, the reference mode's): the torch block solver (power steps, then batched
   Lanczos) against the compiled per-atom Lanczos refits, wall time, objective and atom agreement;
6. the compiled loops' threads, ``--threading-rounds`` interleaved rounds: Python threads at hand-written spin
   barriers against numba's ``prange`` (results equal to the bit), for the coder and both updates;
7. two fits of ``--fit-iters`` iterations from the same start over the store's other rows, one with the default
   update and one with the capped update, at equal samples: held-out FVU on the benchmark's rows and wall time
   (the objective a whole fit reaches, not one update's).

One script (~460 lines): every part times the same batch and dictionary, side by side in one process.

Usage: python benchmarks/bench_update_cpu.py --store outputs/default/harvest-*/store \
           [--dictionary outputs/default/fit-*/dictionary] [--out benchmarks/results_update_cpu.json]
Time it alone: other processes on the cores stall torch's threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.atom_update import objective, update_atoms  # noqa: E402
from pipeline.core.coders import encode, gram  # noqa: E402
from pipeline.core.codes import Codes  # noqa: E402
from pipeline.core.learner import learn_dictionary  # noqa: E402

VARIANTS = {
    "alternating, tol 1e-4, cap 30 (the update before the Gram solver)": dict(
        solver="alternating", tol=1e-4, max_iters=30
    ),
    "alternating, tol 1e-6, cap 100": dict(solver="alternating", tol=1e-6, max_iters=100),
    "gram, tol 1e-6, cap 100": dict(solver="gram", tol=1e-6, max_iters=100),
    "direct, tol 1e-6, cap 100 (torch block solver; the default on GPUs and in data-parallel runs)": dict(
        solver="direct", tol=1e-6, max_iters=100, kernel="torch"
    ),
    "direct, tol 1e-6, cap 100, compiled per-atom refits (default on CPU)": dict(
        solver="direct", tol=1e-6, max_iters=100, kernel="numba"
    ),
}


def _fvu(Y: torch.Tensor, R: torch.Tensor) -> float:
    return float(R.pow(2).sum() / (Y - Y.mean(0)).pow(2).sum())


def bench_updates(Y: torch.Tensor, D0: torch.Tensor, k: int, repeats: int) -> dict:
    G = gram(D0)
    encode(Y[:256], D0, k, G=G)  # loads the compiled coder (or compiles it, first time): not the coder's time
    t = time.perf_counter()
    codes0 = encode(Y, D0, k, G=G)
    code_seconds = time.perf_counter() - t
    torch_codes = encode(Y[:4096], D0, k, G=G, kernel="torch")  # warm
    t = time.perf_counter()
    torch_codes = encode(Y, D0, k, G=G, kernel="torch")
    out = {
        "code_seconds": code_seconds,
        "code_seconds_torch_loop": time.perf_counter() - t,
        "same_supports_as_torch_loop": float(
            (torch_codes.indices.sort(1).values == codes0.indices.sort(1).values).all(1).float().mean()
        ),
        "fvu_before": _fvu(Y, Y - codes0.decode(D0)),
        "variants": {},
    }
    atoms = {}
    atom_batch = max(1, D0.shape[0] // 128)
    for name, opts in VARIANTS.items():
        secs = []
        for _ in range(repeats):
            D = D0.clone()
            codes = Codes(codes0.indices.clone(), codes0.values.clone())
            R = Y - codes.decode(D)
            t = time.perf_counter()
            stats = update_atoms(R, D, codes, atom_batch, generator=torch.Generator().manual_seed(0), **opts)
            secs.append(time.perf_counter() - t)
        recoded = encode(Y, D, k, G=gram(D))
        atoms[name] = D
        out["variants"][name] = {
            "seconds": statistics.median(secs),
            "all_seconds": secs,
            "fvu_after_update": objective(Y, D, codes) / float((Y - Y.mean(0)).pow(2).sum()),
            "fvu_recoded": _fvu(Y, Y - recoded.decode(D)),
            "mean_iters": stats.mean_rank1_iters,
            "capped": stats.capped,
            "eigensolved": stats.eigensolved,
            "atoms_refitted": stats.n_used,
        }
        print(name, json.dumps({k_: v for k_, v in out["variants"][name].items() if k_ != "all_seconds"}), flush=True)
    ref = atoms[list(VARIANTS)[-1]]
    for name, D in atoms.items():
        cos = (D * ref).sum(1).abs()
        out["variants"][name]["atoms_vs_default"] = {
            "min_abs_cos": float(cos.min()),
            "mean_1_minus_abs_cos": float((1 - cos).mean()),
        }
    return out


def bench_topk_pass(Y: torch.Tensor, K: int, k: int) -> dict:
    from pipeline.baselines.config import BaselineSpec, Budget
    from pipeline.baselines.train import train_baseline

    spec = BaselineSpec(architecture="topk", batch_size=1024)
    runs = {}
    for passes in (1, 4):
        t = time.perf_counter()
        trained = train_baseline(Y, Y.shape[1], K, k, spec, Budget(mode="samples", samples=passes * Y.shape[0]))
        runs[passes] = {"wall": time.perf_counter() - t, "steps": trained.record.steps}
    per_pass = (runs[4]["wall"] - runs[1]["wall"]) / 3
    return {"runs": runs, "seconds_per_pass": per_pass, "rows_per_second": Y.shape[0] / per_pass}


def bench_rounds(Y: torch.Tensor, D0: torch.Tensor, k: int, rounds: int) -> dict:
    """The headline ratios measured round by round, each round timing, one after another on the same VM minute:
    the coder, the default update, the capped update the issue started from, and a pass of TopK steps. The
    medians of the per-round ratios are reported (this VM's speed drifts by 1.5x within an hour)."""
    G = gram(D0)
    atom_batch = max(1, D0.shape[0] // 128)
    default, before = VARIANTS[list(VARIANTS)[-1]], VARIANTS[list(VARIANTS)[0]]
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        codes0 = encode(Y, D0, k, G=G)
        code = time.perf_counter() - t
        secs = {}
        for name, opts in (("update", default), ("before", before)):
            D, codes = D0.clone(), Codes(codes0.indices.clone(), codes0.values.clone())
            R = Y - codes.decode(D)
            t = time.perf_counter()
            update_atoms(R, D, codes, atom_batch, generator=torch.Generator().manual_seed(0), **opts)
            secs[name] = time.perf_counter() - t
        topk = bench_topk_pass(Y, D0.shape[0], k)["seconds_per_pass"]
        out.append(
            {
                "code": code,
                "update": secs["update"],
                "capped_update": secs["before"],
                "topk_pass": topk,
                "iteration_over_topk_pass": (code + secs["update"]) / topk,
                "update_speedup_vs_capped": secs["before"] / secs["update"],
            }
        )
        print(json.dumps(out[-1]), flush=True)
    med = {key: statistics.median(r[key] for r in out) for key in out[0]}
    return {
        "rounds": out,
        "median": med,
        "range": {key: [min(r[key] for r in out), max(r[key] for r in out)] for key in out[0]},
    }


def _prange_launchers():
    """numba ``prange`` versions of the two compiled loops' thread launches (``mp_driver.launch``,
    ``update_driver.launch``), built here so that the library keeps one way to run threads: the same kernels and
    arguments, numba's own threads (its threading layer; parallel chunk size 1, so threads take one piece or one
    atom at a time, largest first) instead of Python threads meeting at spin barriers."""
    import numba
    import numpy as np

    from pipeline.core.cpu import mp_kernel, sweep_kernel

    mp_rows, refit_nonnegative, refit_signed, correct = (
        mp_kernel.mp_rows,
        sweep_kernel.refit_nonnegative,
        sweep_kernel.refit_signed,
        sweep_kernel.correct,
    )

    @numba.njit(parallel=True)
    def mp_pieces(C, G, masks, n2, th, k, max_iter, nonnegative, reference_rules, out_idx, out_val, Y, D, band, bounds):
        for i in numba.prange(bounds.shape[0] - 1):
            mp_rows(
                C,
                G,
                masks,
                n2,
                th,
                k,
                max_iter,
                nonnegative,
                reference_rules,
                out_idx,
                out_val,
                Y,
                D,
                band,
                bounds[i],
                bounds[i + 1],
            )

    @numba.njit(parallel=True, fastmath=True)
    def sweep_parallel(
        R, D, order, rows, x_old, starts, claim_order, batch, signed, tol, max_steps, D_new, x_new, steps_out,
        outcome_out, row_cuts, scratch_y, scratch_basis,
    ):  # fmt: skip
        n_used = order.shape[0]
        max_step = np.sqrt(max(2 * tol, 0.0)) if tol >= 0 else -1.0
        for b0 in range(0, n_used, batch):
            b1 = min(b0 + batch, n_used)
            for jj in numba.prange(b1 - b0):
                p = claim_order[b0 + jj]
                t = numba.get_thread_id()
                e0, e1 = starts[p], starts[p + 1]
                if signed:
                    steps, outcome = refit_signed(
                        R, rows[e0:e1], x_old[e0:e1], D[order[p]], D_new[p], x_new[e0:e1], scratch_y[t],
                        scratch_basis[t], tol, max_steps,
                    )  # fmt: skip
                else:
                    steps, outcome = refit_nonnegative(
                        R, rows[e0:e1], x_old[e0:e1], D[order[p]], D_new[p], x_new[e0:e1], scratch_y[t], max_step,
                        max_steps,
                    )  # fmt: skip
                steps_out[p] = steps
                outcome_out[p] = outcome
            for c in numba.prange(row_cuts.shape[0] - 1):
                for p in range(b0, b1):
                    e0, e1 = starts[p], starts[p + 1]
                    correct(
                        R, D[order[p]], D_new[p], rows[e0:e1], x_old[e0:e1], x_new[e0:e1], row_cuts[c], row_cuts[c + 1]
                    )

    def mp_launch(kernels, args, bounds, threads):
        numba.set_num_threads(threads)
        previous = numba.set_parallel_chunksize(1)
        try:
            mp_pieces(*args, bounds)
        finally:
            numba.set_parallel_chunksize(previous)

    def update_launch(kernel, args, cuts, threads, sync):
        R, signed, max_steps = args[0], args[8], args[10]
        d = R.shape[1]
        scratch_y = np.empty((threads, d), dtype=R.dtype)
        scratch_basis = np.empty((threads, min(max_steps, d) + 1 if signed else 1, d), dtype=R.dtype)
        numba.set_num_threads(threads)
        previous = numba.set_parallel_chunksize(1)
        try:
            sweep_parallel(*args[:15], cuts, scratch_y, scratch_basis)
        finally:
            numba.set_parallel_chunksize(previous)

    return mp_launch, update_launch


def bench_threading(Y: torch.Tensor, D0: torch.Tensor, k: int, rounds: int) -> dict:
    """The compiled loops' two ways to run threads, side by side: Python threads (the library's: the coder's
    pieces taken in turn, the sweep's threads meeting at hand-written spin barriers) against numba's own
    ``parallel=True`` / ``prange`` (:func:`_prange_launchers`). Each round times the coder, the non-negative update
    and the signed update both ways, in alternating order; results must be equal to the bit. Reported: per-round
    times and the medians of the per-round ratios prange / spin (above 1: prange slower)."""
    import numba

    from pipeline.core.cpu import mp_driver, update_driver

    G = gram(D0)
    atom_batch = max(1, D0.shape[0] // 128)
    spin_launchers = (mp_driver.launch, update_driver.launch)
    modes = {"spin": spin_launchers, "prange": _prange_launchers()}

    def run(mode: str, what: str, codes0: Codes | None) -> tuple[float, tuple]:
        mp_driver.launch, update_driver.launch = modes[mode]
        try:
            if what == "coder":
                t = time.perf_counter()
                codes = encode(Y, D0, k, G=G, kernel="numba")
                return time.perf_counter() - t, (codes.indices, codes.values)
            D, codes = D0.clone(), Codes(codes0.indices.clone(), codes0.values.clone())
            R = Y - codes.decode(D)
            gen = torch.Generator().manual_seed(0)
            t = time.perf_counter()
            update_atoms(R, D, codes, atom_batch, nonnegative=what == "update", kernel="numba", generator=gen)
            return time.perf_counter() - t, (D, codes.values, R)
        finally:
            mp_driver.launch, update_driver.launch = spin_launchers

    codes = {"update": encode(Y, D0, k, G=G), "signed_update": encode(Y, D0, k, G=G, nonnegative=False)}
    for mode in modes:  # compile or load both variants first: not timed
        for what in ("coder", "update", "signed_update"):
            run(mode, what, codes.get(what))
    out = []
    for r in range(rounds):
        order = list(modes) if r % 2 == 0 else list(modes)[::-1]
        row = {}
        for what in ("coder", "update", "signed_update"):
            results = {}
            for mode in order:
                row[f"{what}_{mode}"], results[mode] = run(mode, what, codes.get(what))
            row[f"{what}_identical"] = all(torch.equal(a, b) for a, b in zip(results["spin"], results["prange"]))
            row[f"{what}_prange_over_spin"] = row[f"{what}_prange"] / row[f"{what}_spin"]
        out.append(row)
        print(json.dumps(row), flush=True)
    keys = [key for key in out[0] if not key.endswith("_identical")]
    return {
        "threading_layer": numba.threading_layer(),
        "threads": numba.get_num_threads(),
        "rounds": out,
        "median": {key: statistics.median(r[key] for r in out) for key in keys},
        "range": {key: [min(r[key] for r in out), max(r[key] for r in out)] for key in keys},
        "all_identical": all(r[f"{w}_identical"] for r in out for w in ("coder", "update", "signed_update")),
    }


def bench_signed(Y: torch.Tensor, D0: torch.Tensor, k: int, repeats: int) -> dict:
    """The signed update (the reference mode's): torch block solver against the compiled refits."""
    codes0 = encode(Y, D0, k, G=gram(D0), nonnegative=False, reference_rules=True)
    atom_batch = max(1, D0.shape[0] // 128)
    out, atoms = {}, {}
    for kernel in ("torch", "numba"):
        secs = []
        for _ in range(repeats):
            D, codes = D0.clone(), Codes(codes0.indices.clone(), codes0.values.clone())
            R = Y - codes.decode(D)
            t = time.perf_counter()
            stats = update_atoms(
                R, D, codes, atom_batch, nonnegative=False, kernel=kernel, generator=torch.Generator().manual_seed(0)
            )
            secs.append(time.perf_counter() - t)
        atoms[kernel] = D
        out[kernel] = {
            "seconds": statistics.median(secs),
            "all_seconds": secs,
            "fvu_after_update": objective(Y, D, codes) / float((Y - Y.mean(0)).pow(2).sum()),
            "mean_iters": stats.mean_rank1_iters,
            "lanczos": stats.lanczos,
            "eigensolved": stats.eigensolved,
        }
        print("signed", kernel, json.dumps(out[kernel]), flush=True)
    cos = (atoms["torch"] * atoms["numba"]).sum(1)
    out["atoms_1_minus_cos"] = {"worst": float((1 - cos).max()), "mean": float((1 - cos).mean())}
    out["speedup"] = out["torch"]["seconds"] / out["numba"]["seconds"]
    return out


#: The update the issue started from, as learner options (the "alternating, tol 1e-4, cap 30" variant).
CAPPED_FIT = dict(rank1_solver="alternating", rank1_tol=1e-4, rank1_max_iters=30)


def bench_fits(Y_train: torch.Tensor, Y_test: torch.Tensor, K: int, k: int, rows: int, iters: int, seeds: int) -> dict:
    """Held-out FVU and wall time of ``iters``-iteration fits (batches of ``rows``) with the default update and
    with the capped one, from the same seeds (initial atoms, batch order), data and coder settings."""
    out = {"default": [], "capped update": []}
    for seed in range(seeds):
        for name, opts in (("default", {}), ("capped update", CAPPED_FIT)):
            t = time.perf_counter()
            dictionary = learn_dictionary(
                Y_train, K, k, batch_size=rows, max_iters=iters, tol=None, progress=False, seed=seed, **opts
            )
            out[name].append(
                {
                    "seed": seed,
                    "seconds": time.perf_counter() - t,
                    "held_out_fvu": dictionary.fvu(Y_test),
                    "last_batch_fvu": dictionary.history[-1]["fvu"],
                }
            )
            print(name, json.dumps(out[name][-1]), flush=True)
    out["held_out_fvu_default_minus_capped"] = [
        a["held_out_fvu"] - b["held_out_fvu"] for a, b in zip(out["default"], out["capped update"])
    ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True, help="activation store folder")
    ap.add_argument("--dictionary", default=None, help="a fitted dictionary folder to start from")
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--n-atoms", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--warm-iters", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the interleaved headline timing")
    ap.add_argument("--fit-iters", type=int, default=8, help="iterations of each fit of the fit comparison (0: skip)")
    ap.add_argument("--fit-seeds", type=int, default=3, help="seeds of the fit comparison")
    ap.add_argument("--threading-rounds", type=int, default=7, help="rounds of spin barriers against numba prange")
    ap.add_argument("--only", choices=["threading"], default=None, help="run only this part (with the set-up)")
    ap.add_argument("--out", default="benchmarks/results_update_cpu.json")
    args = ap.parse_args()
    from pipeline.data.store import ActivationStore

    store = ActivationStore(args.store)
    Y_all = store.load_all()
    g = torch.Generator().manual_seed(123)
    perm = torch.randperm(Y_all.shape[0], generator=g)
    Y = Y_all[perm[: args.rows]].float()
    if args.dictionary:
        from pipeline.core.dictionary import Dictionary

        D0 = Dictionary.load(args.dictionary).atoms.float()
        start = f"fitted dictionary {args.dictionary}"
    else:
        D0 = learn_dictionary(
            Y_all, args.n_atoms, args.k, batch_size=args.rows, max_iters=args.warm_iters, tol=None, progress=False
        ).atoms
        start = f"{args.warm_iters} warm-up iterations of the default learner"
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "data": f"{store.path} ({store.hook}), {Y.shape[0]} random rows, d={Y.shape[1]}",
        "K": D0.shape[0],
        "k": args.k,
        "start": start,
    }
    if args.only == "threading":
        res["threading"] = bench_threading(Y, D0, args.k, args.threading_rounds)
        print(json.dumps({"median": res["threading"]["median"]}, indent=2), flush=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
        return
    res["update"] = bench_updates(Y, D0, args.k, args.repeats)
    res["topk_sae"] = bench_topk_pass(Y, D0.shape[0], args.k)
    res["rounds"] = bench_rounds(Y, D0, args.k, args.rounds)
    res["signed"] = bench_signed(Y, D0, args.k, args.repeats)
    res["threading"] = bench_threading(Y, D0, args.k, args.threading_rounds)
    if args.fit_iters:
        res["fits"] = bench_fits(
            Y_all[perm[args.rows :]].float(), Y, D0.shape[0], args.k, args.rows, args.fit_iters, args.fit_seeds
        )
    default = res["update"]["variants"][list(VARIANTS)[-1]]
    before = res["update"]["variants"][list(VARIANTS)[0]]
    iteration = res["update"]["code_seconds"] + default["seconds"]
    res["summary"] = {
        "update_speedup_vs_before": before["seconds"] / default["seconds"],
        "update_speedup_vs_torch_block_solver": res["update"]["variants"][list(VARIANTS)[-2]]["seconds"]
        / default["seconds"],
        "coder_speedup_vs_torch_loop": res["update"]["code_seconds_torch_loop"] / res["update"]["code_seconds"],
        "iteration_seconds": iteration,
        "iteration_rows_per_second": Y.shape[0] / iteration,
        "topk_pass_rows_per_second": res["topk_sae"]["rows_per_second"],
        "iteration_over_topk_pass": iteration / res["topk_sae"]["seconds_per_pass"],
        "interleaved_rounds_median": res["rounds"]["median"],
        "interleaved_rounds_range": res["rounds"]["range"],
    }
    print(json.dumps(res["summary"], indent=2), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
