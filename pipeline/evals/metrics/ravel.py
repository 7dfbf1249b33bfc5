"""SAEBench's RAVEL (attribute disentanglement): only for the models its prompts and entity lists are built
for, and only with the hub (its data files and the HF model)."""

from __future__ import annotations

from typing import Any

from pipeline.evals.metrics.base import EvalContext, MetricRunner, config_as_dict


class RavelRunner(MetricRunner):
    name = "ravel"

    def config_class(self) -> type:
        from sae_bench.evals.ravel.eval_config import RAVELEvalConfig

        return RAVELEvalConfig

    def requirements(self, ctx: EvalContext) -> str | None:
        import sae_bench.evals.ravel.main as ravel_main

        if ctx.model_name not in ravel_main.LLM_NAME_MAP:
            return (f"RAVEL supports only {sorted(ravel_main.LLM_NAME_MAP)} (its prompts and entity lists are "
                    f"built for them); the model is {ctx.model_name!r}")
        if not ctx.hub_reachable:
            return "RAVEL needs the Hugging Face hub (its prompt/entity files and the HF model); the hub is unreachable"
        return None

    def config(self, ctx: EvalContext) -> Any:
        return self.saebench_config(ctx, artifact_dir=str(ctx.artifacts(self.name)))

    def run(self, ctx: EvalContext, config: Any) -> None:
        import sae_bench.evals.ravel.main as ravel

        ctx.record_sizes(self.name, config_as_dict(config))
        # RAVEL loads its own HF model (no loaded-model patch)
        ravel.run_eval(config, ctx.selected, ctx.device, str(ctx.results_dir / self.name),
                       force_rerun=ctx.force_rerun, artifacts_path=str(ctx.artifacts(self.name)))
