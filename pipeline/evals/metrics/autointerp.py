"""SAEBench's automated interpretability: a judge LLM explains latents from their top activations, then scores
the explanations. The judge is any OpenAI-compatible endpoint (``eval.autointerp.base_url`` / ``model``;
:mod:`pipeline.evals.judge`); skipped (reason recorded) with neither an API key nor a ``base_url``, or with a
``base_url`` whose named key variable (``api_key_env``) is unset. A key goes only where
:func:`pipeline.evals.judge.judge_api_key` sends it; ``eval_info.json`` records the endpoint with its user-info,
query string and secret-named request fields redacted. Offline, its hub text is replaced by the harvest text."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from pipeline.evals.judge import SAEBENCH_JUDGE, JudgeSettings, judge_api_key, key_variable, use_judge
from pipeline.evals.metrics.base import EvalContext, MetricRunner, config_as_dict
from pipeline.evals.metrics.text import text_after
from pipeline.evals.saebench_patches import patched_attr, use_loaded_model
from pipeline.utils.redact import redact_secrets, redact_url

#: SAEBench's judge log, inside the metric's result folder.
LOG_FILE = "logs.txt"
LOW_CONFIDENCE = (
    "autointerp judged by {model!r}{where}, not SAEBench's {default}: the scores are not comparable "
    "with SAEBench's published ones{small}"
)


class AutointerpRunner(MetricRunner):
    name = "autointerp"
    signed_codes = (
        "SAEBench's autointerp counts a latent alive by how often it is > 0 (latents never > 0 are dead and not "
        "explained) and builds its examples from the largest activations, thresholded at a fraction of the "
        "maximum: the negative firings of a signed latent are never shown to the judge or scored."
    )

    def config_class(self) -> type:
        from sae_bench.evals.autointerp.eval_config import AutoInterpEvalConfig

        return AutoInterpEvalConfig

    def requirements(self, ctx: EvalContext) -> str | None:
        node = ctx.eval.autointerp
        env = key_variable(node.base_url, node.api_key_env)
        if node.base_url is None and not os.environ.get(env):
            return (
                f"no judge: autointerp asks an LLM to explain and score latents; set ${env} (OpenAI, "
                "with network access to its API) or eval.autointerp.base_url to any OpenAI-compatible server "
                "(vLLM, llama.cpp's llama-server, transformers serve) with eval.autointerp.model"
            )
        if node.base_url is not None and env is not None and not os.environ.get(env):
            return (
                f"no key for the judge at {redact_url(node.base_url)}: eval.autointerp.api_key_env names ${env}, "
                "which is unset; set it, or eval.autointerp.api_key_env=null for a server that needs no key"
            )
        return None

    def run(self, ctx: EvalContext, config: Any) -> None:
        import sae_bench.evals.autointerp.main as ai
        import sae_bench.sae_bench_utils.dataset_utils as dataset_utils

        from pipeline.data.text import iter_documents

        node = ctx.eval.autointerp
        key = judge_api_key(node.base_url, node.api_key_env)  # refuses a key over plain HTTP to another machine
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
        sizes["judge"] = {  # as written to eval_info.json (and the report): secrets redacted
            "model": node.model,
            "base_url": redact_url(node.base_url) if node.base_url else "OpenAI",
            "stream": node.stream,
            "extra_body": redact_secrets(dict(node.extra_body)),
            "scoring_extra_body": redact_secrets(dict(node.scoring_extra_body)),
        }
        ctx.record_sizes(self.name, sizes)
        out = ctx.results_dir / self.name
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
            where = f" at {redact_url(node.base_url)}" if node.base_url else ""
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
