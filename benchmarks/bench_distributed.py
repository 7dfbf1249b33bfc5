"""Benchmark (g): the data-parallel fit on 2 gloo processes against one process, and what it communicates.

On real activations (``--store``, the default run's), K = 2048, k = 32, 16,384-row batches (the default preset):

1. Agreement: the atoms of a 2-process fit against the 1-process fit after ``--iters`` updates (max and median
   |Δ|, worst 1 − cos), with and without near-duplicate replacement; as a control, the 1-process fit of the same
   data times (1 + 1e-7 noise), i.e. what a summation-order-sized perturbation does to a fit by itself.
2. Communication per update (rank 0's counters): collectives, bytes reduced, time inside them (on 2 cores this
   includes waiting for the slower rank), against the wall time of an update, non-negative and signed.
3. A projection to Gemma-2-2B size (d = 2304, K = 16384, atom batch K/128) on 8 × H200 (NVLink) and on 2 nodes
   (400 Gb/s links), from the measured calls and bytes per update and stated latency/bandwidth assumptions.

Usage: python benchmarks/bench_distributed.py --store outputs/default/harvest-*/store
                                               [--out benchmarks/results_distributed.json]
       python benchmarks/bench_distributed.py --store X --project-only     # redo only the projection
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.dictionary import Dictionary  # noqa: E402
from pipeline.core.learner import learn_dictionary  # noqa: E402
from pipeline.data.store import ActivationStore  # noqa: E402

K, k = 2048, 32
#: ``kernel="torch"``: data-parallel updates always run the torch block solver, so the one-process runs use it too
#: and the comparison measures summation order alone (the compiled CPU refits agree with it to rank1_tol only).
BASE = dict(batch_size=16384, tol=None, progress=False, seed=0, kernel="torch")
#: Assumed collective costs for the projection: (latency per call in s, all-reduce bus bandwidth in bytes/s).
LINKS = {"8 x H200, NVLink (one node)": (20e-6, 350e9), "2 nodes x 8 H200, 400 Gb/s per node": (40e-6, 40e9)}


def worker(rank: int, world: int, init: str, data: str, opts: dict, out: str) -> None:
    import torch.distributed as dist

    from pipeline.core.collective import ProcessGroupCollective

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=timedelta(minutes=30)
    )
    comm = ProcessGroupCollective(dist.group.WORLD)
    Y = torch.load(data)
    t = time.perf_counter()
    D = learn_dictionary(Y, K, k, process_group=comm, **opts)
    torch.save(
        dict(
            atoms=D.atoms,
            history=D.history,
            wall=time.perf_counter() - t,
            calls=comm.calls,
            bytes=comm.bytes,
            comm_seconds=comm.seconds,
        ),
        f"{out}.{rank}",
    )
    dist.destroy_process_group()


def two_ranks(data: str, opts: dict) -> list[dict]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init, out = f"{tmp}/rdzv", f"{tmp}/out"
        procs = [ctx.Process(target=worker, args=(r, 2, init, data, opts, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    diff = (a - b).abs()
    return {
        "max_abs": float(diff.max()),
        "median_abs": float(diff.median()),
        "worst_1_minus_cos": float((1 - (a * b).sum(1)).max()),
        "atoms_over_1e-4": int((diff.max(1).values > 1e-4).sum()),
    }


def heldout_fvu(atoms: torch.Tensor, like: Dictionary, Y: torch.Tensor) -> float:
    return Dictionary(atoms, like.coder, like.centre, like.groups).fvu(Y)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--signed-iters", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results_distributed.json")
    ap.add_argument("--project-only", action="store_true", help="recompute the projection of an existing --out")
    ap.add_argument("--only", nargs="*", help="run only these variants, keeping the others' results in --out")
    args = ap.parse_args()
    if args.project_only:
        results = json.loads(Path(args.out).read_text())
        results["projection_gemma2b"] = project(results)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(json.dumps(results["projection_gemma2b"], indent=1))
        return
    store = ActivationStore(args.store)
    Y = store.load_all()[: args.rows]
    heldout = store.heldout()[:8192]
    results: dict = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": int(Y.shape[0]),
        "d": int(Y.shape[1]),
        "K": K,
        "k": k,
        "batch_size": BASE["batch_size"],
        "runs": {},
    }
    noise = 1 + 1e-7 * torch.randn(Y.shape, generator=torch.Generator().manual_seed(1))
    variants = {
        "non-negative (default)": dict(max_iters=args.iters),
        "non-negative, no duplicate replacement": dict(max_iters=args.iters, duplicate_threshold=None),
        "signed": dict(max_iters=args.signed_iters, nonnegative=False),
    }
    if args.only:
        unknown = set(args.only) - set(variants)
        if unknown:
            raise SystemExit(f"unknown variant(s) {sorted(unknown)}; variants: {sorted(variants)}")
        kept = json.loads(Path(args.out).read_text())["runs"] if Path(args.out).is_file() else {}
        results["runs"] = {k_: v for k_, v in kept.items() if k_ not in args.only}
        variants = {k_: v for k_, v in variants.items() if k_ in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/Y.pt"
        torch.save(Y, data)
        for name, extra in variants.items():
            opts = {**BASE, **extra}
            t = time.perf_counter()
            single = learn_dictionary(Y, K, k, **opts)
            single_wall = time.perf_counter() - t
            ranks = two_ranks(data, opts)
            perturbed = learn_dictionary(Y * noise, K, k, **opts)
            r0, iters = ranks[0], len(single.history)
            run = {
                "iterations": iters,
                "one_process_seconds": single_wall,
                "two_process_seconds": r0["wall"],
                "two_ranks_vs_one": compare(r0["atoms"], single.atoms),
                "rank0_vs_rank1": compare(r0["atoms"], ranks[1]["atoms"]),
                "control_one_process_data_x_1e-7_noise": compare(perturbed.atoms, single.atoms),
                "heldout_fvu": {
                    "one": single.fvu(heldout),
                    "two": heldout_fvu(r0["atoms"], single, heldout),
                    "control": perturbed.fvu(heldout),
                },
                "per_update": {
                    "collectives": r0["calls"] / iters,
                    "bytes": r0["bytes"] / iters,
                    "seconds_in_collectives": r0["comm_seconds"] / iters,
                    "update_wall_seconds": r0["wall"] / iters,
                },
                "mean_rank1_steps": sum(h["rank1_iters"] for h in single.history) / iters,
                "eigensolved_per_update": sum(h["rank1_eigensolved"] for h in single.history) / iters,
                "lanczos_per_update": sum(h.get("rank1_lanczos", 0) for h in single.history) / iters,
                "date": results["date"],
            }
            results["runs"][name] = run
            print(name, json.dumps(run, indent=1), flush=True)
    results["projection_gemma2b"] = project(results)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results["projection_gemma2b"], indent=1))


def project(results: dict, d_g: int = 2304, K_g: int = 16384) -> dict:
    """Per-update communication at Gemma-2-2B size from the measured runs. Power steps reduce (B, d + 1) per
    atom batch per step: their bytes scale with K·(d + 1) at the measured steps, their calls stay (128 atom
    batches at K/128). Refits left to the eigensolver reduce a d × d Gram each: at the measured share of
    eigensolved atoms, K_g·share·d_g²·4 bytes. Time = calls × latency + 2 × bytes / bus bandwidth (ring)."""
    d = results["d"]
    out = {}
    for name, run in results["runs"].items():
        eig = run["eigensolved_per_update"]
        gram_bytes = eig * d * d * 4
        power_bytes = max(run["per_update"]["bytes"] - gram_bytes, 0.0)
        nbytes = power_bytes * (K_g / K) * ((d_g + 1) / (d + 1)) + (eig / K) * K_g * d_g * d_g * 4
        calls = run["per_update"]["collectives"]
        out[name] = {
            "bytes_per_update": nbytes,
            "collectives_per_update": calls,
            "eigensolved_share": eig / K,
            "seconds_per_update": {link: calls * lat + 2 * nbytes / bw for link, (lat, bw) in LINKS.items()},
        }
    return {
        "assumptions": {k_: {"latency_s": v[0], "bus_bandwidth_Bps": v[1]} for k_, v in LINKS.items()},
        "per_update": out,
    }


if __name__ == "__main__":
    main()
