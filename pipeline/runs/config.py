"""The config schema: one typed dataclass per config node, registered in Hydra's ConfigStore, checked in one place.

``conf/config.yaml`` starts its defaults list with :data:`SCHEMA_NAME`, so Hydra types every node as it
composes: an unknown key (``dictionary.colour=red``) or a wrong type fails at composition, naming the key.
The nodes and their schemas (each field documented under it):

========== ==================================================== ============================================
node       schema                                               defaults
========== ==================================================== ============================================
model      :class:`pipeline.data.config.ModelConfig`             ``conf/model/*.yaml``
data       :class:`pipeline.data.text.TextSource`                ``conf/data/*.yaml``
harvest    :class:`pipeline.data.config.HarvestConfig`           the dataclass; presets override
dictionary :class:`pipeline.core.learner_config.LearnerConfig`   the dataclass (the library's own defaults)
           (its ``coder``: :class:`~pipeline.core.dictionary.CoderSettings`)
baseline   name -> :class:`pipeline.baselines.BaselineSpec`  ``conf/baseline/<name>.yaml``, chosen by
           (each SAE baseline to train)                          ``baseline=[topk,batchtopk]`` (a list)
compare    :class:`pipeline.baselines.compare.CompareConfig` the dataclass; presets override
           (budget and width of the baselines)
eval       :class:`pipeline.evals.config.EvalConfig`             ``conf/eval/*.yaml`` (no defaults in code)
dashboards :class:`pipeline.report.dashboards.DashboardsConfig`   the dataclass; presets override
wandb      :class:`pipeline.utils.tracking.TrackingConfig`       the dataclass (off); not part of any stage hash
distributed :class:`pipeline.runs.distributed.DistributedConfig` the dataclass; how torchrun ranks join (backend,
           timeouts); not part of any stage hash
========== ==================================================== ============================================

Nodes that mirror a library dataclass (``learn_dictionary``'s options, the harvest's) take that dataclass's
defaults, so each default is written once; ``python -m pipeline --cfg job`` prints the composed whole.
:func:`check_config` adds the checks a type cannot express (value ranges, model shapes, devices), before any
work; the orchestrator and every stage's command line call it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

from omegaconf import MISSING, DictConfig

from pipeline.baselines.compare import CompareConfig
from pipeline.baselines.config import BaselineSpec
from pipeline.core.learner_config import LearnerConfig
from pipeline.data.config import HarvestConfig, ModelConfig, parse_harvest_config
from pipeline.data.text import TextSource
from pipeline.evals.config import FIT_SAES, EvalConfig, validate_eval_config
from pipeline.report.dashboards.config import DashboardsConfig
from pipeline.runs.distributed import DistributedConfig, gpu_count
from pipeline.runs.layout import STAGES
from pipeline.utils.devices import resolve_device
from pipeline.utils.tracking import TrackingConfig
from pipeline.utils.typed_config import typed_node

#: ``stage=`` of the joint evaluation of a sweep's points (:mod:`pipeline.runs.sweep_eval`), besides ``all`` and the
#: stages.
EVALUATE_SWEEP = "evaluate_sweep"

#: Name of the top-level schema in Hydra's ConfigStore (first entry of ``conf/config.yaml``'s defaults).
SCHEMA_NAME = "pipeline_schema"


@dataclass
class ReportConfig:
    """The ``report`` node (no options yet)."""


@dataclass
class PipelineConfig:
    """The whole config of a run (``conf/config.yaml`` + one file per group + an ``experiment`` preset)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Which language model, and the layer harvested by default."""
    data: TextSource = field(default_factory=TextSource)
    """Where the text comes from."""
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    """What is harvested, how much, and how it is stored."""
    dictionary: LearnerConfig = MISSING
    """The DB-KSVD learner: width ``n_atoms``, the ``coder`` (``coder.k`` non-zeros), and the schedule."""
    baseline: dict[str, BaselineSpec] = field(default_factory=dict)
    """The SAE baselines trained on the same store, by name (``conf/baseline/<name>.yaml``; ``baseline=[]``:
    none)."""
    compare: CompareConfig = field(default_factory=CompareConfig)
    """How every baseline is matched to the dictionary: the budget (``plateau`` by default) and the width."""
    eval: EvalConfig = MISSING
    """The SAEBench metrics, their sizes, and the SAEs they score."""
    dashboards: DashboardsConfig = field(default_factory=DashboardsConfig)
    """Feature dashboards of every SAE (the latents drawn, what each card shows)."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """The report stage."""
    wandb: TrackingConfig = field(default_factory=TrackingConfig)
    """Optional experiment tracking (off): the fit curve, each baseline's training (sae-lens's own logging) and
    the report's table, one wandb run per stage job, grouped by experiment."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """How the ranks of a ``torchrun`` launch join (ignored by one process): the backend and the timeouts."""
    experiment_name: str = MISSING
    """Runs go to ``<output_root>/<experiment_name>/<stage>-<hash>/``."""
    output_root: str = MISSING
    """Root folder of every run."""
    stage: str = MISSING
    """``all``, one of the stages (the others are reused), or ``evaluate_sweep`` (:data:`EVALUATE_SWEEP`: every
    point of the experiment evaluated together, :mod:`pipeline.runs.sweep_eval`)."""
    until: str | None = None
    """With ``stage=all``: the last stage to run (e.g. ``until=baselines``: a sweep's points up to their
    baselines, then ``stage=evaluate_sweep`` evaluates them together); None: every stage."""


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore and the config's resolvers in OmegaConf (idempotent); call before
    composing ``conf/``."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=SCHEMA_NAME, node=PipelineConfig)
    if not OmegaConf.has_resolver("gpu_count"):
        OmegaConf.register_new_resolver("gpu_count", gpu_count)


def section(cfg: DictConfig | dict, name: str) -> Any:
    """The node ``name`` of ``cfg`` as its typed dataclass (works on a composed config and on plain dicts)."""
    schema = get_type_hints(PipelineConfig).get(name)
    if schema is None:
        raise ValueError(f"unknown config node {name!r}; nodes: {[f.name for f in fields(PipelineConfig)]}")
    if not is_dataclass(schema):
        return cfg[name]
    return typed_node(cfg[name] if name in cfg else None, schema, name)


def open_stage_tracker(cfg: DictConfig | dict, stage: str, name: str, config: dict[str, Any] | None = None) -> Any:
    """A :class:`~pipeline.utils.tracking.Tracker` for one job of ``stage`` (a no-op unless ``wandb.enabled``):
    grouped by experiment (``wandb.group`` overrides), named ``name``."""
    from pipeline.utils.tracking import open_tracker

    return open_tracker(
        section(cfg, "wandb"),
        name=name,
        job_type=stage,
        config=config,
        default_group=str(cfg["experiment_name"]),
        tags=[stage],
    )


def baseline_specs(cfg: DictConfig | dict) -> dict[str, BaselineSpec]:
    """The ``baseline`` node as ``{name: BaselineSpec}`` (``ValueError`` naming ``baseline.<name>.<key>``)."""
    node = cfg["baseline"] if "baseline" in cfg else None
    if node is None:
        return {}
    if not hasattr(node, "items"):
        raise ValueError(
            f"baseline must be a mapping of name -> settings (conf/baseline/<name>.yaml, chosen with "
            f"baseline=[topk,batchtopk]), got {type(node).__name__}."
        )
    specs = {}
    for name, spec in node.items():
        try:
            specs[str(name)] = typed_node(spec, BaselineSpec, f"baseline.{name}")
        except ValueError as exc:  # BaselineSpec's own value checks do not name the node
            raise ValueError(
                str(exc) if str(exc).startswith(("bad config", "config value")) else f"baseline.{name}: {exc}"
            ) from None
    return specs


class ConfigError(ValueError):
    """A config the pipeline cannot run, with the key and the fix in its message."""


def check_config(cfg: DictConfig | dict) -> None:
    """Every check of a config that types cannot express, before any work: :class:`ConfigError` (a
    ``ValueError``) naming the key."""
    try:
        _check(cfg)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_config_or_exit(cfg: DictConfig | dict) -> None:
    """:func:`check_config` for the command lines: a bad config prints its message (no traceback) and exits 2."""
    try:
        check_config(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _check(cfg: DictConfig | dict) -> None:
    unknown = set(cfg.keys()) - {f.name for f in fields(PipelineConfig)}
    if unknown:
        raise ValueError(
            f"unknown top-level config key(s) {sorted(unknown)}; valid keys: "
            f"{sorted(f.name for f in fields(PipelineConfig))}."
        )
    stage = cfg["stage"]
    if stage not in ("all", *STAGES, EVALUATE_SWEEP):
        raise ValueError(f"stage={stage!r} is not one of all, {', '.join(STAGES)}, {EVALUATE_SWEEP}.")
    until = cfg.get("until")
    if until is not None and until not in STAGES:
        raise ValueError(f"until={until!r} is not one of {', '.join(STAGES)} (the last stage a stage=all run runs).")
    if until is not None and stage != "all":
        raise ValueError(f"until={until} stops a stage=all run after that stage; stage={stage} runs one: drop until.")
    model, _, harvest = parse_harvest_config(cfg)
    learner: LearnerConfig = section(cfg, "dictionary")
    baselines = baseline_specs(cfg)
    _check_devices(
        model=model.device,
        dictionary=learner.device,
        **{f"baseline.{name}": spec.device for name, spec in baselines.items()},
    )
    section(cfg, "compare").validate()
    section(cfg, "wandb")
    section(cfg, "distributed").validate()
    for key in ("checkpoint_path", "resume"):
        if getattr(learner, key):
            raise ValueError(
                f"dictionary.{key} is set by the fit stage (its checkpoint lives in the fit folder); "
                f"remove dictionary.{key} from the config."
            )
    # the shape conf/model/*.yaml records for the named model; a local folder (model.path) says its own
    d_model, n_layers = (model.d_model, model.n_layers) if not model.path else local_model_shape(model.path)
    if n_layers is not None:
        for layer in harvest.layers if harvest.layers is not None else [model.layer]:
            if not 0 <= layer < n_layers:
                raise ValueError(
                    f"layer {layer} does not exist: {model.name} has {n_layers} layers "
                    f"(0..{n_layers - 1}); set model.layer / harvest.layers accordingly."
                )
    _prefixed(learner.validate_schedule)  # a run asks for at least one iteration / epoch
    _prefixed(learner.validate, d_model if d_model is not None else max(learner.coder.k, 1))
    _check_heldout(harvest)
    evals = section(cfg, "eval")
    validate_eval_config(evals)
    dashboards = section(cfg, "dashboards")
    dashboards.validate()
    for node, saes in (("eval", evals.saes), ("dashboards", dashboards.saes)):
        unknown = [s for s in saes if s not in FIT_SAES and s not in baselines]
        if unknown:
            raise ValueError(
                f"{node}.saes has unknown entries {unknown}: use {' / '.join(FIT_SAES)} or the name of a "
                f"configured baseline ({', '.join(baselines) or 'none configured: baseline=[]'})."
            )
    _check_devices(eval=evals.device, dashboards=dashboards.device)


def _check_devices(**devices: str | None) -> None:
    for node, device in devices.items():
        try:
            resolve_device(device)
        except ValueError as exc:
            raise ValueError(f"{node}.device: {exc}") from None


def _prefixed(check, *args) -> None:
    """Re-raise a learner validation error with the config path of the keys: ``dictionary.<field> = ...`` when
    it names a field, else the sparsity message with the keys to set."""
    try:
        check(*args)
    except ValueError as exc:
        msg = str(exc)
        named = {f.name for f in fields(LearnerConfig)}
        if msg.split(" ", 1)[0].split(".", 1)[0] in named:
            raise ValueError(f"dictionary.{msg}") from None
        raise ValueError(f"dictionary: {msg} (set dictionary.coder.k / dictionary.n_atoms)") from None


#: Keys of a Hugging Face ``config.json`` that hold the residual width and the block count (Llama, Gemma, Qwen,
#: GPT-NeoX, ...; GPT-2's; a multimodal model's ``text_config``).
HF_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")
HF_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def local_model_shape(path: str) -> tuple[int | None, int | None]:
    """``(d_model, n_layers)`` of the local model at ``model.path``, from its ``config.json`` (None for what it
    does not say, or when there is none here: the folder may be mounted only where the stage runs)."""
    import json
    from pathlib import Path

    config = Path(path).expanduser() / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except ValueError as exc:
        raise ValueError(f"model.path={path}: its config.json does not parse ({exc})") from None
    data = {**(data.get("text_config") or {}), **data} if isinstance(data, dict) else {}

    def first(keys: tuple[str, ...]) -> int | None:
        value = next((data[k] for k in keys if isinstance(data.get(k), int)), None)
        return value if value is None or value > 0 else None

    return first(HF_WIDTH_KEYS), first(HF_DEPTH_KEYS)


def _check_heldout(harvest: HarvestConfig) -> None:
    """The fit stage (the dictionary's held-out FVU) and the baselines read held-out rows: a store without any
    would fail there, late, or report an FVU of 0.0."""
    import math

    import numpy as np

    from pipeline.data.store import heldout_mask

    fraction = harvest.heldout_fraction
    if fraction == 0:
        raise ValueError(
            "harvest.heldout_fraction=0 holds no contexts out, but the fit stage (the dictionary's held-out FVU) "
            "and the baselines read held-out rows; set it to e.g. 0.05"
        )
    n_contexts = math.ceil(harvest.n_tokens / harvest.context_length)
    if not heldout_mask(np.arange(n_contexts), fraction).any():
        raise ValueError(
            f"harvest.heldout_fraction={fraction} holds out no context of the {n_contexts} harvested "
            f"(harvest.n_tokens / harvest.context_length), but the fit stage and the baselines read held-out rows; "
            f"raise it to at least {1 / n_contexts:.3g} or harvest more tokens"
        )
