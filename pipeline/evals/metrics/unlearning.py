"""SAEBench's unlearning (WMDP-bio knowledge removal by clamping latents): needs an instruction-tuned model and
the gated WMDP corpus from the hub."""

from __future__ import annotations

from typing import Any

from pipeline.evals.metrics.base import EvalContext, MetricRunner, config_as_dict
from pipeline.evals.saebench_patches import use_loaded_model


class UnlearningRunner(MetricRunner):
    name = "unlearning"
    signed_codes = (
        "SAEBench's unlearning picks latents by how often they are > 0 on the forget and retain text and clamps a "
        "latent to -multiplier only where it is > 0: negative firings are neither counted nor clamped."
    )

    def config_class(self) -> type:
        from sae_bench.evals.unlearning.eval_config import UnlearningEvalConfig

        return UnlearningEvalConfig

    def requirements(self, ctx: EvalContext) -> str | None:
        if "it" not in ctx.model_name.split("-"):
            return (
                f"unlearning needs an instruction-tuned model (SAEBench: 'it' in the model name, e.g. "
                f"gemma-2-2b-it); the model is {ctx.model_name!r}"
            )
        if not ctx.hub_reachable:
            return "unlearning needs the gated WMDP bio corpus, cais/wmdp and cais/mmlu from the hub; unreachable"
        return None

    def run(self, ctx: EvalContext, config: Any) -> None:
        import sae_bench.evals.unlearning.main as un

        ctx.record_sizes(self.name, config_as_dict(config))
        with use_loaded_model(ctx.model):
            un.run_eval(
                config,
                ctx.selected,
                ctx.device,
                str(ctx.results_dir / self.name),
                force_rerun=ctx.force_rerun,
                artifacts_path=str(ctx.artifacts(self.name)),
            )
