"""SAEBench's core metrics (reconstruction, loss recovered, KL, sparsity, feature density) on local text.

SAEBench's ``core.multiple_evals`` loads a hub dataset and swallows exceptions; this runner calls its parts
(``run_evals`` + ``save_single_eval_result``) on a ``datasets.Dataset`` of token contexts: by default the
harvest text *after* the harvested contexts (never seen by the fit), or ``eval.core.dataset`` from the hub.

``eval.core.positions`` says which positions the numbers cover: ``all`` (SAEBench's core as published, written to
``core/``), ``fit`` (the positions the fit used, written to ``core_fit_positions/`` in the same layout and file
names: :mod:`pipeline.evals.metrics.positions`) or ``both``. The LLM forwards that do not depend on the SAE are
run once for all SAEs and both position sets, and the SAE splice starts at the hook from the kept residual
(:mod:`pipeline.evals.metrics.shared_forwards`); so are the zero-ablated CE and KL of each batch
(:mod:`pipeline.evals.metrics.recons_loss`). With the eval cache on, those forwards are kept in the shared
cache (:data:`FORWARDS_SUBDIR` of core's artifacts, :func:`pipeline.evals.metrics.artifact_reuse.core_key`): a
later run on the same model, hook and eval text runs only each SAE's splice, from the hook up.

Signed codes (``eval.signed_export=signed``). SAEBench's core uses an SAE's codes for the reconstruction
(``decode(encode(x))``), L0 (``!= 0``), L1 (``codes.sum()``) and the feature density (``codes > 0``): the last two
are right only for non-negative codes. :class:`MagnitudeCodes` hands core ``|codes|`` and decodes the signed codes
behind them, so every number is the signed SAE's: the reconstruction, CE/KL and L0 as they are, L1 = Σ|code|, a
latent active where its code is non-zero. The decoder-weight statistics (``max_decoder_cosine_sim``, ...) are
SAEBench's over the K atoms: a signed maximum, where the ± split's amounts to max |cos| over the atoms.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline.evals.metrics.artifact_reuse import cache_enabled, core_key, reused_artifacts
from pipeline.evals.metrics.base import EvalContext, MetricRunner
from pipeline.evals.metrics.positions import (
    ALL_COVERS,
    FIT_RESULTS,
    LEFT_OUT,
    FitRule,
    MarkedTokens,
    TrueTokensModel,
    position_runs,
    with_positions,
)
from pipeline.evals.metrics.recons_loss import zero_ablation_shared
from pipeline.evals.metrics.shared_forwards import SharedForwards
from pipeline.evals.metrics.text import harvested_contexts, text_after
from pipeline.evals.results import write_json
from pipeline.evals.sae_records import SAERecord

#: Extra contexts read beyond what the batches need.
SPARE_CONTEXTS = 8
#: Seed of the shuffle of the eval contexts (SAEBench's own).
SHUFFLE_SEED = 42
#: Core's artifacts subfolder of the kept SAE-independent forwards (the shared eval cache's entry).
FORWARDS_SUBDIR = "forwards"
#: Result folder of each core run (``eval.core.positions``).
RESULT_DIRS = {"all": "core", "fit": FIT_RESULTS}
#: The ``eval_info.json`` note of a core run on signed codes.
SIGNED_NOTE = (
    "{names}: signed codes (eval.signed_export=signed, K latents). Core read their magnitudes for its "
    "statistics and decoded the signed codes: L0, L1 (= sum of |code|) and feature density count a latent as "
    "active where its code is non-zero, of either sign; max encoder/decoder cosine are SAEBench's signed maxima "
    "over the K atoms (the ± split's amount to max |cos|)."
)


class MagnitudeCodes:
    """An SAE with signed codes as SAEBench's core reads it (module docstring): ``encode`` returns ``|codes|``,
    ``decode`` of exactly that tensor returns the reconstruction of the signed codes behind it; every other
    attribute is the wrapped SAE's.

    Core (SAEBench 0.6.0) decodes only what ``encode`` has just returned (``decode(encode(x))`` in its
    reconstruction hooks, ``encode`` then ``decode`` in its sparsity loop); ``decode`` of any other tensor raises,
    so a SAEBench that used the codes otherwise fails loudly instead of decoding magnitudes as codes.
    """

    def __init__(self, sae: Any):
        self._sae = sae
        self._last: tuple[Any, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sae, name)

    def encode(self, x: Any) -> Any:
        codes = self._sae.encode(x)
        magnitudes = codes.abs()
        self._last = (magnitudes, codes)
        return magnitudes

    def decode(self, feature_acts: Any) -> Any:
        if self._last is None or feature_acts is not self._last[0]:
            raise RuntimeError(
                "SAEBench's core decoded codes other than those encode had just returned; core on signed codes "
                "(eval.signed_export=signed) does not support this SAEBench version: use eval.signed_export=split"
            )
        return self._sae.decode(self._last[1])


class CoreRunner(MetricRunner):
    name = "core"

    def config(self, ctx: EvalContext) -> Any:
        """SAEBench's ``CoreEvalConfig`` with every metric group on (SAEBench's "everything" settings)."""
        import sae_bench.evals.core.main as core
        from sae_bench.evals.core.eval_config import CoreEvalConfig

        c = ctx.eval.core
        every = core.get_multiple_evals_everything_config(
            c.batch_size_prompts, c.n_eval_reconstruction_batches, c.n_eval_sparsity_variance_batches
        )
        return CoreEvalConfig(
            model_name=ctx.model_name,
            batch_size_prompts=c.batch_size_prompts,
            n_eval_reconstruction_batches=c.n_eval_reconstruction_batches,
            n_eval_sparsity_variance_batches=c.n_eval_sparsity_variance_batches,
            exclude_special_tokens_from_reconstruction=False,
            dataset=c.dataset or "local tokens",
            context_size=c.context_size,
            compute_kl=every.compute_kl,
            compute_ce_loss=every.compute_ce_loss,
            compute_l2_norms=every.compute_l2_norms,
            compute_sparsity_metrics=every.compute_sparsity_metrics,
            compute_variance_metrics=every.compute_variance_metrics,
            compute_featurewise_density_statistics=True,
            compute_featurewise_weight_based_metrics=True,
            llm_dtype=ctx.llm_dtype,
        )

    def result_paths(self, ctx: EvalContext, record: SAERecord) -> list[Path]:
        """The result files of ``record`` that ``eval.core.positions`` asks for."""
        return [record.result_path(ctx.results_dir, RESULT_DIRS[r]) for r in position_runs(ctx.eval.core.positions)]

    def run(self, ctx: EvalContext, config: Any) -> None:
        c = ctx.eval.core
        runs = position_runs(c.positions)
        rule = FitRule.from_manifest(ctx.store.manifest) if "fit" in runs else None
        dataset, label = self.dataset(ctx)
        config.dataset = label
        ctx.record_sizes(
            self.name,
            {
                "batch_size_prompts": c.batch_size_prompts,
                "n_eval_reconstruction_batches": c.n_eval_reconstruction_batches,
                "n_eval_sparsity_variance_batches": c.n_eval_sparsity_variance_batches,
                "context_size": c.context_size,
                "dataset": label,
                "positions": c.positions,
            },
        )
        passed: dict[str, Any] = {}
        folder = ctx.artifacts(self.name).resolve() / FORWARDS_SUBDIR
        keep = cache_enabled(ctx) and c.reuse_forwards_mb > 0
        with reused_artifacts(ctx, self.name, folder, lambda: core_key(ctx, config, dataset, SHUFFLE_SEED)):
            # one clean / ablated forward for every SAE; each splice from the hook up
            model = SharedForwards(ctx.model, c.reuse_forwards_mb, hook=ctx.store.hook)
            if keep:
                model.load(folder)
            for record in ctx.saes:
                for which in runs:
                    path = record.result_path(ctx.results_dir, RESULT_DIRS[which])
                    if ctx.force_rerun or not path.exists():
                        rule_ = rule if which == "fit" else None
                        run_core(record, model, path, config, dataset, ctx.device, fit_rule=rule_)
                    if which == "fit":
                        passed[record.selected[0]] = _read_positions(path)
            if keep:
                model.save(folder)
        ctx.info["sizes"][self.name]["shared_forwards"] = model.stats.as_dict()
        signed = [r.selected[0] for r in ctx.saes if getattr(r.sae, "signed_codes", False)]
        if signed:
            ctx.info["notes"].append({"metric": self.name, "note": SIGNED_NOTE.format(names=", ".join(signed))})
        if "all" in runs:
            ctx.info["notes"].append({"metric": self.name, "note": f"`core/` covers {ALL_COVERS}."})
        if passed:
            ctx.info["sizes"][self.name]["fit_positions"] = passed
            ctx.info["notes"].append({"metric": FIT_RESULTS, "note": fit_note(passed)})

    @staticmethod
    def dataset(ctx: EvalContext) -> tuple[Any, str]:
        """The eval text (a hub dataset name, or a ``datasets.Dataset`` with a ``tokens`` column of
        ``(context_size,)`` contexts) and how ``eval_info.json`` describes it."""
        c = ctx.eval.core
        if c.dataset:
            return c.dataset, str(c.dataset)
        from datasets import Dataset

        from pipeline.data.text import iter_documents

        n = c.batch_size_prompts * max(c.n_eval_reconstruction_batches, c.n_eval_sparsity_variance_batches)
        skip = harvested_contexts(ctx.store.manifest, c.context_size)
        rows = text_after(
            iter_documents(ctx.text_source),
            ctx.model.tokenizer,
            c.context_size,
            ctx.store.manifest.get("bos_token_id"),
            skip,
            n + SPARE_CONTEXTS,
        )
        label = (
            f"local text ({ctx.text_source.kind}) after the {skip} harvested contexts: {len(rows)} contexts "
            f"of {c.context_size} tokens, never seen by the fit"
        )
        return Dataset.from_dict({"tokens": rows}), label


def run_core(
    record: SAERecord, model: Any, path: Path, config: Any, dataset: Any, device: str, fit_rule: FitRule | None = None
) -> Path:
    """SAEBench's core metrics of one SAE on ``dataset``, written to ``path`` (SAEBench's result JSON).

    With ``fit_rule``, the positions it leaves out are passed through and left out of every mean
    (:mod:`pipeline.evals.metrics.positions`); the rule and the counts of such positions go into the result's
    ``eval_result_unstructured`` (SAEBench's slot for extra outputs; core itself leaves it empty). An SAE with
    signed codes is read through :class:`MagnitudeCodes`."""
    import sae_bench.evals.core.main as core
    from sae_bench.sae_bench_utils import general_utils
    from sae_lens.training.activations_store import ActivationsStore

    name, sae_obj = record.selected
    sae_id, sae, _ = general_utils.load_and_format_sae(name, sae_obj, device)
    sae = sae.to(device=device, dtype=general_utils.str_to_dtype(config.llm_dtype))
    config = dataclasses.replace(config, model_name=sae.cfg.model_name)
    store = ActivationsStore.from_sae(
        model,
        sae,
        dataset=dataset,
        context_size=config.context_size,
        streaming=False,
        dataset_trust_remote_code=False,
        device=device,
    )
    store.shuffle_input_dataset(seed=SHUFFLE_SEED)
    tok = model.tokenizer
    ignore: set[int | None] = {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}
    marked = None
    if fit_rule is not None:
        marked = MarkedTokens(store, model, sae.cfg.hook_name, fit_rule)
        store, model, ignore = marked, TrueTokensModel(model, marked), {LEFT_OUT}
        config = dataclasses.replace(config, exclude_special_tokens_from_reconstruction=True)
    read = MagnitudeCodes(sae) if getattr(sae, "signed_codes", False) else sae
    with zero_ablation_shared():  # the SAE-independent half of each batch's CE/KL once (recons_loss)
        metrics, feature_metrics = core.run_evals(
            sae=read, activation_store=store, model=model, eval_config=config, ignore_tokens=ignore
        )
    metrics["misc_metrics"] = core.calculate_misc_metrics(feature_metrics)
    result = core.replace_nans_with_negative_one(
        {
            "unique_id": f"{name}_{sae_id}",
            "sae_set": name,
            "sae_id": sae_id,
            "eval_cfg": config,
            "metrics": metrics,
            "feature_metrics": feature_metrics,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    out = path if marked is None else path.with_name(f".{path.name}.partial")  # fit: completed below
    core.save_single_eval_result(
        result, core.get_eval_uuid(), core.get_sae_lens_version(), core.get_sae_bench_version(), str(out), sae
    )
    if marked is not None:
        write_json(path, with_positions(json.loads(out.read_text()), fit_rule, marked, config, sae.cfg.hook_name))
        out.unlink()
    return path


def _read_positions(path: Path) -> dict[str, Any]:
    """The rule and pass-through counts a ``core_fit_positions`` result records (:func:`run_core`)."""
    extra = json.loads(path.read_text()).get("eval_result_unstructured") or {}
    return {
        "rule_text": extra.get("rule_text"),
        "covers": extra.get("covers") or "the positions the fit used",
        "passed_through": extra.get("passed_through") or {},
    }


def fit_note(passed: dict[str, dict[str, Any]]) -> str:
    """The ``eval_info.json`` note of the ``core_fit_positions`` results: what they cover and how many positions
    of the core eval text were passed through (``passed``: SAE name -> :func:`_read_positions`)."""
    first = next(iter(passed.values()))
    same = all(p == first for p in passed.values())
    counts = {name: p["passed_through"] for name, p in passed.items()}

    def phases(c: dict[str, dict[str, int]] | None) -> str:
        return "; ".join(
            f"{phase} batches: {t['passed_through']} of {t['positions']} positions passed through "
            f"({t['special']} special, {t['outlier']} outlier)"
            for phase, t in (c or {}).items()
        )

    where = (
        (phases(first["passed_through"]) + " (every SAE)")
        if same
        else "; ".join(f"{name}: {phases(c)}" for name, c in counts.items())
    )
    return f"`{FIT_RESULTS}/` covers {first['covers']}. {where}."
