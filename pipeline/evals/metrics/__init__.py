"""One runner per SAEBench metric, in a registry.

    from pipeline.evals.metrics import REGISTRY, EvalContext, run_metrics
    outcome = run_metrics(ctx, ["core", "sparse_probing"])     # skipped / failed / timings

Each runner (:class:`MetricRunner`) says why it cannot run here (:meth:`~MetricRunner.requirements`), builds
SAEBench's own config dataclass (:meth:`~MetricRunner.config`; unknown ``config:`` keys fail naming
``eval.<metric>.config.<key>``) and runs SAEBench's eval code (:meth:`~MetricRunner.run`).
"""

from pipeline.evals.metrics.base import EvalContext, MetricRunner, config_as_dict
from pipeline.evals.metrics.registry import (
    METRICS,
    REGISTRY,
    MetricOutcome,
    check_metric_configs,
    needs_labelled,
    run_metric,
    run_metrics,
)

__all__ = [
    "EvalContext",
    "MetricRunner",
    "MetricOutcome",
    "REGISTRY",
    "METRICS",
    "check_metric_configs",
    "config_as_dict",
    "needs_labelled",
    "run_metric",
    "run_metrics",
]
