"""Evaluate stage: the fitted dictionary and its baselines through SAEBench's own eval code.

    python -m stages.evaluate                              # the configured experiment's fit + harvest outputs
    python -m stages.evaluate eval=paper                   # SAEBench's full sizes (hub data, GPU)
    python -m stages.evaluate eval.metrics=[core,sparse_probing]

:func:`run` is the plain function (tests and the orchestrator call it); :func:`main` the Hydra wrapper.
Inputs: the dictionary (``<fit stage>/dictionary``), the TopK baseline (``<fit stage>/topk``) and the activation
store (``<harvest stage>/store``). Outputs in ``<evaluate stage>/``:

* ``eval_results/<metric>/<sae name>_custom_sae_eval_results.json``: SAEBench's own result files;
* ``saes.json``: each evaluated SAE (architecture, width, k, L0 / FVU / dead fraction on held-out activations,
  mean max |cos| between atoms);
* ``skipped.json``: every metric (or SAE) not evaluated, with the reason (missing judge key, hub-only data,
  absorption's gate, ...); ``failed.json``: metrics that raised, with the error;
* ``eval_info.json``: the eval sizes used, per-metric wall time, the model, the data; ``sae_lens/<name>/``: the
  dictionary exported in the sae-lens format.

An existing result file is kept (not recomputed) unless ``eval.force_rerun``; the stage is marked done only
when no metric failed, so a re-run retries just the failed ones.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.evals import saebench as sbe
from pipeline.utils.atomic import atomic_write_text
from pipeline.runs.layout import is_done, mark_done, prepare, stage_dir

log = logging.getLogger(__name__)

RESULTS_SUBDIR = "eval_results"
ARTIFACTS_SUBDIR = "artifacts"
LABELLED_TOKEN = "austen_labelled"
"""Placeholder in ``dataset_names`` / ``column1_vals_lookup`` for the labelled Austen data built here."""
LOW_CONFIDENCE_ABSORPTION = ("absorption on a model below {limit:.0e} parameters ({n:.3g}) is low-confidence: "
                             "SAEBench recommends >= 2B-parameter models (first-letter spelling knowledge), and "
                             "the vocabulary was subsampled to {v} words with the gate lowered")
EVAL_KEYS = {"metrics", "saes", "hub_baselines", "device", "llm_batch_size", "force_rerun", "local_datasets",
             "encode_cache_mb", "labelled", "core", "absorption", "sparse_probing", "scr", "tpp", "autointerp",
             "ravel", "unlearning", "label"}


# ============================================================================================= config
def eval_settings(cfg: DictConfig | dict) -> dict[str, Any]:
    """The ``eval`` node as plain data, checked: unknown keys and metric names fail here, naming the key."""
    node = cfg["eval"] if "eval" in cfg else None
    if node is None:
        raise ValueError("config has no `eval` node; add `- eval: offline_small` to the defaults list")
    e = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    unknown = set(e) - EVAL_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) eval.{sorted(unknown)}; valid keys: {sorted(EVAL_KEYS)}")
    bad = [m for m in e.get("metrics", []) if m not in sbe.METRICS]
    if bad:
        raise ValueError(f"eval.metrics has unknown metric(s) {bad}; choose from {list(sbe.METRICS)}")
    bad = [s for s in e.get("saes", []) if s not in ("dictionary", "topk")]
    if bad:
        raise ValueError(f"eval.saes has unknown entries {bad}; use dictionary and/or topk")
    return e


def _metric_config(cls: type, node: dict[str, Any], what: str, **fixed: Any) -> Any:
    """Build SAEBench's config dataclass ``cls`` from ``node['config']`` plus ``fixed``; unknown keys fail."""
    import dataclasses

    raw = dict(node.get("config") or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"eval.{what}.config has unknown key(s) {sorted(unknown)}; SAEBench's {cls.__name__} "
                         f"fields are {sorted(names)}")
    fields = {**raw, **{k: v for k, v in fixed.items() if k not in raw or v is not None}}
    return cls(**fields)


def _swap_labelled(value: Any, name: str) -> Any:
    if isinstance(value, list):
        return [name if v == LABELLED_TOKEN else _swap_labelled(v, name) for v in value]
    if isinstance(value, dict):
        return {(name if k == LABELLED_TOKEN else k): _swap_labelled(v, name) for k, v in value.items()}
    return value


# ============================================================================================= SAEs
def build_saes(fit_dir: Path, which: list[str], model_name: str, hook: str, layer: int, device: str,
               cache_mb: int, context_size: int | None) -> tuple[list[tuple[str, Any]], list[dict], list[dict]]:
    """The SAEs to evaluate: (name, SAEBench SAE object) pairs, their descriptions and skip records."""
    from sae_bench.custom_saes.topk_sae import TopKSAE as BenchTopKSAE

    from pipeline.core.dictionary import Dictionary
    from pipeline.evals.dictionary_sae import DictionarySAE
    from pipeline.evals.topk_sae import TopKSAE

    saes, described, skipped = [], [], []
    if "dictionary" in which:
        path = fit_dir / "dictionary"
        if not (path / "dictionary.json").exists():
            raise FileNotFoundError(f"no dictionary at {path}; run the fit stage first (`python -m pipeline "
                                    "stage=fit`) or point the config at the right experiment")
        d = Dictionary.load(path)
        sae = DictionarySAE(d, model_name, layer, hook, device=device, cache_bytes=cache_mb << 20)
        sae.cfg.context_size = context_size
        groups = "matryoshka" if d.groups is not None else "plain"
        name = f"dbksvd_{groups}_K{d.n_atoms}_k{d.coder.k}"
        saes.append((name, sae))
        described.append({"name": name, "kind": "dictionary", "architecture": sae.cfg.architecture,
                          "n_atoms": d.n_atoms, "width": sae.cfg.d_sae, "k": d.coder.k, "signed": sae.signed,
                          "coder": sae.coder_metadata(), "matryoshka": d.groups is not None,
                          "width_note": ("signed dictionary compared at width 2K (W_dec = [D; -D])"
                                         if sae.signed else "non-negative dictionary compared at width K"),
                          "history": d.history})
    if "topk" in which:
        path = fit_dir / "topk"
        if not path.exists():
            skipped.append({"what": "sae:topk", "reason": f"no TopK baseline at {path} (baseline.topk=false or "
                                                          "the fit stage has not trained it)"})
        else:
            t = TopKSAE.load(path)
            b = BenchTopKSAE(t.W_dec.shape[1], t.n_latents, int(t.k), model_name, layer, torch.device(device),
                             torch.float32, hook_name=hook)
            with torch.no_grad():
                for p in ("W_enc", "b_enc", "W_dec", "b_dec"):
                    getattr(b, p).copy_(getattr(t, p).detach().float())
            b.cfg.architecture = "topk"
            b.cfg.context_size = context_size
            name = f"topk_K{t.n_latents}_k{t.k}"
            saes.append((name, b))
            described.append({"name": name, "kind": "topk", "architecture": "topk", "n_atoms": t.n_latents,
                              "width": t.n_latents, "k": int(t.k), "signed": False,
                              "history": t.history[-1:] if t.history else []})
    return saes, described, skipped


@torch.no_grad()
def heldout_stats(sae: Any, Y: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """L0, FVU and dead fraction of ``sae`` on held-out activations ``Y: (n, d)``; coherence of its decoder."""
    from pipeline.evals.dictionary_sae import mean_max_abs_cos

    Y = Y.float()
    err, l0, used = 0.0, 0.0, None
    for s in range(0, Y.shape[0], chunk):
        y = Y[s:s + chunk]
        f = sae.encode(y)
        err += float((y - sae.decode(f)).pow(2).sum())
        l0 += float((f != 0).sum())
        u = (f != 0).any(dim=0)
        used = u if used is None else used | u
    var = float((Y - Y.mean(0)).pow(2).sum())
    W = getattr(sae, "atoms", sae.W_dec)
    if used is not None and getattr(sae, "signed", False):
        K = used.shape[0] // 2
        used = used[:K] | used[K:]
    return {"heldout_rows": int(Y.shape[0]), "l0": l0 / max(Y.shape[0], 1), "fvu": err / max(var, 1e-30),
            "dead_fraction": float(1 - used.float().mean()) if used is not None else math.nan,
            "mean_max_abs_cos": mean_max_abs_cos(W)}


# ============================================================================================= stage
def run(cfg: DictConfig | dict, *, run_dir: str | Path | None = None, fit_dir: str | Path | None = None,
        store_dir: str | Path | None = None, model: Any = None) -> Path:
    """Evaluate the configured experiment's dictionary (and baselines); returns the stage folder.

    ``run_dir``/``fit_dir``/``store_dir`` default to the run layout's stage folders; ``model`` may be passed
    in already loaded (else it is loaded from ``cfg.model``). SAEBench switches autograd off globally (SCR/TPP
    call ``torch.set_grad_enabled(False)``); the caller's mode is restored, so later work in the same process
    (the next job of a sweep) can still train.
    """
    grad = torch.is_grad_enabled()
    try:
        return _run(cfg, run_dir=run_dir, fit_dir=fit_dir, store_dir=store_dir, model=model)
    finally:
        torch.set_grad_enabled(grad)


def _run(cfg: DictConfig | dict, *, run_dir: str | Path | None, fit_dir: str | Path | None,
         store_dir: str | Path | None, model: Any) -> Path:
    from pipeline.data.store import ActivationStore
    from pipeline.data.config import parse_harvest_config
    from pipeline.data.harvest import hook_layer
    from stages.harvest import STORE_DIRNAME

    e = eval_settings(cfg)
    model_cfg, source, h = parse_harvest_config(cfg)
    folder = Path(run_dir) if run_dir else stage_dir(cfg, "evaluate")
    prepare(folder, cfg, "evaluate")
    fit_dir = Path(fit_dir) if fit_dir else stage_dir(cfg, "fit")
    store_dir = Path(store_dir) if store_dir else stage_dir(cfg, "harvest") / STORE_DIRNAME
    results, artifacts = folder / RESULTS_SUBDIR, folder / ARTIFACTS_SUBDIR
    device = e.get("device") or model_cfg.device
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    store = ActivationStore(store_dir)
    hook = store.hook
    layer = hook_layer(hook)
    ctx_len = int(store.manifest.get("context_length", h.context_length))

    saes, described, skipped = build_saes(fit_dir, list(e.get("saes", ["dictionary", "topk"])), model_cfg.name,
                                          hook, layer, device, int(e.get("encode_cache_mb", 256)), ctx_len)
    heldout = store.heldout()
    for (name, sae), desc in zip(saes, described):
        if not isinstance(sae, str):
            desc.update(heldout_stats(sae, heldout))
    del heldout
    failed: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    info: dict[str, Any] = {"model": {"name": model_cfg.name, "path": model_cfg.path, "hook": hook},
                            "device": device, "sizes": {}, "notes": []}

    # export the dictionary in the sae-lens format (loads in plain sae-lens as an approximate topk)
    for name, sae in saes:
        if getattr(sae, "cfg", None) is not None and sae.cfg.architecture == "dbksvd":
            from pipeline.evals.dictionary_sae import save_sae_lens

            save_sae_lens(sae, folder / "sae_lens" / name)

    # SAEBench's published suites (baseline b): their result files, or (hub) the SAEs themselves via sae-lens
    for b in e.get("hub_baselines") or []:
        reason = _hub_baseline(b, hub_ok := _hub_reachable(), results)
        if reason:
            skipped.append({"what": f"hub_baseline:{b.get('release')}/{b.get('sae_id')}", "reason": reason})
        elif not b.get("results_dir"):
            saes.append((b["release"], b["sae_id"]))
            described.append({"name": f"{b['release']}_{b['sae_id']}", "kind": "hub_baseline",
                              "architecture": b.get("architecture", "sae-lens"), "release": b["release"],
                              "sae_id": b["sae_id"]})

    metrics = list(e.get("metrics", []))
    if model is None and metrics:
        from pipeline.data.models import load_model

        model = load_model(model_cfg.name, path=model_cfg.path, device=device, dtype=model_cfg.dtype,
                           n_ctx=model_cfg.n_ctx)
    n_params = sum(p.numel() for p in model.parameters()) if model is not None else 0
    info["model"]["n_params"] = n_params
    llm_dtype = str(next(model.parameters()).dtype).replace("torch.", "") if model is not None else "float32"
    llm_batch = int(e.get("llm_batch_size", 8))
    force = bool(e.get("force_rerun", False))
    hub_ok = _hub_reachable()

    # the labelled text (novel x dialogue) in SAEBench's layout
    spec = None
    if any(m in metrics for m in ("sparse_probing", "scr", "tpp")):
        spec = _labelled(folder, source, e.get("labelled") or {})
        info["labelled_data"] = {k: spec[k] for k in ("name", "titles", "counts", "min_words", "test_every")}

    for metric in metrics:
        node = dict(e.get(metric) or {})
        t0 = time.perf_counter()
        try:
            local = dict(e.get("local_datasets") or {})
            if spec:
                local[spec["base_name"]] = spec["path"]
            with sbe.local_datasets(local), \
                    (sbe.registered_labelled_dataset(spec) if spec else _null()):
                reason = _run_metric(metric, node, saes, model, results, artifacts / metric, device, llm_dtype,
                                     llm_batch, force, spec, store, source, info, hub_ok, model_cfg, e, n_params)
            if reason:
                skipped.append({"what": f"metric:{metric}", "reason": reason})
            else:
                for name, obj in saes:
                    if not sbe.result_path(results, metric, name, obj).exists():
                        skipped.append({"what": f"metric:{metric}", "sae": name,
                                        "reason": _missing_reason(metric, node)})
        except Exception as exc:  # noqa: BLE001 - recorded, the other metrics still run
            log.exception("metric %s failed", metric)
            failed.append({"metric": metric, "error": sbe.format_exception(exc)})
        timings[metric] = time.perf_counter() - t0
        log.info("%s took %.1f s", metric, timings[metric])

    info["timings_s"] = timings
    info["total_eval_s"] = sum(timings.values())
    atomic_write_text(folder / "saes.json", json.dumps(described, indent=2, default=_json_default))
    atomic_write_text(folder / "skipped.json", json.dumps(skipped, indent=2))
    atomic_write_text(folder / "failed.json", json.dumps(failed, indent=2))
    atomic_write_text(folder / "eval_info.json", json.dumps(info, indent=2, default=_json_default))
    if failed:
        log.error("evaluate: %d metric(s) failed (%s); see %s. Re-run to retry them (finished results are kept).",
                  len(failed), ", ".join(f["metric"] for f in failed), folder / "failed.json")
    else:
        mark_done(folder, metrics=metrics, saes=[n for n, _ in saes], seconds=info["total_eval_s"])
    return folder


def _null():
    import contextlib

    return contextlib.nullcontext()


def _hub_reachable() -> bool:
    from pipeline.data.models import hub_reachable

    return hub_reachable()


def _labelled(folder: Path, source: Any, node: dict[str, Any]) -> dict[str, Any]:
    """The labelled passages: ``eval.labelled.jsonl`` ({"title", "text"} per line, one document per title) or,
    by default, Jane Austen's six novels (installed by setup.sh, whatever the harvest text was)."""
    if node.get("jsonl"):
        path = Path(node["jsonl"])
        docs = [(r["title"], r["text"]) for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())]
    else:
        from pipeline.data.text import AUSTEN_BOOKS, austen_jsonl

        rows = [json.loads(x) for x in austen_jsonl().read_text(encoding="utf-8").splitlines() if x.strip()]
        docs = [(r["title"], r["text"]) for r in rows if r["title"] in AUSTEN_BOOKS]
    return sbe.build_labelled_text(folder / "data" / "labelled", docs,
                                   min_words=int(node.get("min_words", 12)),
                                   test_every=int(node.get("test_every", 5)))


def _missing_reason(metric: str, node: dict[str, Any]) -> str:
    if metric == "absorption":
        c = node.get("config") or {}
        return ("SAEBench's absorption gate: fewer than min_feats_for_eval="
                f"{c.get('min_feats_for_eval', 20)} letters reached ground-truth probe F1 > "
                f"min_GT_probe_f1={c.get('min_GT_probe_f1', 0.6)} (no result written)")
    return "SAEBench wrote no result file for this SAE (see the stage log)"


def _run_metric(metric, node, saes, model, results, artifacts, device, llm_dtype, llm_batch, force, spec, store,
                source, info, hub_ok, model_cfg, e, n_params) -> str | None:
    """Run one metric; returns a skip reason instead when a requirement is missing."""
    name = model_cfg.name
    if metric == "core":
        from pipeline.data.text import iter_documents

        n_needed = int(node.get("batch_size_prompts", 8)) * max(int(node.get("n_eval_reconstruction_batches", 4)),
                                                                int(node.get("n_eval_sparsity_variance_batches", 8)))
        ctx = int(node.get("context_size", 128))
        if node.get("dataset"):
            dataset, label = node["dataset"], str(node["dataset"])
        else:
            from datasets import Dataset

            m = store.manifest
            skip = int(math.ceil(int(m.get("n_contexts", 0)) * int(m.get("context_length", ctx)) / ctx))
            bos = m.get("bos_token_id")
            rows = sbe.text_after(iter_documents(source), model.tokenizer, ctx, bos, skip, n_needed + 8)
            dataset = Dataset.from_dict({"tokens": rows})
            label = (f"local text ({source.kind}) after the {skip} harvested contexts: {len(rows)} contexts of "
                     f"{ctx} tokens, never seen by the fit")
        info["sizes"]["core"] = {k: node.get(k) for k in ("batch_size_prompts", "n_eval_reconstruction_batches",
                                                          "n_eval_sparsity_variance_batches", "context_size")}
        info["sizes"]["core"]["dataset"] = label
        sbe.run_core(saes, model, results, dataset=dataset, context_size=ctx,
                     batch_size_prompts=int(node.get("batch_size_prompts", 8)),
                     n_eval_reconstruction_batches=int(node.get("n_eval_reconstruction_batches", 4)),
                     n_eval_sparsity_variance_batches=int(node.get("n_eval_sparsity_variance_batches", 8)),
                     llm_dtype=llm_dtype, device=device, force_rerun=force, dataset_label=label)
        return None
    if metric == "absorption":
        from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

        cfg = _metric_config(AbsorptionEvalConfig, node, metric, model_name=name, llm_dtype=llm_dtype,
                             llm_batch_size=llm_batch)
        vocab = node.get("vocab_size")
        _, sub = sbe.run_absorption(saes, model, results, artifacts, cfg, device, vocab_size=vocab,
                                    min_words_per_letter=int(node.get("min_words_per_letter", 12)),
                                    seed=int(node.get("seed", 0)), force_rerun=force)
        limit = float(node.get("low_confidence_below_params", 2e9))
        info["sizes"]["absorption"] = {**_dc(cfg), **sub, "vocab_size": vocab}
        if n_params < limit:
            info["notes"].append({"metric": "absorption", "low_confidence": True,
                                  "note": LOW_CONFIDENCE_ABSORPTION.format(limit=limit, n=n_params,
                                                                           v=sub.get("subsampled_vocab", vocab))})
        return None
    if metric in ("sparse_probing", "scr", "tpp"):
        if metric == "sparse_probing":
            from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig as C
        else:
            from sae_bench.evals.scr_and_tpp.eval_config import ScrAndTppEvalConfig as C
        node = _swap_labelled(node, spec["name"])
        fixed = dict(model_name=name, llm_dtype=llm_dtype, llm_batch_size=llm_batch)
        if metric != "sparse_probing":
            fixed["perform_scr"] = metric == "scr"
        cfg = _metric_config(C, node, metric, **fixed)
        if spec["name"] in cfg.dataset_names:
            tr = cfg.probe_train_set_size if metric == "sparse_probing" else cfg.train_set_size
            te = cfg.probe_test_set_size if metric == "sparse_probing" else cfg.test_set_size
            if metric == "scr":
                pairs = [c for pair in cfg.column1_vals_lookup.get(spec["name"], []) for c in pair]
                sbe.check_labelled_sizes(spec, tr, te, pairs, f"eval.{metric}", scr=True)
            else:
                sbe.check_labelled_sizes(spec, tr, te, spec["classes"], f"eval.{metric}")
        info["sizes"][metric] = _dc(cfg)
        if metric == "sparse_probing":
            sbe.run_sparse_probing(saes, model, results, artifacts, cfg, device, force)
        else:
            sbe.run_scr_or_tpp(saes, model, results, artifacts, cfg, device, force)
        return None
    if metric == "autointerp":
        env = node.get("api_key_env", "OPENAI_API_KEY")
        key = os.environ.get(env)
        if not key:
            return (f"no judge API key: autointerp asks an OpenAI model to explain and score latents; set ${env} "
                    "(and network access to the API) to run it")
        from sae_bench.evals.autointerp.eval_config import AutoInterpEvalConfig

        cfg = _metric_config(AutoInterpEvalConfig, node, metric, model_name=name, llm_dtype=llm_dtype,
                             llm_batch_size=llm_batch)
        info["sizes"][metric] = _dc(cfg)
        tokens = None
        if not hub_ok:
            from pipeline.data.text import iter_documents

            m = store.manifest
            rows = sbe.text_after(iter_documents(source), model.tokenizer, cfg.llm_context_size,
                                  m.get("bos_token_id"), 0, cfg.total_tokens // cfg.llm_context_size + 1)
            tokens = torch.tensor(rows, dtype=torch.long)
            info["sizes"][metric]["dataset"] = f"local text ({source.kind}), hub unreachable"
        sbe.run_autointerp(saes, model, results, artifacts, cfg, device, key, tokens=tokens, force_rerun=force)
        return None
    if metric == "ravel":
        import sae_bench.evals.ravel.main as ravel_main

        if name not in ravel_main.LLM_NAME_MAP:
            return (f"RAVEL supports only {sorted(ravel_main.LLM_NAME_MAP)} (its prompts and entity lists are "
                    f"built for them); the model is {name!r}")
        if not hub_ok:
            return "RAVEL needs the Hugging Face hub (its prompt/entity files and the HF model); the hub is unreachable"
        from sae_bench.evals.ravel.eval_config import RAVELEvalConfig

        cfg = _metric_config(RAVELEvalConfig, node, metric, model_name=name, llm_dtype=llm_dtype,
                             llm_batch_size=llm_batch, artifact_dir=str(artifacts))
        info["sizes"][metric] = _dc(cfg)
        sbe.run_ravel(saes, results, artifacts, cfg, device, force)
        return None
    if metric == "unlearning":
        if "it" not in name.split("-"):
            return (f"unlearning needs an instruction-tuned model (SAEBench: 'it' in the model name, e.g. "
                    f"gemma-2-2b-it); the model is {name!r}")
        if not hub_ok:
            return "unlearning needs the gated WMDP bio corpus, cais/wmdp and cais/mmlu from the hub; unreachable"
        from sae_bench.evals.unlearning.eval_config import UnlearningEvalConfig

        cfg = _metric_config(UnlearningEvalConfig, node, metric, model_name=name, llm_dtype=llm_dtype,
                             llm_batch_size=llm_batch)
        info["sizes"][metric] = _dc(cfg)
        sbe.run_unlearning(saes, model, results, artifacts, cfg, device, force)
        return None
    raise ValueError(metric)


def _hub_baseline(b: dict[str, Any], hub_ok: bool, results: Path) -> str | None:
    """SAEBench's published suites (e.g. Gemma-2-2B layer 12 BatchTopK / Matryoshka-BatchTopK): either their
    published result files (``b.results_dir``, SAEBench's layout) are copied in, or the SAE is loaded through
    sae-lens (``release``/``sae_id``) and run through the same metrics (the caller adds it to the SAE list when
    this returns None)."""
    import shutil

    src = b.get("results_dir")
    if src:
        src = Path(src)
        if not src.is_dir():
            return f"published results folder {src} does not exist"
        for metric_dir in src.iterdir():
            if metric_dir.is_dir() and metric_dir.name in sbe.METRICS:
                dst = results / metric_dir.name
                dst.mkdir(parents=True, exist_ok=True)
                for f in metric_dir.glob("*_eval_results.json"):
                    if not (dst / f.name).exists():
                        shutil.copy2(f, dst / f.name)
        return None
    if not hub_ok:
        return ("SAEBench's published SAE suites load through sae-lens from the Hugging Face hub, which is "
                "unreachable; with hub access they are evaluated like the dictionary (or point "
                "results_dir at a local copy of their result files)")
    return None


def _dc(cfg: Any) -> dict[str, Any]:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    folder = run(cfg)
    print(f"evaluation: {folder} ({'done' if is_done(folder) else 'incomplete: see failed.json'})")


if __name__ == "__main__":
    main()
