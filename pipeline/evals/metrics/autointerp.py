"""SAEBench's automated interpretability: a judge LLM explains latents from their top activations, then scores
the explanations. The judge is any OpenAI-compatible endpoint (``eval.autointerp.base_url`` / ``model``;
:mod:`pipeline.evals.judge`); skipped (reason recorded) with neither an API key nor a ``base_url``. Offline, its
hub text is replaced by the harvest text."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from pipeline.evals.judge import NO_KEY, SAEBENCH_JUDGE, JudgeSettings, use_judge
from pipeline.evals.metrics.base import EvalContext, MetricRunner, config_as_dict
from pipeline.evals.metrics.text import text_after
from pipeline.evals.saebench_patches import patched_attr, use_loaded_model

#: SAEBench's judge log, inside the metric's result folder.
LOG_FILE = "logs.txt"
LOW_CONFIDENCE = (
    "autointerp judged by {model!r}{where}, not SAEBench's {default}: the scores are not comparable "
    "with SAEBench's published ones{small}"
)


class AutointerpRunner(MetricRunner):
    name = "autointerp"

    def config_class(self) -> type:
        from sae_bench.evals.autointerp.eval_config import AutoInterpEvalConfig

        return AutoInterpEvalConfig

    def requirements(self, ctx: EvalContext) -> str | None:
        node = ctx.eval.autointerp
        if not os.environ.get(node.api_key_env) and node.base_url is None:
            return (
                f"no judge: autointerp asks an LLM to explain and score latents; set ${node.api_key_env} (OpenAI, "
                "with network access to its API) or eval.autointerp.base_url to any OpenAI-compatible server "
                "(vLLM, llama.cpp's llama-server, transformers serve) with eval.autointerp.model"
            )
        return None

    def run(self, ctx: EvalContext, config: Any) -> None:
        import sae_bench.evals.autointerp.main as ai
        import sae_bench.sae_bench_utils.dataset_utils as dataset_utils

        from pipeline.data.text import iter_documents

        node = ctx.eval.autointerp
        sizes = config_as_dict(config)
        local_text = contextlib.nullcontext()
        if not ctx.hub_reachable:
            rows = text_after(
                iter_documents(ctx.text_source),
                ctx.model.tokenizer,
                config.llm_context_size,
                ctx.store.manifest.get("bos_token_id"),
                0,
                config.total_tokens // config.llm_context_size + 1,
            )
            tokens = torch.tensor(rows, dtype=torch.long)  # (N, llm_context_size)
            local_text = patched_attr(dataset_utils, "load_and_tokenize_dataset", lambda *_a, **_k: tokens)
            sizes["dataset"] = f"local text ({ctx.text_source.kind}), hub unreachable"
        sizes["judge"] = {
            "model": node.model,
            "base_url": node.base_url or "OpenAI",
            "stream": node.stream,
            "extra_body": dict(node.extra_body),
            "scoring_extra_body": dict(node.scoring_extra_body),
        }
        ctx.record_sizes(self.name, sizes)
        out = ctx.results_dir / self.name
        key = os.environ.get(node.api_key_env) or NO_KEY
        with (
            local_text,
            use_loaded_model(ctx.model),
            use_judge(
                JudgeSettings(
                    node.base_url,
                    node.model,
                    node.stream,
                    node.timeout_s,
                    dict(node.extra_body),
                    dict(node.scoring_extra_body),
                )
            ) as calls,
        ):
            try:
                ai.run_eval(
                    config,
                    ctx.selected,
                    ctx.device,
                    key,
                    str(out),
                    force_rerun=ctx.force_rerun,
                    save_logs_path=str(out / LOG_FILE),
                    artifacts_path=str(ctx.artifacts(self.name)),
                )
            except ValueError as exc:
                if "empty" not in str(exc):
                    raise
                # SAEBench takes min() over the scored latents: none scored = no answer in its format
                raise RuntimeError(
                    f"the judge {node.model!r} answered none of the scoring prompts in the format SAEBench parses "
                    "(comma-separated example numbers, or 'None'); use a stronger judge or more latents "
                    f"(eval.autointerp.config.n_latents); its answers are in {out / LOG_FILE}"
                ) from exc
            finally:
                sizes["judge"].update(requests=calls.requests, failed_requests=calls.failures)
        self.add_note(ctx)

    def add_note(self, ctx: EvalContext) -> None:
        """The low-confidence note: any judge but SAEBench's (unless ``low_confidence`` says otherwise)."""
        node = ctx.eval.autointerp
        flagged = node.model != SAEBENCH_JUDGE if node.low_confidence is None else node.low_confidence
        if flagged:
            where = f" at {node.base_url}" if node.base_url else ""
            small = (
                "; a small judge explains and predicts poorly, so low scores say as much about the judge as "
                "about the SAE"
                if node.model != SAEBENCH_JUDGE
                else ""
            )
            ctx.info["notes"].append(
                {
                    "metric": self.name,
                    "low_confidence": True,
                    "note": LOW_CONFIDENCE.format(model=node.model, where=where, default=SAEBENCH_JUDGE, small=small),
                }
            )
