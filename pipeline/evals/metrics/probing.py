"""SAEBench's probing metrics on labelled text: sparse probing, SCR and TPP.

All three read two-attribute labelled data; with the placeholder ``austen_labelled`` in their ``config:``
block they use the labelled passages the stage builds (:mod:`pipeline.evals.labelled_data`), checked up front
to hold enough paragraphs per class for SAEBench's balanced draws. Their SAE-independent part (the LLM's
activations at the hook and its probes) comes from the shared cache when it holds them
(:mod:`pipeline.evals.metrics.artifact_reuse`), with the random state of each SAE's part pinned
(:mod:`pipeline.evals.metrics.rng_pinning`) so that cached and cold runs score alike. SCR/TPP's latent ablations
encode each batch once per SAE (:mod:`pipeline.evals.metrics.ablation_codes`).
"""

from __future__ import annotations

from typing import Any

from pipeline.evals.labelled_data import check_labelled_sizes, swap_labelled
from pipeline.evals.metrics.ablation_codes import shared_codes_ablations
from pipeline.evals.metrics.artifact_reuse import probing_key, reused_artifacts
from pipeline.evals.metrics.base import EvalContext, MetricRunner, config_as_dict
from pipeline.evals.metrics.rng_pinning import pinned_probing_rng
from pipeline.evals.saebench_patches import use_loaded_model

TPP_SIGNED_CODES = (
    "SAEBench's TPP clamps each latent's mean-activation difference (class minus rest) at 0 before weighting it by "
    "the probe's read of the latent's decoder direction, then ablates the largest effects (not |effect|): a latent "
    "that marks the class with negative codes is never chosen."
)
"""Why TPP cannot read signed codes (:attr:`MetricRunner.signed_codes`)."""


class SparseProbingRunner(MetricRunner):
    name = "sparse_probing"
    needs_labelled = True
    # signed codes: read correctly (signed_codes = None). SAEBench mean-pools each latent over a passage's tokens,
    # ranks latents by |mean(class) - mean(rest)| and fits a logistic probe: nothing assumes a sign (a signed
    # latent's positive and negative firings pool into one mean, where the split pools them into two latents)

    def config_class(self) -> type:
        from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig

        return SparseProbingEvalConfig

    def config(self, ctx: EvalContext) -> Any:
        config = self.saebench_config(ctx, swap_labelled(self.node(ctx).config, ctx.labelled.name))
        if ctx.labelled.name in config.dataset_names:
            check_labelled_sizes(
                ctx.labelled,
                config.probe_train_set_size,
                config.probe_test_set_size,
                ctx.labelled.classes,
                f"eval.{self.name}",
            )
        return config

    def run(self, ctx: EvalContext, config: Any) -> None:
        import sae_bench.evals.sparse_probing.main as sp
        import sae_bench.sae_bench_utils.activation_collection as acts

        ctx.record_sizes(self.name, config_as_dict(config))
        folder = ctx.artifacts(self.name)
        with (
            use_loaded_model(ctx.model),
            reused_artifacts(ctx, self.name, folder, lambda: probing_key(ctx, self.name, config)),
            pinned_probing_rng(sp, acts, "get_sae_meaned_activations", scr_tpp=False),
        ):
            sp.run_eval(
                config,
                ctx.selected,
                ctx.device,
                str(ctx.results_dir / self.name),
                force_rerun=ctx.force_rerun,
                save_activations=True,
                artifacts_path=str(folder),
            )


class ScrTppRunner(MetricRunner):
    """SCR (``perform_scr=True``) or TPP: one SAEBench eval, two metrics.

    Signed codes: SCR reads them correctly. It ranks latents by ``|(mean(class) - mean(rest)) x (probe · d_j)|``,
    latent j's linear effect on the probe, and zero-ablates the top ones: both hold for a code of either sign.
    TPP cannot (:data:`TPP_SIGNED_CODES`)."""

    needs_labelled = True

    def __init__(self, name: str):
        self.name = name
        self.signed_codes = TPP_SIGNED_CODES if name == "tpp" else None

    def config_class(self) -> type:
        from sae_bench.evals.scr_and_tpp.eval_config import ScrAndTppEvalConfig

        return ScrAndTppEvalConfig

    def config(self, ctx: EvalContext) -> Any:
        labelled = ctx.labelled
        config = self.saebench_config(
            ctx, swap_labelled(self.node(ctx).config, labelled.name), perform_scr=self.name == "scr"
        )
        if labelled.name in config.dataset_names:
            if self.name == "scr":
                pairs = [c for pair in config.column1_vals_lookup.get(labelled.name, []) for c in pair]
                check_labelled_sizes(
                    labelled, config.train_set_size, config.test_set_size, pairs, f"eval.{self.name}", scr=True
                )
            else:
                check_labelled_sizes(
                    labelled, config.train_set_size, config.test_set_size, labelled.classes, f"eval.{self.name}"
                )
        return config

    def run(self, ctx: EvalContext, config: Any) -> None:
        import sae_bench.evals.scr_and_tpp.main as st

        ctx.record_sizes(self.name, config_as_dict(config))
        folder = ctx.artifacts(self.name)
        with (
            use_loaded_model(ctx.model),
            reused_artifacts(ctx, self.name, folder, lambda: probing_key(ctx, self.name, config)),
            pinned_probing_rng(st, st, "get_all_node_effects_for_one_sae", scr_tpp=True),
            shared_codes_ablations(),  # each batch's codes and error once per SAE, not once per ablation
        ):
            # SAEBench's SCR/TPP run_eval appends the eval type (scr / tpp) to output_path itself
            st.run_eval(
                config,
                ctx.selected,
                ctx.device,
                str(ctx.results_dir),
                force_rerun=ctx.force_rerun,
                save_activations=True,
                artifacts_path=str(folder),
            )
