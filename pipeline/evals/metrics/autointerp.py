"""SAEBench's automated interpretability: an OpenAI model explains latents from their top activations, then
scores the explanations. Skipped (reason recorded) without an API key; offline, its hub text is replaced by
the harvest text."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from pipeline.evals.metrics.base import EvalContext, MetricRunner, config_as_dict
from pipeline.evals.metrics.text import text_after
from pipeline.evals.saebench_patches import patched_attr, use_loaded_model

#: SAEBench's judge log, inside the metric's result folder.
LOG_FILE = "logs.txt"


class AutointerpRunner(MetricRunner):
    name = "autointerp"

    def config_class(self) -> type:
        from sae_bench.evals.autointerp.eval_config import AutoInterpEvalConfig

        return AutoInterpEvalConfig

    def requirements(self, ctx: EvalContext) -> str | None:
        env = ctx.eval.autointerp.api_key_env
        if not os.environ.get(env):
            return (f"no judge API key: autointerp asks an OpenAI model to explain and score latents; set ${env} "
                    "(and network access to the API) to run it")
        return None

    def run(self, ctx: EvalContext, config: Any) -> None:
        import sae_bench.evals.autointerp.main as ai
        import sae_bench.sae_bench_utils.dataset_utils as dataset_utils

        from pipeline.data.text import iter_documents

        sizes = config_as_dict(config)
        local_text = contextlib.nullcontext()
        if not ctx.hub_reachable:
            rows = text_after(iter_documents(ctx.text_source), ctx.model.tokenizer, config.llm_context_size,
                              ctx.store.manifest.get("bos_token_id"), 0,
                              config.total_tokens // config.llm_context_size + 1)
            tokens = torch.tensor(rows, dtype=torch.long)  # (N, llm_context_size)
            local_text = patched_attr(dataset_utils, "load_and_tokenize_dataset", lambda *_a, **_k: tokens)
            sizes["dataset"] = f"local text ({ctx.text_source.kind}), hub unreachable"
        ctx.record_sizes(self.name, sizes)
        out = ctx.results_dir / self.name
        with local_text, use_loaded_model(ctx.model):
            ai.run_eval(config, ctx.selected, ctx.device, os.environ[ctx.eval.autointerp.api_key_env], str(out),
                        force_rerun=ctx.force_rerun, save_logs_path=str(out / LOG_FILE),
                        artifacts_path=str(ctx.artifacts(self.name)))

