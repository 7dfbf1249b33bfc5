"""DictionarySAE.encode (the project's sparse coder behind SAEBench's interface) vs SAEBench's TopKSAE.encode.

    python benchmarks/bench_encode.py                          # d=576, K=2048, k=32 (the offline default)
    python benchmarks/bench_encode.py --store outputs/<exp>/harvest-*/store --K 4096
    python benchmarks/bench_encode.py --device cuda --d 2304 --K 16384 --k 40 --tokens 65536

Both encoders see the same (B, L, d) batches (SAEBench's shape) and return dense (B, L, K) codes. Inputs are
real activations from ``--store`` when given, else correlated Gaussian data; the dictionary's atoms are
normalised data rows (the learner's ``init=data``), so matching pursuit stops the way it does on a fitted
dictionary of that data more than it would on random atoms. The code cache is off (every batch is new).
Rows: the exact coder (MP, then MP restricted to the top ``candidates`` correlations, then Batch-OMP) and the
TopK SAE at the same d and K. Prints a markdown table and writes JSON next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def _data(args) -> torch.Tensor:
    if args.store:
        from pipeline.data.store import ActivationStore

        Y = ActivationStore(args.store).load_all()
        need = args.tokens + args.K
        if Y.shape[0] < need:
            raise SystemExit(f"the store has {Y.shape[0]} rows; need {need}")
        return Y[:need].float()
    g = torch.Generator().manual_seed(0)
    A = torch.randn(args.d, args.d, generator=g) / args.d**0.5
    return torch.randn(args.tokens + args.K, args.d, generator=g) @ A + 0.3 * torch.randn(args.d, generator=g)


def _time(fn, batches, repeats: int) -> float:
    fn(batches[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            fn(b)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--K", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=8192, help="tokens encoded per timing (in batches of 32 x 128)")
    p.add_argument("--store", default=None, help="activation store to draw real activations from")
    p.add_argument("--candidates", type=int, nargs="*", default=[256, 128])
    p.add_argument("--omp", action="store_true", help="also time Batch-OMP")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results_encode_cpu.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sae_bench.custom_saes.topk_sae import TopKSAE

    from pipeline.core.dictionary import CoderSettings, Dictionary
    from pipeline.saes.dictionary_sae import DictionarySAE

    Y = _data(args)
    args.d = Y.shape[1]
    atoms = Y[args.tokens : args.tokens + args.K]
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    X = Y[: args.tokens].to(args.device)
    L = 128
    batches = [X[s : s + 32 * L].reshape(-1, L, args.d) for s in range(0, X.shape[0] - 32 * L + 1, 32 * L)]
    n_tok = sum(b.shape[0] * b.shape[1] for b in batches)

    topk = TopKSAE(args.d, args.K, args.k, "bench", 0, torch.device(args.device), torch.float32)
    with torch.no_grad():
        topk.W_dec.copy_(atoms)
        topk.W_enc.copy_(atoms.T)
    rows = []
    t_topk = _time(topk.encode, batches, args.repeats)
    rows.append({"encoder": "SAEBench TopKSAE.encode", "tok_per_s": n_tok / t_topk, "slowdown": 1.0, "fvu": None})

    def fvu(sae) -> float:
        x = batches[0].reshape(-1, args.d)
        r = sae.decode(sae.encode(x))
        return float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    rows[0]["fvu"] = fvu(topk)
    settings = [("MP (exact)", dict(method="mp"))]
    settings += [(f"MP, candidates={c}", dict(method="mp", candidates=c)) for c in args.candidates]
    if args.omp:
        settings.append(("Batch-OMP", dict(method="omp")))
    for label, kw in settings:
        d = Dictionary(atoms.clone(), CoderSettings(k=args.k, **kw))
        sae = DictionarySAE(d, "bench", 0, device=args.device, cache_bytes=0)
        t = _time(sae.encode, batches, args.repeats)
        rows.append(
            {
                "encoder": f"DictionarySAE.encode, {label}",
                "tok_per_s": n_tok / t,
                "slowdown": t / t_topk,
                "fvu": fvu(sae),
            }
        )
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": args.device,
        "d": args.d,
        "K": args.K,
        "k": args.k,
        "tokens": n_tok,
        "batch": f"{len(batches)} x (32, {L}, d)",
        "data": f"store {args.store}" if args.store else "correlated Gaussian",
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(meta, indent=2))
    print(f"d={args.d} K={args.K} k={args.k}, {n_tok} tokens, {meta['data']}, {meta['threads']} threads, {args.device}")
    print("| encoder | tokens/s | × TopK time | FVU on batch 1 |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['encoder']} | {r['tok_per_s']:,.0f} | {r['slowdown']:.1f}× | {r['fvu']:.3f} |")


if __name__ == "__main__":
    main()
