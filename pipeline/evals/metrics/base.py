"""What every metric runner gets (:class:`EvalContext`) and what it provides (:class:`MetricRunner`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.evals.config import EvalConfig
from pipeline.evals.labelled_data import LabelledSpec
from pipeline.evals.sae_records import SAERecord

if TYPE_CHECKING:
    from pipeline.data.config import ModelConfig
    from pipeline.data.store import ActivationStore
    from pipeline.data.text import TextSource


@dataclass
class EvalContext:
    """Everything a metric runner reads, and the ``info`` it records into (``eval_info.json``)."""

    model: Any
    """The loaded ``HookedTransformer`` (SAEBench is made to use it, not load its own)."""
    model_config: ModelConfig
    """The ``model`` config node (``name`` is the model name SAEBench's configs get)."""
    n_params: int
    """Parameters of the model (absorption's low-confidence note)."""
    saes: list[SAERecord]
    """The SAEs to evaluate."""
    results_dir: Path
    """``eval_results/``: SAEBench's result files, one folder per metric."""
    artifacts_dir: Path
    """``artifacts/``: SAEBench's intermediate files, one folder per metric."""
    device: str
    """Device of the evals."""
    llm_dtype: str
    """The model's dtype as SAEBench names it (float32, bfloat16, ...)."""
    llm_batch_size: int
    """LLM batch size of every metric."""
    force_rerun: bool
    """False: an existing result file is kept."""
    store: ActivationStore
    """The activation store (its manifest says which contexts the harvest used)."""
    text_source: TextSource
    """The harvest text (core's and, offline, autointerp's eval text come from it)."""
    labelled: LabelledSpec | None
    """The labelled passages, when a metric that needs them is selected."""
    eval: EvalConfig
    """The typed ``eval`` node (each runner reads its own sub-node)."""
    hub_reachable: bool
    """Whether the Hugging Face hub answers."""
    info: dict[str, Any]
    """``eval_info.json`` being written: runners add ``info["sizes"][metric]`` and ``info["notes"]``."""
    results_ledger: Any = None
    """The :class:`pipeline.evals.kept_results.ResultLedger` the evaluation loop records each metric's result
    files in (with the sha256 of their SAE's weights); None: not recorded."""

    @property
    def model_name(self) -> str:
        return self.model_config.name

    @property
    def selected(self) -> list[tuple[str, Any]]:
        """The SAEs as SAEBench's ``run_eval`` takes them (``selected_saes``)."""
        return [r.selected for r in self.saes]

    def artifacts(self, metric: str) -> Path:
        """SAEBench's intermediate files of ``metric``."""
        return self.artifacts_dir / metric

    def record_sizes(self, metric: str, sizes: dict[str, Any]) -> None:
        """Record the eval sizes ``metric`` used (``eval_info.json`` and the report)."""
        self.info["sizes"][metric] = sizes


class MetricRunner:
    """One SAEBench metric: its requirements, its config (SAEBench's own dataclass), its run.

    A runner is stateless; everything comes from the :class:`EvalContext`. The evaluation loop
    (:func:`pipeline.evals.metrics.registry.run_metrics`) asks :meth:`requirements` first (a reason means the
    metric is skipped, with that reason recorded), then builds :meth:`config` and calls :meth:`run`.
    """

    name: str = ""
    """The metric's name in ``eval.metrics`` and its result folder."""
    needs_labelled: bool = False
    """Whether it reads the labelled passages (they are built only when such a metric is selected)."""
    signed_codes: str | None = None
    """None: SAEBench's code of the metric reads signed codes correctly (a signed dictionary handed over with
    ``eval.signed_export=signed``: K latents, codes of either sign). Else why it cannot: the evaluation loop then
    skips such an SAE for this metric with that reason (:func:`pipeline.evals.metrics.registry.run_metric`)."""

    def config_class(self) -> type | None:
        """SAEBench's config dataclass of the metric (imported here: SAEBench loads only when asked), or None
        when the ``eval.<name>`` node has no ``config:`` block."""
        return None

    def check_config_keys(self, raw: dict[str, Any]) -> None:
        """``ValueError`` naming ``eval.<name>.config.<key>`` for a key SAEBench's dataclass does not have."""
        cls = self.config_class()
        if cls is None:
            return
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(
                f"unknown key(s) {[f'eval.{self.name}.config.{k}' for k in unknown]}: not fields of "
                f"SAEBench's {cls.__name__} ({sorted(names)})"
            )

    def node(self, ctx: EvalContext) -> Any:
        """This metric's ``eval.<name>`` node."""
        return getattr(ctx.eval, self.name)

    def requirements(self, ctx: EvalContext) -> str | None:
        """Why the metric cannot run here (missing key, model, data, hub), or None when it can."""
        return None

    def config(self, ctx: EvalContext) -> Any:
        """SAEBench's config of this run: the ``config:`` block plus the stage's model name, LLM dtype and batch
        size (:meth:`saebench_config`)."""
        return self.saebench_config(ctx)

    def run(self, ctx: EvalContext, config: Any) -> None:
        """Run SAEBench's eval for every SAE of ``ctx``, writing ``ctx.results_dir/<name>/``; record the sizes."""
        raise NotImplementedError

    def no_result_reason(self, ctx: EvalContext, config: Any) -> str:
        """The skip reason of an SAE the metric ran for (with ``config``) but wrote no result file."""
        return "SAEBench wrote no result file for this SAE (see the stage log)"

    def saebench_config(self, ctx: EvalContext, raw: dict[str, Any] | None = None, **fixed: Any) -> Any:
        """SAEBench's config dataclass from ``raw`` (default: the node's ``config:`` block) plus the stage's
        ``model_name`` / ``llm_dtype`` / ``llm_batch_size`` and ``fixed``; a stage value that is not None
        overrides the block's."""
        raw = dict(self.node(ctx).config if raw is None else raw)
        self.check_config_keys(raw)
        fixed = dict(model_name=ctx.model_name, llm_dtype=ctx.llm_dtype, llm_batch_size=ctx.llm_batch_size, **fixed)
        return self.config_class()(**{**raw, **{k: v for k, v in fixed.items() if k not in raw or v is not None}})


def config_as_dict(config: Any) -> dict[str, Any]:
    """A SAEBench config dataclass as JSON-safe data (what ``eval_info.json`` records)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
