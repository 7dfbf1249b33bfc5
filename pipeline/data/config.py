"""Typed schemas of the harvest stage's config nodes: ``model`` (:class:`ModelConfig`), ``data``
(:class:`pipeline.data.text.TextSource`, used as it is) and ``harvest`` (:class:`HarvestConfig`).

:func:`parse_harvest_config` checks a Hydra/OmegaConf config against these dataclasses before any heavy
work: an unknown key or a wrong type fails with a ``ValueError`` naming the key.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.data.harvest import MaskingOptions, hook_names
from pipeline.data.store import DTYPES
from pipeline.data.text import TextSource, describe_source
from pipeline.utils.typed_config import typed_node


@dataclass
class ModelConfig:
    """Which model to harvest from: one ``conf/model/*.yaml`` per model (``name`` and ``layer`` have no default
    here: that file sets them)."""

    name: str = MISSING
    """Offline model (smollm2-135m, gemma-3-270m), a transformer-lens name (gemma-2-2b, pythia-160m-deduped),
    or a label for a local model given by ``path``."""
    path: str | None = None
    """Local directory of HF weights + tokenizer; takes precedence over the hub."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """Compute dtype: float32 on CPU; bfloat16 on GPU for Gemma."""
    n_ctx: int | None = None
    """Context window to build the model with (None: the model's own; 1024 for the offline models)."""
    layer: int = MISSING
    """Default layer whose hook is harvested (``harvest.layers`` overrides)."""
    d_model: int | None = None
    """The named model's residual width, when known (``conf/model/*.yaml``): the config check sizes the dictionary
    against it before any work. None: checked once the model is loaded. Facts about the model, not settings: they
    stay out of the stage hashes. Set both to null when ``model.name`` is pointed at another model."""
    n_layers: int | None = None
    """The named model's block count, when known: ``model.layer`` / ``harvest.layers`` are checked against it
    before any work."""


@dataclass
class HarvestConfig:
    """The ``harvest`` node of ``conf/config.yaml``."""

    layers: list[int] | None = None
    """Layers to harvest in one pass (None: ``[model.layer]``)."""
    hook_point: str = "hook_resid_post"
    """Hook within each block: hook_resid_post, hook_resid_mid, hook_mlp_out, hook_attn_out, ..."""
    hooks: list[str] | None = None
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
    outlier_norm_factor: float | None = None
    """Leave out rows whose norm exceeds this multiple of the batch median (None: off)."""
    progress: bool = True
    """Show a tqdm bar (tokens, with throughput)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key for a value the harvest cannot use."""
        if self.context_length < 2:
            raise ValueError(
                f"harvest.context_length={self.context_length} must be at least 2 (BOS and one token; the paper "
                "uses 128)"
            )
        if self.n_tokens < self.context_length:
            raise ValueError(
                f"harvest.n_tokens={self.n_tokens} is below one context (harvest.context_length={self.context_length})"
            )
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"harvest.heldout_fraction={self.heldout_fraction} must be in [0, 1)")
        if self.batch_size < 1 or self.shard_rows < 1:
            raise ValueError("harvest.batch_size and harvest.shard_rows must be positive")
        if self.dtype not in DTYPES:
            raise ValueError(f"harvest.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.outlier_norm_factor is not None and not self.outlier_norm_factor > 0:
            raise ValueError(
                f"harvest.outlier_norm_factor={self.outlier_norm_factor} must be > 0 (a multiple of the batch's "
                "median row norm, e.g. 10); null: no outlier masking"
            )

    def hook_list(self, model_layer: int) -> list[str]:
        if self.hooks:
            return list(self.hooks)
        return hook_names(self.layers if self.layers is not None else [model_layer], self.hook_point)

    def masking(self) -> MaskingOptions:
        return MaskingOptions(self.mask_bos, self.mask_special_tokens, self.outlier_norm_factor)


def parse_harvest_config(cfg: DictConfig | dict) -> tuple[ModelConfig, TextSource, HarvestConfig]:
    """Validate the ``model``, ``data`` and ``harvest`` nodes; return typed objects."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    model = typed_node(cfg.get("model"), ModelConfig, "model")
    source = typed_node(cfg.get("data"), TextSource, "data")
    harvest = typed_node(cfg.get("harvest"), HarvestConfig, "harvest")
    harvest.validate()
    return model, source, harvest


def store_identity(model: ModelConfig, source: TextSource, h: HarvestConfig) -> dict[str, Any]:
    """What makes two stores interchangeable: model, hooks, text (content hashes for local text), token count
    and every setting that changes the stored bytes (not the progress bar, nor how hooks were spelled)."""
    text = dataclasses.asdict(source) if source.kind == "hub" else describe_source(source)
    settings = dataclasses.asdict(h)
    for key in ("layers", "hook_point", "hooks", "progress"):
        settings.pop(key)
    return {
        "model": {"name": model.name, "path": model.path, "dtype": model.dtype, "n_ctx": model.n_ctx},
        "hooks": h.hook_list(model.layer),
        "text": text,
        **settings,
    }
