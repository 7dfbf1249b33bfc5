"""The one GPU check: the ``gpu``-marked tests, then each stage at Gemma-2-2B sizes, throughput and peak memory.

For whoever has a GPU (no hub needed; meant to take under 8 minutes on one H100, tests included; not yet timed):

    python benchmarks/bench_gpu_check.py                 # writes benchmarks/results_gpu_check.json
    python benchmarks/bench_gpu_check.py --quick         # fewer repeats and rows, no end-to-end harvest
    python benchmarks/bench_gpu_check.py --cpu-smoke --out /tmp/check.json   # tiny sizes on the CPU: runs end to end

Sections, each with its throughput, its peak GPU memory (``torch.cuda.max_memory_allocated`` from a reset at its
start; None on the CPU) and the memory :mod:`pipeline.runs.plan` planned for it at the same sizes:

* ``gpu_tests``: ``pytest -m gpu`` over the test files that carry the mark;
* ``model_load``: a **random-weight Gemma-2-2B** (transformers ``Gemma2ForCausalLM`` from ``Gemma2Config()``,
  whose defaults are gemma-2-2b's, initialised on the GPU in bf16 and saved with ``save_pretrained`` into a temp
  folder with a small locally trained tokenizer), loaded through the harvest's own loader,
  :func:`pipeline.data.models.load_local_hf`; seconds and the host's peak RSS;
* ``harvest_forward``: the harvest's forward (``run_with_cache`` up to ``blocks.12.hook_resid_post``, batch 32 ×
  128 tokens, random token ids over the whole vocabulary); ``harvest``: :func:`pipeline.data.harvest.harvest`
  end to end (tokenising generated text, masking, writing shards);
* ``evaluate_core``: per SAE (the preset's dictionary, signed, as SAEBench sees it: the 2K-wide ± split; an
  sae-bench BatchTopK SAE of width K), SAEBench core's ``get_recons_loss`` on one batch (16 × 128 tokens: clean,
  spliced and ablated forwards with full 256k-vocabulary logits, the KL), the forward to the hook and the SAE's
  encode + decode; core's time per SAE extrapolated to the preset's 200 + 2000 batches (no cached forwards);
* ``coder``, ``atom_update``, ``fit_iteration``: the preset's learner (``dictionary=reference``: signed MP with
  its rules, exact fp32 correlations, rank-1 refits to 1e-6, atom batches of K/128) on 65,536 activation-like
  rows (sparse combinations of hidden directions plus noise and a shared mean), K = 16384, k = 40;
* ``sae_step``: sae-lens BatchTopK training steps at width K, k 40, batch 4096 (the rate of 30 extra steps).

The random weights make the model's numbers meaningless but its shapes, and so its time and memory, the real
model's. Sections past ``--budget`` seconds are skipped, naming the reason; a section that fails is recorded
under ``failed`` and the others still run (the exit status is then 1). BENCHMARKS.md, "The GPU check", says what
to read in ``results_gpu_check.json``. One script (~510 lines) because it is the one command a lent GPU runs:
its sections share the model it loads once, the sizes and the JSON it writes after each section.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.atom_update import update_atoms  # noqa: E402
from pipeline.core.coders import encode, gram  # noqa: E402
from pipeline.core.codes import Codes  # noqa: E402
from pipeline.core.collective import LOCAL  # noqa: E402
from pipeline.core.dictionary import Dictionary  # noqa: E402
from pipeline.core.learner import _iteration  # noqa: E402
from pipeline.runs.config import section  # noqa: E402
from pipeline.runs.plan import plan_run  # noqa: E402
from stages.plan import compose  # noqa: E402

OUT = ROOT / "benchmarks" / "results_gpu_check.json"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each section runs at."""

    gemma: dict[str, Any]
    """``Gemma2Config`` fields over its defaults (none: gemma-2-2b)."""
    layer: int
    n_ctx: int | None
    context: int
    harvest_batch: int
    harvest_tokens: int
    """Tokens of the end-to-end harvest (0: skipped)."""
    n_atoms: int
    k: int
    fit_rows: int
    sae_batch: int
    sae_steps: tuple[int, int]
    core_prompts: int
    repeats: int
    dtype: torch.dtype


FULL = Sizes({}, 12, 1024, 128, 32, 32 * 128 * 16, 16384, 40, 65536, 4096, (10, 40), 16, 3, torch.bfloat16)
QUICK = dataclasses.replace(FULL, harvest_tokens=0, fit_rows=32768, sae_steps=(5, 20), repeats=2)
SMOKE = Sizes(
    dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        vocab_size=512,
        max_position_embeddings=256,
        sliding_window=16,
    ),
    2,
    None,
    32,
    4,
    4 * 32 * 4,
    256,
    8,
    2048,
    256,
    (2, 5),
    2,
    1,
    torch.float32,
)


# ------------------------------------------------------------------------------------------------ measuring
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def measured(rec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Fill ``rec`` with the GPU memory resident at the start and the peak reached inside (None without CUDA)."""
    cuda = torch.cuda.is_available()
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        rec["resident_gpu_bytes"] = torch.cuda.memory_allocated()
    yield rec
    sync()
    rec["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if cuda else None


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """Mean seconds of ``fn()`` over ``repeats`` calls after ``warmup``, and its last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync()
    return (time.perf_counter() - t) / repeats, out


def host_peak_rss() -> int:
    """This process's peak resident memory so far (bytes; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_gpu() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ inputs
def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` generated English-like sentences (the tokenizer's training text and the harvest's documents)."""
    words = "the a river house garden letter morning walked wrote found kept sister friend town road book rain".split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))).capitalize() + "." for _ in range(n)]


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer (vocab 320, ``<bos>``/``<eos>``/``<pad>``) trained here: no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<bos>", "<eos>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(sentences(2000, seed=1), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def activation_like(n: int, d: int, device: str, seed: int = 0) -> torch.Tensor:
    """(n, d) fp32 rows: sparse non-negative combinations (64 of 32768 unit directions) plus noise and a shared
    mean direction, the shape of residual-stream activations."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(min(32768, 8 * n), d, device=device, generator=g)
    hidden /= hidden.norm(dim=1, keepdim=True)
    idx = torch.randint(0, hidden.shape[0], (n, 64), device=device, generator=g)
    val = torch.rand(n, 64, device=device, generator=g) ** 4 * 10
    Y = torch.nn.functional.embedding_bag(idx, hidden, per_sample_weights=val, mode="sum")
    return Y + 0.3 * torch.randn(n, d, device=device, generator=g) + 2 * torch.randn(d, device=device, generator=g)


# ------------------------------------------------------------------------------------------------ sections
def gpu_tests(res: dict[str, Any]) -> None:
    """``pytest -m gpu`` over every test file that carries the mark (skipped, not failed, without CUDA)."""
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if "mark.gpu" in p.read_text(encoding="utf-8")
    )
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.strip().splitlines() if ln.strip()]
    res["gpu_tests"] = {
        "files": files,
        "returncode": done.returncode,
        "summary": lines[-1] if lines else done.stderr[-500:],
        "seconds": time.perf_counter() - t,
    }
    if done.returncode not in (0, 5):  # 5: no test selected
        res["gpu_tests"]["output_tail"] = done.stdout[-4000:]


def load_model(s: Sizes, dev: str, folder: Path, res: dict[str, Any]) -> Any:
    """The random-weight Gemma-2 of ``s`` saved to ``folder`` and loaded by the harvest's loader."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    from pipeline.data.models import load_local_hf

    tok = tiny_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Gemma2Config(architectures=["Gemma2ForCausalLM"], **s.gemma, **ids)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(dev):  # initialised where it is fast; saved as the checkpoint's dtype
        hf = AutoModelForCausalLM.from_config(config, dtype=s.dtype)
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    made = time.perf_counter() - t
    del hf
    free_gpu()
    rec: dict[str, Any] = {"make_and_save_seconds": made}
    with measured(rec):
        t = time.perf_counter()
        model = load_local_hf(folder, device=dev, dtype=s.dtype, n_ctx=s.n_ctx)
        rec["seconds"] = time.perf_counter() - t
    rec["host_peak_rss_bytes"] = host_peak_rss()
    rec["params"] = sum(p.numel() for p in model.parameters())
    res["model_load"] = rec
    return model


def harvest_sections(model: Any, s: Sizes, folder: Path, res: dict[str, Any]) -> None:
    """The harvest's forward on random token ids, then (``harvest_tokens``) :func:`harvest` end to end."""
    from pipeline.data.harvest import harvest, stop_layer

    hook = f"blocks.{s.layer}.hook_resid_post"
    tokens = torch.randint(0, model.cfg.d_vocab, (s.harvest_batch, s.context), device=model.cfg.device)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=stop_layer([hook]))
        return cache[hook]

    rec: dict[str, Any] = {}
    with measured(rec):
        sec, _ = timed(forward, s.repeats)
    rec |= {"tokens_per_s": tokens.numel() / sec, "batch": list(tokens.shape)}
    res["harvest_forward"] = rec
    if not s.harvest_tokens:
        res["harvest"] = {"skipped": "--quick"}
        return
    docs = [" ".join(sentences(12, seed=i)) for i in range(4 * s.harvest_tokens // 100 + 10)]
    rec = {}
    with measured(rec):
        t = time.perf_counter()
        harvest(model, docs, folder / "store", hooks=[hook], n_tokens=s.harvest_tokens, context_length=s.context,
                batch_size=s.harvest_batch, dtype="bfloat16", heldout_fraction=0.05, progress=False)  # fmt: skip
        rec["tokens_per_s"] = s.harvest_tokens / (time.perf_counter() - t)
    res["harvest"] = rec


def core_sections(model: Any, learner: Any, s: Sizes, res: dict[str, Any], n_batches: tuple[int, int]) -> None:
    """SAEBench core's per-batch work for each SAE, and its time per SAE extrapolated to ``n_batches``
    (reconstruction, sparsity) batches."""
    from sae_bench.custom_saes.batch_topk_sae import BatchTopKSAE
    from sae_bench.evals.core.main import get_recons_loss

    from pipeline.data.harvest import stop_layer
    from pipeline.saes.dictionary_sae import DictionarySAE

    dev, d, K = model.cfg.device, model.cfg.d_model, learner.n_atoms
    hook = f"blocks.{s.layer}.hook_resid_post"
    atoms = torch.randn(K, d)
    atoms /= atoms.norm(dim=1, keepdim=True)
    coder = dataclasses.replace(learner.coder, refit=learner.eval_refit if learner.eval_refit is not None else False)
    # no code cache: SAEBench's batches differ, these repeats would hit it
    view = DictionarySAE(Dictionary(atoms, coder), "gemma-2-2b", s.layer, hook, dev, cache_bytes=0)
    saes: dict[str, Any] = {"dictionary": view}
    topk = BatchTopKSAE(d, K, learner.coder.k, "gemma-2-2b", s.layer, torch.device(dev), torch.float32, hook)
    with torch.no_grad():
        topk.W_enc.copy_(atoms.T.to(topk.W_enc))
        topk.W_dec.copy_(atoms.to(topk.W_dec))
    topk.use_threshold = False  # top-k encode (a trained one thresholds: the same cost)
    saes["batchtopk"] = topk
    tokens = torch.randint(0, model.cfg.d_vocab, (s.core_prompts, s.context), device=dev)
    out: dict[str, Any] = {"batch": list(tokens.shape), "batches": list(n_batches)}
    for name, sae in saes.items():
        sae = sae.to(device=dev, dtype=s.dtype)  # as SAEBench's core casts it to the LLM's dtype
        rec: dict[str, Any] = {"d_sae": sae.cfg.d_sae}
        with measured(rec):
            recons, _ = timed(lambda: get_recons_loss(sae, model, tokens, None, True, True), s.repeats)

            def to_hook() -> torch.Tensor:
                with torch.inference_mode():
                    _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=stop_layer([hook]))
                return cache[hook]

            hook_s, acts = timed(to_hook, s.repeats)
            enc_s, _ = timed(lambda: sae.decode(sae.encode(acts)), s.repeats)
        rec |= {"recons_batch_seconds": recons, "hook_forward_seconds": hook_s, "encode_decode_seconds": enc_s}
        rec["core_seconds_extrapolated"] = n_batches[0] * recons + n_batches[1] * (hook_s + enc_s)
        out[name] = rec
        free_gpu()
    res["evaluate_core"] = out


def fit_sections(learner: Any, s: Sizes, d: int, dev: str, res: dict[str, Any]) -> None:
    """The preset's coder, atom update and one full iteration on ``fit_rows`` activation-like rows."""
    K, k = learner.n_atoms, learner.coder.k
    Y = activation_like(s.fit_rows, d, dev)
    D = torch.randn(K, d, device=dev)
    D /= D.norm(dim=1, keepdim=True)
    G = gram(D, learner.coder.precision)
    coder = learner.coder.kwargs()
    rec: dict[str, Any] = {"rows": s.fit_rows}
    with measured(rec):
        sec, codes = timed(lambda: encode(Y, D, k, G=G, validate=False, **coder), s.repeats)
    rec |= {"tokens_per_s": s.fit_rows / sec, "l0": float(codes.l0().float().mean())}
    res["coder"] = rec
    atom_batch = learner.atom_batch_size or max(1, K // 128)
    update = dict(nonnegative=learner.coder.nonnegative, tol=learner.rank1_tol, max_iters=learner.rank1_max_iters)

    def one_update() -> Any:
        Dw, c = D.clone(), Codes(codes.indices.clone(), codes.values.clone())
        R = Y - c.decode(Dw)
        solver = dict(solver=learner.rank1_solver, kernel=learner.coder.kernel, generator=torch.Generator())
        return update_atoms(R, Dw, c, atom_batch, **solver, **update)

    rec = {"atom_batch": atom_batch}
    with measured(rec):
        sec, stats = timed(one_update, s.repeats)
    rec |= {"tokens_per_s": s.fit_rows / sec, "seconds": sec, "mean_rank1_iters": stats.mean_rank1_iters}
    res["atom_update"] = rec
    state = {"D": D.clone(), "G": G}

    def iteration() -> dict[str, Any]:
        r = _iteration(Y, state["D"], state["G"], learner, None, atom_batch, torch.Generator().manual_seed(0), LOCAL)
        state["G"] = r.pop("G")
        return r

    rec = {}
    with measured(rec):
        sec, last = timed(iteration, s.repeats)
    rec |= {"tokens_per_s": s.fit_rows / sec, "seconds": sec, **{k_: last[k_] for k_ in last if k_.endswith("seconds")}}
    res["fit_iteration"] = rec


def sae_section(learner: Any, s: Sizes, d: int, dev: str, res: dict[str, Any]) -> None:
    """sae-lens BatchTopK at the dictionary's width and k: the rate of the steps a longer run adds."""
    from pipeline.baselines import BaselineSpec, Budget, train_baseline

    Y = activation_like(8 * s.sae_batch, d, dev, seed=1)
    spec = BaselineSpec("batchtopk", batch_size=s.sae_batch, device=dev)
    rec: dict[str, Any] = {"batch": s.sae_batch, "width": learner.n_atoms}
    secs = []
    with measured(rec):
        for steps in s.sae_steps:
            t = time.perf_counter()
            train_baseline(Y, d, learner.n_atoms, learner.coder.k, spec, Budget("steps", steps=steps))
            sync()
            secs.append(time.perf_counter() - t)
    extra = s.sae_steps[1] - s.sae_steps[0]
    rec["tokens_per_s"] = extra * s.sae_batch / max(secs[1] - secs[0], 1e-9)
    res["sae_step"] = rec


# ------------------------------------------------------------------------------------------------ the run
#: The sections :func:`summary` prints, with the record holding each one's peak (evaluate: per SAE).
SECTIONS = ("harvest_forward", "harvest", "coder", "atom_update", "fit_iteration", "sae_step")


def summary(res: dict[str, Any]) -> str:
    """One line per section: throughput, peak GPU memory, planned memory."""

    def gb(x: Any) -> str:
        return f"{x / 1e9:7.2f} GB" if isinstance(x, int | float) else f"{'-':>10}"

    planned = res.get("planned_gpu_bytes", {})
    lines = [f"{'section':<26} {'tokens/s':>12} {'peak':>10} {'planned':>10}"]
    rows = [(name, res.get(name, {}), planned.get(name)) for name in SECTIONS]
    for sae, rec in (res.get("evaluate_core") or {}).items():
        if isinstance(rec, dict) and "recons_batch_seconds" in rec:
            rec = {**rec, "tokens_per_s": None, "note": f"core {rec['core_seconds_extrapolated']:.0f} s per SAE"}
            rows.append((f"evaluate_core {sae}", rec, planned.get("evaluate_core")))
    for name, rec, plan in rows:
        rate = rec.get("tokens_per_s")
        rate_text = f"{rate:12,.0f}" if isinstance(rate, int | float) else f"{rec.get('skipped', '-'):>12}"
        lines.append(f"{name:<26} {rate_text} {gb(rec.get('peak_gpu_bytes'))} {gb(plan)} {rec.get('note', '')}")
    if "gpu_tests" in res:
        lines.append(f"gpu tests: {res['gpu_tests']['summary']}")
    lines += [f"FAILED {name}: {why}" for name, why in res.get("failed", {}).items()]
    return "\n".join(lines)


def planned(s: Sizes, overrides: list[str]) -> dict[str, int]:
    """Planned GPU bytes of each section at these sizes (the gemma2b_paper preset; see pipeline.runs.plan)."""
    cfg = compose(["experiment=gemma2b_paper", f"dictionary.batch_size={s.fit_rows}", *overrides])
    stages = {st.stage: st for st in plan_run(cfg, ranks=(1,)).stages}

    def total(stage: str, drop: tuple[str, ...] = ()) -> int:
        return sum(t.bytes for t in stages[stage].terms if t.name not in drop)

    no_data = ("streamed batch (this rank's rows)", "held-out rows")
    return {
        "harvest_forward": total("harvest"),
        "evaluate_core": total("evaluate", ("core's kept forwards",)),
        "fit_iteration": total("fit streamed", no_data),
        "sae_step": total("baselines streamed", ("held-out rows",)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and rows, no end-to-end harvest")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: the script runs end to end")
    ap.add_argument("--skip-tests", action="store_true", help="leave out the gpu-marked tests")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; later sections are skipped past it")
    args = ap.parse_args()
    t0 = time.perf_counter()
    s = SMOKE if args.cpu_smoke else QUICK if args.quick else FULL
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("no CUDA here: run with --cpu-smoke for the tiny CPU run")
    dev = "cpu" if args.cpu_smoke else "cuda"
    sizes = [f"dictionary.n_atoms={s.n_atoms}", f"dictionary.coder.k={s.k}"]
    if args.cpu_smoke:  # the torch loops: numba's compilation would take most of a tiny run
        sizes.append("dictionary.coder.kernel=torch")
    cfg = compose(["experiment=gemma2b_paper", *sizes])
    learner = dataclasses.replace(section(cfg, "dictionary"), device=dev, progress=False)
    evals = section(cfg, "eval")
    res: dict[str, Any] = {
        "device": "cpu (smoke)" if args.cpu_smoke else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "mode": "cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full",
        "date": datetime.date.today().isoformat(),
        "sizes": {k_: str(v) if isinstance(v, torch.dtype) else v for k_, v in dataclasses.asdict(s).items()},
        "model": "random-weight Gemma2ForCausalLM(Gemma2Config(**sizes.gemma)) via load_local_hf",
    }
    res["planned_gpu_bytes"] = {} if args.cpu_smoke else planned(s, [])

    def save() -> None:
        res["wall_s"] = time.perf_counter() - t0
        args.out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")

    def run(name: str, fn: Callable[[], Any]) -> Any:
        if time.perf_counter() - t0 > args.budget:
            res[name] = {"skipped": f"past --budget {args.budget:g} s"}
            return None
        try:
            out = fn()
        except Exception as exc:  # one failing section must not lose the others' figures (a GPU session is short)
            res.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"[{time.perf_counter() - t0:6.1f} s] {name} FAILED: {exc!r}", flush=True)
            out = None
        else:
            print(f"[{time.perf_counter() - t0:6.1f} s] {name} done", flush=True)
        free_gpu()
        save()
        return out

    if not args.skip_tests:
        run("gpu_tests", lambda: gpu_tests(res))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        model = run("model_load", lambda: load_model(s, dev, Path(tmp) / "gemma2", res))
        if model is not None:
            run("harvest_forward", lambda: harvest_sections(model, s, Path(tmp), res))
            batches = (evals.core.n_eval_reconstruction_batches, evals.core.n_eval_sparsity_variance_batches)
            run("evaluate_core", lambda: core_sections(model, learner, s, res, batches))
            d = model.cfg.d_model
            del model
            free_gpu()
        else:
            d = s.gemma.get("hidden_size", 2304)
    run("coder", lambda: fit_sections(learner, s, d, dev, res))
    run("sae_step", lambda: sae_section(learner, s, d, dev, res))
    save()
    print(summary(res))
    print(f"written: {args.out} ({res['wall_s']:.0f} s)")
    if res.get("failed") or res.get("gpu_tests", {}).get("returncode") not in (None, 0, 5):
        sys.exit(1)


if __name__ == "__main__":
    main()
