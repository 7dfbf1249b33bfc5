"""SAEBench's RAVEL (attribute disentanglement), from the hub or from local files.

RAVEL asks an HF model attribute questions about entities ("Paris is a city in the country of"), keeps the
prompts it answers right, then trains, per attribute, a binary mask over the SAE's latents (an MDBM) that
swaps the attribute between two prompts without touching the others. What is adapted (module attributes
SAEBench looks up at call time, undone afterwards):

* data: ``eval.ravel.data_dir`` is checked and copied into the run's artifacts
  (:mod:`pipeline.evals.ravel_data`), so SAEBench finds every file and downloads nothing;
* model: the HF model of :mod:`pipeline.evals.ravel_model`; ``LLM_NAME_MAP`` gets the stage's model name,
  ``from_pretrained`` loads the local folder, and the model's weights are frozen (only the mask trains);
* blocks: SAEBench's ``get_module`` finds the blocks of any decoder-only HF model and gives its hooks tuples
  (:func:`pipeline.evals.saebench_patches.any_decoder_layers`); it hooks block ``hook_layer``'s output, the
  residual stream ``blocks.<hook_layer>.hook_resid_post``, so SAEs on other hooks are not run;
* sizes: before SAEBench pairs the prompts of an attribute, a check that the pairs fill at least one train and
  one validation batch (else, not SAEBench's crash on an empty dataloader, a skip whose reason names the
  counts and the keys: a model that answers too few prompts right, e.g. a small or random-weight one, cannot
  be scored, :class:`UnpairablePrompts`);
  ``full_dataset_downsample`` above an entity type's prompt count keeps them all (SAEBench would crash);
* global state SAEBench changes (gradients switched on, ``random`` / torch seeded) is restored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.evals.metrics.artifact_reuse import ravel_key, reused_artifacts
from pipeline.evals.metrics.base import EvalContext, MetricRunner, config_as_dict
from pipeline.evals.metrics.rng_pinning import pinned_ravel_rng
from pipeline.evals.ravel_data import (
    HUB_DATASET,
    check_ravel_data,
    clear_cached_instances,
    filtered_prompt_counts,
    stage_ravel_data,
    staged_dir,
)
from pipeline.evals.ravel_model import RavelModel, resolve_ravel_model, saebench_llm_names
from pipeline.evals.sae_records import SAERecord
from pipeline.evals.saebench_patches import any_decoder_layers, local_hf_model, patched_attr, patched_dict_item

log = logging.getLogger(__name__)

RESID_POST = "blocks.{layer}.hook_resid_post"
"""The only hook RAVEL's SAEs can be on: the output of HF block ``hook_layer``."""
SAEBENCH_SIZES = {"num_pairs_per_attribute": 5000, "top_n_entities": 500, "num_epochs": 2}
"""SAEBench's default sizes, quoted in the low-confidence note."""
LOW_CONFIDENCE_MODEL = (
    "the model has {n:.3g} parameters, below {limit:.0e}: SAEBench's RAVEL targets >= 2B "
    "models; a small model answers few prompts right, so few entities and pairs survive the "
    "filter (answered right and kept: {answered})"
)
LOW_CONFIDENCE_DATA = (
    "its prompts come from eval.ravel.data_dir={data_dir}, not SAEBench's "
    + HUB_DATASET
    + ": unless that is an unmodified copy, the scores are not comparable with SAEBench's "
    "published RAVEL numbers"
)
SCORE_KEYS = ("disentanglement_score", "cause_score", "isolation_score")
"""SAEBench's RAVEL scores (``eval_result_metrics.ravel``)."""
NOT_SCORED = "not_scored"
"""The key of ``eval_info.json``'s RAVEL sizes holding why no SAE was scored (:class:`UnpairablePrompts`)."""


def hook_mismatch(record: SAERecord) -> str | None:
    """``"<name>: <hook>"`` for an SAE whose hook is not the residual stream after its ``hook_layer`` (RAVEL
    hooks that), None when it is or when it cannot be told (a hub SAE, an object without ``cfg``)."""
    cfg = getattr(record.sae, "cfg", None)
    if record.hub is not None or cfg is None or getattr(cfg, "hook_name", None) is None:
        return None
    expected = RESID_POST.format(layer=getattr(cfg, "hook_layer", None))
    return None if cfg.hook_name == expected else f"{record.name}: {cfg.hook_name} (RAVEL hooks {expected})"


def check_batch_sizes(num_pairs: int, split: float, batch: int) -> None:
    """``ValueError`` when ``num_pairs_per_attribute`` cannot fill one train and one validation batch even if the
    model answered every prompt right (SAEBench makes at most ``2 * num_pairs`` pairs per attribute)."""
    if not 0 < split < 1:
        raise ValueError(f"eval.ravel.config.train_test_split={split} must be between 0 and 1")
    total = 2 * num_pairs
    train = int(total * split)
    if min(train, total - train) < batch:
        raise ValueError(
            f"eval.ravel.config.num_pairs_per_attribute={num_pairs} gives at most {total} pairs per "
            f"attribute: {train} train / {total - train} validation with train_test_split={split}, "
            f"fewer than eval.llm_batch_size={batch} in a split, so SAEBench's dataloader would be "
            "empty; raise num_pairs_per_attribute or lower eval.llm_batch_size"
        )


class UnpairablePrompts(ValueError):
    """The prompts the model answered right cannot fill SAEBench's RAVEL batches (:func:`check_pairs`): the
    model does not meet RAVEL's requirement, so the metric is skipped with this reason (not a failure)."""


def check_pairs(labels: dict[str, list[str]], entity: str, cause: str, iso: list[str], config: Any) -> None:
    """What SAEBench 0.6.0 will pair for ``cause`` (``run_eval_single_cause_attribute``), from ``labels``
    (attribute -> label of each prompt the model answered right); :class:`UnpairablePrompts` naming the fix where
    it would crash (one label only, no isolation prompt) or build an empty train or validation dataloader."""
    n, batch = config.num_pairs_per_attribute, config.llm_batch_size
    counts = {a: len(labels.get(a, [])) for a in [cause, *iso]}
    fix = (
        f"add entities / templates the model knows to the data, raise eval.ravel.config.top_n_entities="
        f"{config.top_n_entities} or num_pairs_per_attribute={n}, or lower eval.llm_batch_size={batch}"
    )
    where = f"RAVEL {entity}/{cause}: the model answered {counts} prompts right"
    for attr in [cause, *iso]:
        if counts[attr] and len(set(labels[attr])) < 2:
            raise UnpairablePrompts(
                f"{where}, all of {attr} with one label {sorted(set(labels[attr]))}; SAEBench "
                f"needs two labels to pair them; {fix}"
            )
    n_cause = min(n, counts[cause])
    n_iso = min(n_cause, sum(min(n, counts[a]) for a in iso))
    total = n_cause + n_iso
    train = int(total * config.train_test_split)
    if n_iso == 0 or min(train, total - train) < batch:
        raise UnpairablePrompts(
            f"{where}: {n_cause} cause + {n_iso} isolation pairs, {train} train / {total - train} "
            f"validation, and a split with fewer pairs than eval.llm_batch_size={batch} (or no "
            f"isolation pair) leaves SAEBench without a batch; {fix}"
        )


@contextlib.contextmanager
def guarded_sizes() -> Iterator[None]:
    """Run :func:`check_pairs` before each of SAEBench's ``run_eval_single_cause_attribute`` calls, and let
    ``full_dataset_downsample`` keep every prompt of an entity type that has fewer (SAEBench's
    ``random.sample`` raises there: a small local data set would crash with a preset's downsample)."""
    import sae_bench.evals.ravel.main as ravel_main
    from sae_bench.evals.ravel.instance import RAVELInstance

    original, downsample = ravel_main.run_eval_single_cause_attribute, RAVELInstance.downsample_

    def checked(dataset: Any, cause_attribute: str, iso_attributes: list[str], config: Any, *a: Any, **k: Any) -> Any:
        labels: dict[str, list[str]] = {}
        for p in dataset.prompts:
            labels.setdefault(p.attribute_type, []).append(p.attribute_label)
        check_pairs(labels, dataset.config.get("entity_type", "?"), cause_attribute, list(iso_attributes), config)
        return original(dataset, cause_attribute, iso_attributes, config, *a, **k)

    def capped(self: Any, n: int) -> None:
        if n < len(self.prompts):
            downsample(self, n)
        else:
            log.info(
                "RAVEL: full_dataset_downsample=%d >= the %d prompts of %s: all kept",
                n,
                len(self.prompts),
                self.config.get("entity_type"),
            )

    with (
        patched_attr(ravel_main, "run_eval_single_cause_attribute", checked),
        patched_attr(RAVELInstance, "downsample_", capped),
    ):
        yield


@contextlib.contextmanager
def restored_global_state() -> Iterator[None]:
    """Undo what SAEBench's RAVEL leaves behind: gradients switched on, ``random`` and torch reseeded."""
    grad, py_state, torch_state = torch.is_grad_enabled(), random.getstate(), torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_grad_enabled(grad)
        random.setstate(py_state)
        torch.set_rng_state(torch_state)


@contextlib.contextmanager
def ravel_model_setup(stage_name: str, model: RavelModel) -> Iterator[None]:
    """SAEBench's RAVEL loads ``model`` for the stage's model name, hooks its blocks, checks its pair sizes."""
    import sae_bench.evals.ravel.main as ravel_main

    local = {model.saebench_name: str(model.local_dir)} if model.local_dir is not None else {}
    with (
        patched_dict_item(ravel_main.LLM_NAME_MAP, stage_name, model.saebench_name),
        local_hf_model(ravel_main, local, freeze=True),
        any_decoder_layers(),
        guarded_sizes(),
        restored_global_state(),
    ):
        yield


def nonfinite_scores(path: Path) -> list[str]:
    """The RAVEL scores of a result file that are not finite (SAEBench averages an empty list to NaN when the
    validation batches held no cause or no isolation pair)."""
    scores = json.loads(path.read_text()).get("eval_result_metrics", {}).get("ravel", {})
    return [k for k in SCORE_KEYS if not isinstance(scores.get(k), (int, float)) or not math.isfinite(scores[k])]


class RavelRunner(MetricRunner):
    name = "ravel"
    # signed codes: read correctly (signed_codes = None). Its MDBM swaps masked latent values between base and
    # source and decodes linearly (plus the base's error): nothing assumes a sign

    def config_class(self) -> type:
        from sae_bench.evals.ravel.eval_config import RAVELEvalConfig

        return RAVELEvalConfig

    def model(self, ctx: EvalContext) -> tuple[RavelModel | None, str | None]:
        """The HF model RAVEL loads, or the reason there is none (:func:`resolve_ravel_model`)."""
        return resolve_ravel_model(ctx.model_name, ctx.model_config.path, ctx.eval.ravel.model_dir, ctx.hub_reachable)

    def data_reason(self, ctx: EvalContext, selection: dict[str, list[str]]) -> str | None:
        """Why RAVEL has no prompt files here (a bad ``data_dir``, or none and no hub), or None."""
        node = ctx.eval.ravel
        if node.data_dir is not None:
            return check_ravel_data(node.data_dir, selection)
        if ctx.hub_reachable:
            return None
        reason = (
            f"no RAVEL data: eval.ravel.data_dir is not set and the hub is unreachable (SAEBench downloads "
            f"{HUB_DATASET}); set eval.ravel.data_dir=<folder holding base/ravel_<entity>_*.json>"
        )
        names = saebench_llm_names()
        if ctx.model_name not in names and "entity_attribute_selection" not in node.config:
            reason += (
                f" (RAVEL supports only SAEBench's models {sorted(names)} out of the box: for "
                f"{ctx.model_name!r} give prompts it answers right, with their entity types and attributes "
                "in eval.ravel.config.entity_attribute_selection)"
            )
        return reason

    def requirements(self, ctx: EvalContext) -> str | None:
        reasons = [self.model(ctx)[1], self.data_reason(ctx, self.saebench_config(ctx).entity_attribute_selection)]
        mismatched = [m for m in map(hook_mismatch, ctx.saes) if m]
        if ctx.saes and len(mismatched) == len(ctx.saes):
            reasons.append(
                f"RAVEL intervenes on the residual stream after a block (blocks.<L>.hook_resid_post); "
                f"no SAE is on one: {mismatched}"
            )
        reasons = [r for r in reasons if r]
        return "; ".join(reasons) if reasons else None

    def config(self, ctx: EvalContext) -> Any:
        return self.saebench_config(ctx, artifact_dir=str(ctx.artifacts(self.name)))

    def run(self, ctx: EvalContext, config: Any) -> None:
        import sae_bench.evals.ravel.main as ravel

        node = ctx.eval.ravel
        check_batch_sizes(config.num_pairs_per_attribute, config.train_test_split, config.llm_batch_size)
        model, reason = self.model(ctx)
        if model is None:
            raise ValueError(reason)
        if node.data_dir is not None:
            extra = {
                "model": model.source,
                "n_generated_tokens": config.n_generated_tokens,
                "full_dataset_downsample": config.full_dataset_downsample,
            }
            selection = config.entity_attribute_selection
            config.artifact_dir = str(staged_dir(node.data_dir, selection, ctx.artifacts(self.name), extra))
            data: Any = {"local": Path(config.artifact_dir).name}  # the fingerprint of the prompt files and extra
        else:
            data = {"hub": HUB_DATASET}
        records = [r for r in ctx.saes if hook_mismatch(r) is None]
        sizes = {
            **config_as_dict(config),
            "model": model.source,
            "data": f"local {node.data_dir}" if node.data_dir is not None else f"hub {HUB_DATASET}",
        }
        ctx.record_sizes(self.name, sizes)
        out = ctx.results_dir / self.name
        hf_model = str(model.local_dir) if model.local_dir is not None else model.saebench_name
        make_key = lambda: ravel_key(ctx, config, hf_model, data)  # noqa: E731
        with (
            reused_artifacts(ctx, self.name, Path(config.artifact_dir).resolve(), make_key),
            ravel_model_setup(ctx.model_name, model),
            pinned_ravel_rng(ravel, config.random_seed),
        ):
            if node.data_dir is not None:  # after the cache's links: only files it lacks are copied
                stage_ravel_data(node.data_dir, config.entity_attribute_selection, ctx.artifacts(self.name), extra)
            if config.force_dataset_recompute:
                clear_cached_instances(Path(config.artifact_dir))
            try:
                ravel.run_eval(
                    config,
                    [r.selected for r in records],
                    ctx.device,
                    str(out),
                    force_rerun=ctx.force_rerun,
                    artifacts_path=str(ctx.artifacts(self.name)),
                )
            except UnpairablePrompts as exc:  # the model's answers, the same for every SAE: none is scored
                log.warning("RAVEL not scored: %s", exc)
                sizes[NOT_SCORED] = str(exc)
        sizes["answered_prompts"] = filtered_prompt_counts(Path(config.artifact_dir))
        self.add_notes(ctx, config, sizes["answered_prompts"], records)

    def add_notes(
        self, ctx: EvalContext, config: Any, answered: dict[str, dict[str, int]], records: list[SAERecord]
    ) -> None:
        """The low-confidence note (small model, local data) and a note per non-finite score."""
        node = ctx.eval.ravel
        why = []
        if ctx.n_params < node.low_confidence_below_params:
            why.append(
                LOW_CONFIDENCE_MODEL.format(n=ctx.n_params, limit=node.low_confidence_below_params, answered=answered)
            )
        if node.data_dir is not None:
            why.append(LOW_CONFIDENCE_DATA.format(data_dir=node.data_dir))
        if why:
            used = {k: getattr(config, k) for k in SAEBENCH_SIZES}
            ctx.info["notes"].append(
                {
                    "metric": self.name,
                    "low_confidence": True,
                    "note": (
                        f"RAVEL is low-confidence here: {'; '.join(why)}. Sizes {used} (SAEBench's defaults: "
                        f"{SAEBENCH_SIZES})"
                    ),
                }
            )
        for r in records:
            path = r.result_path(ctx.results_dir, self.name)
            bad = nonfinite_scores(path) if path.exists() else []
            if bad:
                log.warning("RAVEL scores %s of %s are not finite", bad, r.name)
                ctx.info["notes"].append(
                    {
                        "metric": self.name,
                        "low_confidence": True,
                        "note": (
                            f"RAVEL {bad} of {r.name} are not finite: its validation batches held no cause or no "
                            "isolation pair; raise eval.ravel.config.num_pairs_per_attribute"
                        ),
                    }
                )

    def no_result_reason(self, ctx: EvalContext, config: Any) -> str:
        not_scored = ctx.info["sizes"].get(self.name, {}).get(NOT_SCORED)
        if not_scored:
            return f"RAVEL cannot pair the prompts the model answered right, so no SAE is scored: {not_scored}"
        mismatched = [m for m in map(hook_mismatch, ctx.saes) if m]
        if mismatched:
            return (
                f"RAVEL runs only SAEs on the residual stream after a block (blocks.<L>.hook_resid_post); not "
                f"run: {mismatched}"
            )
        return super().no_result_reason(ctx, config)
