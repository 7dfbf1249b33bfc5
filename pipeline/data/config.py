"""Typed configs of the harvest stage: the ``model``, ``data`` and ``harvest`` nodes of ``conf/``.

:func:`parse_harvest_config` checks a Hydra/OmegaConf config against these dataclasses before any heavy
work: an unknown key or a wrong type fails with a ``ValueError`` naming the key.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.data.harvest import MaskingOptions, hook_names
from pipeline.data.text import DEFAULT_HUB_DATASET, TextSource


@dataclass
class ModelConfig:
    """Which model to harvest from (``conf/model/*.yaml``)."""

    name: str = "smollm2-135m"
    """Offline model (smollm2-135m, gemma-3-270m), a transformer-lens name (gemma-2-2b, pythia-160m-deduped),
    or a label for a local model given by ``path``."""
    path: Optional[str] = None
    """Local directory of HF weights + tokenizer; takes precedence over the hub."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """Compute dtype: float32 on CPU; bfloat16 on GPU for Gemma."""
    n_ctx: Optional[int] = None
    """Context window to build the model with (None: the model's own; 1024 for the offline models)."""
    layer: int = 15
    """Default layer whose hook is harvested (``harvest.layers`` overrides)."""


@dataclass
class DataConfig:
    """Where the text comes from (``conf/data/*.yaml``); see :class:`pipeline.data.text.TextSource`."""

    kind: str = "austen"
    """austen | hub | files."""
    dataset: str = DEFAULT_HUB_DATASET
    """hub: dataset repo id."""
    config_name: Optional[str] = None
    """hub: dataset configuration."""
    split: str = "train"
    revision: Optional[str] = None
    """hub: git revision (None: default branch; the resolved commit is recorded)."""
    paths: List[str] = field(default_factory=list)
    """files: paths or globs of .txt / .jsonl / .parquet files."""
    text_field: str = "text"
    """jsonl/parquet/hub: field holding the text."""


@dataclass
class HarvestConfig:
    """The ``harvest`` node of ``conf/config.yaml``."""

    layers: Optional[List[int]] = None
    """Layers to harvest in one pass (None: ``[model.layer]``)."""
    hook_point: str = "hook_resid_post"
    """Hook within each block: hook_resid_post, hook_resid_mid, hook_mlp_out, hook_attn_out, ..."""
    hooks: Optional[List[str]] = None
    """Explicit hook names; overrides layers / hook_point."""
    n_tokens: int = 200_000
    """Token positions to run through the model (train + held-out, masked included); the paper: ~2.6 M."""
    context_length: int = 128
    """Tokens per context, BOS included (the paper: 128)."""
    batch_size: int = 8
    """Contexts per forward pass."""
    dtype: str = "float32"
    """Storage dtype: float32 | bfloat16 | float16."""
    shard_rows: int = 65536
    """Approximate rows per shard (rounded to whole batches of contexts)."""
    heldout_fraction: float = 0.05
    """Fraction of contexts kept out of training, for held-out evaluation."""
    mask_bos: bool = True
    """Leave BOS positions out of the store."""
    mask_special_tokens: bool = True
    """Leave every special token (BOS, EOS, PAD, ...) out of the store."""
    outlier_norm_factor: Optional[float] = None
    """Leave out rows whose norm exceeds this multiple of the batch median (None: off)."""
    progress: bool = True
    """Show a tqdm bar (tokens, with throughput)."""

    def hook_list(self, model_layer: int) -> List[str]:
        if self.hooks:
            return list(self.hooks)
        return hook_names(self.layers if self.layers is not None else [model_layer], self.hook_point)

    def masking(self) -> MaskingOptions:
        return MaskingOptions(self.mask_bos, self.mask_special_tokens, self.outlier_norm_factor)


def _typed(node: Any, schema: type, key: str) -> Any:
    try:
        node = OmegaConf.create(node if node is not None else {})
        missing = sorted(OmegaConf.missing_keys(node))  # "???" values (merging would hide them)
        if missing:
            raise ValueError(f"config value(s) {[f'{key}.{m}' for m in missing]} must be set, e.g. on the "
                             f"command line: {key}.{missing[0]}=...")
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as exc:
        raise ValueError(f"bad config under `{key}`: {exc.msg if hasattr(exc, 'msg') else exc}. "
                         f"Valid keys: {[f.name for f in dataclasses.fields(schema)]}") from None


def parse_harvest_config(cfg: DictConfig | dict) -> tuple[ModelConfig, TextSource, HarvestConfig]:
    """Validate the ``model``, ``data`` and ``harvest`` nodes; return typed objects."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    model = _typed(cfg.get("model"), ModelConfig, "model")
    data = _typed(cfg.get("data"), DataConfig, "data")
    harvest = _typed(cfg.get("harvest"), HarvestConfig, "harvest")
    if harvest.n_tokens < harvest.context_length:
        raise ValueError(f"harvest.n_tokens={harvest.n_tokens} is below one context "
                         f"(harvest.context_length={harvest.context_length})")
    if not 0 <= harvest.heldout_fraction < 1:
        raise ValueError(f"harvest.heldout_fraction={harvest.heldout_fraction} must be in [0, 1)")
    if harvest.batch_size < 1 or harvest.shard_rows < 1:
        raise ValueError("harvest.batch_size and harvest.shard_rows must be positive")
    source = TextSource(**dataclasses.asdict(data))
    return model, source, harvest
