"""Benchmark (d): coder and fit-iteration throughput at Gemma-2-2B size on one GPU.

d = 2304, K = 16384, k = 40 (the paper's layer-12 setting). Data: activation-like synthetic samples (sparse
non-negative combinations of a hidden dictionary plus noise plus a shared mean direction), since real Gemma
activations need the hub; throughput depends on shapes and step counts, which these reproduce.

Measures, each in tokens (samples) per second:
  * the matmul Y Dᵀ alone in fp32, tf32 and bf16 (the ceiling of any correlation-based coder);
  * the MP coder: exact (fp32 correlations, all K atoms) and the fast settings (bf16/tf32 correlations,
    candidate restriction), with the relative change of the reconstruction error against exact fp32 MP;
  * one full DB-KSVD iteration on 65,536 samples (coding + atom update + re-seeding + Gram), split by phase;
  * TopK and BatchTopK SAE training steps at the same width and k (sae-lens's trainer, fp32 and bf16 autocast),
    the baseline to beat.

Usage: python benchmarks/bench_gpu.py [--out results.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.atom_update import update_atoms  # noqa: E402
from pipeline.core.coders import correlations, encode, gram  # noqa: E402
from pipeline.core.codes import Codes  # noqa: E402
from pipeline.core.collective import LOCAL  # noqa: E402
from pipeline.core.learner import LearnerConfig, _iteration, learn_dictionary  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat=3, warmup=1):
    for _ in range(warmup):
        out = fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    sync()
    return (time.perf_counter() - t) / repeat, out


def activation_like(n, d, K_true=32768, k_true=64, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    H = torch.randn(K_true, d, device=device, generator=g)
    H /= H.norm(dim=1, keepdim=True)
    Y = torch.empty(n, d, device=device)
    mean = torch.randn(d, device=device, generator=g) * 2
    for s in range(0, n, 16384):
        m = min(16384, n - s)
        idx = torch.randint(0, K_true, (m, k_true), device=device, generator=g)
        val = torch.rand(m, k_true, device=device, generator=g) ** 4 * 10
        Y[s : s + m] = torch.nn.functional.embedding_bag(idx, H, per_sample_weights=val, mode="sum")
    Y += 0.3 * torch.randn(n, d, device=device, generator=g) + mean
    return Y, H


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_results.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--small", action="store_true", help="tiny sizes on CPU (a dry run of the script)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped past it")
    args = ap.parse_args()
    t_start = time.perf_counter()
    dev = "cpu" if args.small else "cuda"
    d, K, k = (64, 1024, 8) if args.small else (2304, 16384, 40)
    n_code = 2048 if args.small else 32768 if args.quick else 65536
    name = "cpu" if args.small else torch.cuda.get_device_name(0)
    res = {"device": name, "torch": torch.__version__, "d": d, "K": K, "k": k}
    print(res, flush=True)

    def save():
        Path(args.out).write_text(json.dumps(res, indent=2))

    def over():
        return time.perf_counter() - t_start > args.budget

    Y_all, H = activation_like(2 * n_code + 8192, d, device=dev)  # one distribution for every split below
    Y, Yfit, Yheld = Y_all[:n_code], Y_all[: 2 * n_code], Y_all[2 * n_code :]
    D = H[:K].clone()  # half of the hidden atoms: the exact coder reconstructs part of each sample

    def fvu(c, Yr):
        return float((Yr - c.decode(D)).pow(2).sum() / (Yr - Yr.mean(0)).pow(2).sum())

    G = gram(D)
    res["matmul"] = {}
    for p in ("fp32", "tf32", "bf16"):
        s, _ = timed(lambda: correlations(Y, D, p))
        res["matmul"][p] = n_code / s
    print("matmul tokens/s", res["matmul"], flush=True)
    save()

    # exact fp32 MP reference (also the error reference)
    res["coder"] = {}
    s, ref = timed(lambda: encode(Y, D, k, G=G, validate=False), repeat=1)
    err_ref = fvu(ref, Y)
    res["coder"]["mp exact fp32"] = {"tokens_per_s": n_code / s, "fvu": err_ref, "l0": float(ref.l0().float().mean())}
    print("mp exact", res["coder"]["mp exact fp32"], flush=True)
    save()
    variants = {
        "mp tf32": dict(precision="tf32"),
        "mp bf16": dict(precision="bf16"),
        "mp bf16 cand256": dict(precision="bf16", candidates=256),
        "mp bf16 cand512": dict(precision="bf16", candidates=512),
        "mp bf16 cand1024": dict(precision="bf16", candidates=min(1024, K - 1)),
        "mp tf32 cand512": dict(precision="tf32", candidates=512),
        "mp fp32 cand512": dict(precision="fp32", candidates=512),
    }
    for name, kw in variants.items():
        if over():
            break
        s, c = timed(lambda: encode(Y, D, k, G=G, validate=False, **kw), repeat=2)
        err = fvu(c, Y)
        same = float((c.to_dense(K) != 0).eq(ref.to_dense(K) != 0).all(dim=1).float().mean()) if n_code <= 65536 else -1
        res["coder"][name] = {
            "tokens_per_s": n_code / s,
            "fvu": err,
            "fvu_change_vs_exact": (err - err_ref) / err_ref,
            "rows_same_support": same,
        }
        print(name, res["coder"][name], flush=True)
        save()
    # topk cost alone (candidate selection)
    nt = min(32768, n_code)
    C0 = correlations(Y[:nt], D, "bf16")
    for M in (256, 1024):
        s, _ = timed(lambda: C0.topk(min(M, K), dim=1), repeat=2)
        res.setdefault("topk_select_tokens_per_s", {})[M] = nt / s
    C0 = None  # frees the correlations
    print("topk", res.get("topk_select_tokens_per_s"), flush=True)
    if not over():
        no = min(16384, n_code)
        s, c = timed(lambda: encode(Y[:no], D, k, G=G, method="omp", validate=False), repeat=1)
        res["coder"]["omp fp32"] = {"tokens_per_s": no / s, "fvu": fvu(c, Y[:no])}
        print("omp", res["coder"]["omp fp32"], flush=True)
    save()

    # one full fit iteration, with phases
    res["fit_iteration"] = {}
    n_fit = min(n_code, 65536)
    Yf = Y[:n_fit]
    for fast in (False, True):
        if over():
            break
        for ab in (512, 2048) if not args.small else (32, 256):
            if over():
                break
            cfg = LearnerConfig.from_options(
                K,
                k,
                atom_batch_size=ab,
                progress=False,
                **(dict(precision="bf16", candidates=min(512, K // 2)) if fast else {}),
            )
            G = gram(D, cfg.coder.precision)
            Dw = D.clone()
            gen = torch.Generator().manual_seed(0)
            state = {"G": G}

            def one_iteration():
                rec_ = _iteration(Yf, Dw, state["G"], cfg, None, ab, gen, LOCAL)
                state["G"] = rec_["G"]  # the next iteration codes with the updated atoms' Gram matrix
                return rec_

            s, rec = timed(one_iteration, repeat=2, warmup=1)
            key = f"{'fast' if fast else 'exact'} coder, atom batch {ab}"
            res["fit_iteration"][key] = {
                "tokens_per_s": n_fit / s,
                "seconds": s,
                **{k_: v for k_, v in rec.items() if k_ != "G"},
            }
            print(key, res["fit_iteration"][key], flush=True)
            save()

    # sae-lens SAE training steps at the same width / k: the rate of the extra steps of a longer run over a
    # shorter one (set-up, b_dec init and the first steps' warm-up cancel out)
    res["sae_step_tokens_per_s"] = {}
    bs = min(4096, n_code)
    try:
        from pipeline.baselines import BaselineSpec, Budget, train_baseline  # noqa: E402
    except ImportError as exc:  # the GPU image may lack sae-lens and its dependencies
        res["sae_step_tokens_per_s"]["skipped"] = f"sae-lens not importable here: {exc}"
    for arch in ("topk", "batchtopk") if "skipped" not in res["sae_step_tokens_per_s"] else ():
        for autocast in (False, True):
            if over():
                break
            spec = BaselineSpec(arch, batch_size=bs, device=str(dev), trainer_options={"autocast": autocast})
            secs = []
            for steps in (10, 40):
                t = time.perf_counter()
                train_baseline(Y[: bs * 8], d, K, k, spec, Budget("steps", steps=steps))
                sync()
                secs.append(time.perf_counter() - t)
            key = f"{arch} {'bf16 autocast' if autocast else 'fp32'}"
            res["sae_step_tokens_per_s"][key] = 30 * bs / max(secs[1] - secs[0], 1e-9)
            print("sae step", key, res["sae_step_tokens_per_s"][key], flush=True)
            save()

    # the atom update on one 65,536-row batch with each rank-1 solver (exact block solvers vs the matrix-free
    # alternating one), same codes: seconds per update, iterations, objective after it
    res["update_solvers"] = {}
    Yb = Yfit[: 65536 if not args.small else 2048]
    D0 = learn_dictionary(
        Yb,
        K,
        k,
        batch_size=Yb.shape[0],
        max_iters=2,
        tol=None,
        precision="bf16",
        candidates=min(512, K // 2),
        progress=False,
        device=dev,
    ).atoms
    codes0 = encode(Yb, D0, k, precision="bf16", candidates=min(512, K // 2))
    for solver, tol in (("direct", 1e-6), ("gram", 1e-6), ("alternating", 1e-4)):
        if over():
            break
        secs = []
        for _ in range(2):  # the first run warms up kernels
            D = D0.clone()
            codes = Codes(codes0.indices.clone(), codes0.values.clone())
            R = Yb - codes.decode(D)
            sync()
            t = time.perf_counter()
            stats = update_atoms(
                R, D, codes, max(1, K // 128), solver=solver, tol=tol, generator=torch.Generator().manual_seed(0)
            )
            sync()
            secs.append(time.perf_counter() - t)
        res["update_solvers"][f"{solver} tol {tol:g}"] = {
            "seconds": secs[-1],
            "tokens_per_s": Yb.shape[0] / secs[-1],
            "mean_iters": stats.mean_rank1_iters,
            "capped": stats.capped,
            "objective_fvu": float(R.pow(2).sum() / (Yb - Yb.mean(0)).pow(2).sum()),
        }
        print("update", solver, res["update_solvers"][f"{solver} tol {tol:g}"], flush=True)
        save()

    # short real fits: paper-style schedule (2 epochs of 65,536-row batches) on activation-like data, fast coder,
    # for several atom-batch sizes (quality vs time at this scale), scored on held-out rows
    res["short_fit"] = {}
    for ab in (128, 512, 2048, K) if not args.small else (16, 256):
        if over():
            break
        t = time.perf_counter()
        Dl = learn_dictionary(
            Yfit,
            K,
            k,
            batch_size=65536 if not args.small else 1024,
            epochs=2,
            max_iters=None,
            tol=None,
            precision="bf16",
            candidates=min(512, K // 2),
            progress=False,
            device=dev,
            atom_batch_size=ab,
        )
        sync()
        secs = time.perf_counter() - t
        res["short_fit"][f"atom batch {ab}"] = {
            "rows": Yfit.shape[0],
            "iterations": len(Dl.history),
            "seconds": secs,
            "tokens_per_s": Yfit.shape[0] * 2 / secs,
            "heldout_fvu": Dl.fvu(Yheld),
            "fvu_per_iteration": [round(h["fvu"], 4) for h in Dl.history],
            "dead_fraction": [round(h["dead_fraction"], 4) for h in Dl.history],
            "phase_seconds_last": {k_: round(v, 4) for k_, v in Dl.history[-1].items() if k_.endswith("_seconds")},
        }
        print("short fit", ab, res["short_fit"][f"atom batch {ab}"], flush=True)
        save()
    res["wall_s"] = time.perf_counter() - t_start
    save()


if __name__ == "__main__":
    main()
