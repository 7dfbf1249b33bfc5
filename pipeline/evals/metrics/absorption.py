"""SAEBench's feature absorption, on a subsampled vocabulary, writing only inside the run folder.

What is adapted (module attributes SAEBench looks up at call time, undone afterwards): the vocabulary is
subsampled (every first letter kept in the train split, as SAEBench needs); its probe / experiment folders and
its cwd-relative writes go into ``artifacts/absorption``; Python's global ``random`` (SAEBench's unseeded
train/test split of the vocabulary) is seeded, so the split is the same in every process; torch is seeded
before the probe and each SAE's k-sparse probes are trained, and ``random`` and torch before each SAE's two
experiments (:mod:`pipeline.evals.metrics.rng_pinning`), so its result does not depend on its place in the run.
The probe folder comes from the shared cache when it holds it (:mod:`pipeline.evals.metrics.artifact_reuse`), with
the activations at the hook of absorption's prompts, which the LLM computes once for every SAE
(:mod:`pipeline.evals.metrics.prompt_activations`, kept in :data:`PROMPT_ACTS_SUBDIR` of the probe folder).
SAEBench's per-SAE scoring (``build_metrics_df``) reads its four sklearn scores from exact stand-ins
(:mod:`pipeline.evals.metrics.binary_scores`: the same values, without sklearn's validation on each of ~2,200 calls).
"""

from __future__ import annotations

import contextlib
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.evals.metrics.artifact_reuse import absorption_key, cache_enabled, reused_artifacts
from pipeline.evals.metrics.base import EvalContext, MetricRunner, config_as_dict
from pipeline.evals.metrics.binary_scores import BinaryScores
from pipeline.evals.metrics.prompt_activations import PromptActivations
from pipeline.evals.metrics.rng_pinning import pinned_absorption_rng
from pipeline.evals.results import saebench_sae_id
from pipeline.evals.saebench_patches import patched_attr, pushd, use_loaded_model

if TYPE_CHECKING:
    from pipeline.evals.sae_records import SAERecord

PROBES_SUBDIR = "probes"
"""SAEBench's probe folder inside ``artifacts/absorption`` (the metric's SAE-independent part: the first-letter
probe, the prompts and the LLM's activations on them), served from the shared cache."""
PROMPT_ACTS_SUBDIR = "prompt_activations"
"""Inside the probe folder: the activations at the hook of the prompts the LLM ran
(:meth:`~pipeline.evals.metrics.prompt_activations.PromptActivations.save`)."""

LOW_CONFIDENCE = (
    "absorption on a model below {limit:.0e} parameters ({n:.3g}) is low-confidence: SAEBench "
    "recommends >= 2B-parameter models (first-letter spelling knowledge), and the vocabulary was "
    "subsampled to {v} words with the gate lowered"
)
"""The note ``eval_info.json`` (and the report) gets for a small model."""


class AbsorptionRunner(MetricRunner):
    name = "absorption"
    signed_codes = (
        "SAEBench's absorption reads a latent as carrying a letter only through positive activations: its k-sparse "
        "probes keep the latents of largest positive weight (topk, not |weight|), an absorbing latent needs a "
        "positive projection on the probe and a decoder cosine >= 0.1 with it, and a main latent counts as not "
        "firing wherever its code is below 1e-8, negative codes included; a latent that carries the letter "
        "through negative codes is invisible to it."
    )

    def config_class(self) -> type:
        from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

        return AbsorptionEvalConfig

    def run(self, ctx: EvalContext, config: Any) -> None:
        node = ctx.eval.absorption
        out = (ctx.results_dir / self.name).resolve()
        out.mkdir(parents=True, exist_ok=True)
        import sae_bench.evals.absorption.common as ab_common
        import sae_bench.evals.absorption.k_sparse_probing as ab_ksp
        import sae_bench.evals.absorption.main as ab_main

        folder = ctx.artifacts(self.name)
        probes = folder.resolve() / PROBES_SUBDIR
        acts = PromptActivations(ctx.model, node.reuse_activations_mb)  # the LLM on each prompt list once
        keep = cache_enabled(ctx) and node.reuse_activations_mb > 0
        scores = BinaryScores(ab_ksp.metrics)
        drop_stale_tables(folder.resolve(), ctx.saes, ctx.results_dir, self.name, ctx.force_rerun)
        with (
            reused_artifacts(ctx, self.name, probes, lambda: absorption_key(ctx, config)),
            absorption_setup(folder, node.vocab_size, node.min_words_per_letter, node.seed) as vocab,
            pinned_absorption_rng(ab_common, ab_ksp, ab_main, node.seed),
            use_loaded_model(acts),
            patched_attr(ab_ksp, "metrics", scores),
        ):
            if keep:  # kept beside the probe, in the same cache entry
                acts.load(probes / PROMPT_ACTS_SUBDIR)
            ab_main.run_eval(config, ctx.selected, ctx.device, str(out), force_rerun=ctx.force_rerun)
            if keep:
                acts.save(probes / PROMPT_ACTS_SUBDIR)
        sizes = {**config_as_dict(config), **vocab, "vocab_size": node.vocab_size}
        scored = {"scores_without_sklearn": scores.fast_calls}
        ctx.record_sizes(self.name, {**sizes, "prompt_activations": acts.stats.as_dict(), **scored})
        if ctx.n_params < node.low_confidence_below_params:
            note = LOW_CONFIDENCE.format(
                limit=node.low_confidence_below_params, n=ctx.n_params, v=vocab.get("subsampled_vocab", node.vocab_size)
            )
            ctx.info["notes"].append({"metric": self.name, "low_confidence": True, "note": note})

    def no_result_reason(self, ctx: EvalContext, config: Any) -> str:
        return (
            f"SAEBench's absorption gate: fewer than min_feats_for_eval={config.min_feats_for_eval} letters "
            f"reached ground-truth probe F1 > min_GT_probe_f1={config.min_GT_probe_f1} (no result written)"
        )


#: SAEBench's folders of per-SAE tables inside the metric's artifacts folder (``<folder>/<release>_<sae_id>/``).
PER_SAE_TABLES = ("k_sparse_probing", "feature_absorption")


def drop_stale_tables(
    folder: Path, records: list[SAERecord], results_dir: Path, metric: str, force_rerun: bool
) -> list[Path]:
    """Delete the per-SAE tables (:data:`PER_SAE_TABLES`) of every SAE whose result SAEBench is about to compute
    (it has none yet in ``results_dir``, or ``force_rerun``); returns the folders deleted.

    SAEBench keeps each SAE's k-sparse-probing and absorption tables under the SAE's name and, without its
    ``force_rerun``, reads them back instead of recomputing them. An SAE with no result may still have tables from
    earlier weights under its name (a re-fitted dictionary whose stale result was dropped, a retrained baseline in a
    sweep's shared folder, a run killed between the tables and the result), which would then score the old weights.
    """
    dropped = []
    for record in records:
        if record.result_path(results_dir, metric).is_file() and not force_rerun:
            continue  # SAEBench skips this SAE
        release, sae = record.selected
        name = f"{release}_{saebench_sae_id(sae)}"  # SAEBench's sae_name
        for sub in PER_SAE_TABLES:
            path = folder / sub / name
            if path.is_dir():
                shutil.rmtree(path)
                dropped.append(path)
    return dropped


def subsample_alpha_vocab(vocab: list[str], size: int | None, min_per_letter: int, seed: int = 0) -> list[str]:
    """A reproducible subsample of SAEBench's alphabetic vocabulary that keeps at least ``min_per_letter`` words
    of every first letter present (SAEBench crashes when a letter is missing from its train split). The sample
    is drawn from the sorted words, so it does not depend on the order SAEBench listed them in (which follows
    string hashing and changes between processes). ``size=None`` keeps every word."""
    if size is None or size >= len(vocab):
        return list(vocab)
    vocab = sorted(vocab)
    rng = random.Random(seed)
    by_letter: dict[str, list[str]] = {}
    for w in vocab:
        by_letter.setdefault(w.strip()[0].lower(), []).append(w)
    chosen: list[str] = []
    for letter in sorted(by_letter):
        words = by_letter[letter]
        chosen.extend(rng.sample(words, min(len(words), min_per_letter)))
    rest = [w for w in vocab if w not in set(chosen)]
    extra = max(0, size - len(chosen))
    chosen.extend(rng.sample(rest, min(extra, len(rest))))
    chosen_set = set(chosen)
    return [w for w in vocab if w in chosen_set]


@contextlib.contextmanager
def absorption_setup(run_dir: Path, vocab_size: int | None, min_per_letter: int, seed: int) -> Iterator[dict]:
    """Subsample the vocabulary and send every absorption write (probes, experiment parquet files, its
    cwd-relative ``artifacts/absorption``) into ``run_dir``. Yields a dict that receives ``full_vocab``,
    ``subsampled_vocab`` and ``letters`` once SAEBench has asked for the vocabulary."""
    import sae_bench.evals.absorption.common as ab_common
    import sae_bench.evals.absorption.feature_absorption as ab_fa
    import sae_bench.evals.absorption.main as ab_main
    import sae_bench.evals.absorption.vocab as ab_vocab

    run_dir = Path(run_dir).resolve()
    info: dict[str, Any] = {}
    original = ab_vocab.get_alpha_tokens

    def get_alpha_tokens(tokenizer: Any, *a: Any, **k: Any) -> list[str]:
        full = original(tokenizer, *a, **k)
        # sorted: with `random` seeded below, SAEBench's train/test split is then the same in every process
        sub = sorted(subsample_alpha_vocab(full, vocab_size, min_per_letter, seed))
        info.update(full_vocab=len(full), subsampled_vocab=len(sub), letters=len({w.strip()[0].lower() for w in sub}))
        return sub

    k_sparse, fa = ab_main.run_k_sparse_probing_experiment, ab_main.run_feature_absortion_experiment
    dirs = {"experiment_dir": run_dir / "k_sparse_probing", "probes_dir": run_dir / PROBES_SUBDIR}

    def k_sparse_here(*a: Any, **k: Any) -> Any:
        return k_sparse(*a, **{**k, **dirs})

    def fa_here(*a: Any, **k: Any) -> Any:
        return fa(
            *a,
            **{
                **k,
                "experiment_dir": run_dir / "feature_absorption",
                "sparse_probing_experiment_dir": dirs["experiment_dir"],
                "probes_dir": dirs["probes_dir"],
            },
        )

    random_state = random.getstate()
    random.seed(seed)
    try:
        with (
            patched_attr(ab_common, "get_alpha_tokens", get_alpha_tokens),
            patched_attr(ab_fa, "get_alpha_tokens", get_alpha_tokens),
            patched_attr(ab_main, "run_k_sparse_probing_experiment", k_sparse_here),
            patched_attr(ab_main, "run_feature_absortion_experiment", fa_here),
            pushd(run_dir),
        ):
            yield info
    finally:
        random.setstate(random_state)
