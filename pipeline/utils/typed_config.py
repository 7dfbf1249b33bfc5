"""One way to turn a config node into a typed dataclass, for every schema of the project."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def typed_node(node: Any, schema: type[T], key: str) -> T:
    """``node`` (a ``DictConfig``, a dict or None) merged onto ``schema``'s defaults, as a ``schema`` instance.

    An unknown key, a wrong type or a value left at ``???`` raises ``ValueError`` naming ``<key>.<field>``.
    """
    try:
        # a plain copy: a node typed by the schema already would hide keys added with `+` (struct mode off)
        node = OmegaConf.create(as_dict(node))
        missing = sorted(OmegaConf.missing_keys(node))  # "???" values (merging would hide them)
        if missing:
            raise ValueError(
                f"config value(s) {[f'{key}.{m}' for m in missing]} must be set, e.g. on the "
                f"command line: {key}.{missing[0]}=..."
            )
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ValueError(
                f"config value(s) {[f'{key}.{m}' for m in missing]} must be set, e.g. on the "
                f"command line: {key}.{missing[0]}=..."
            )
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        full = getattr(exc, "full_key", None)
        where = f"`{key}.{full}`" if full else f"`{key}`"
        raise ValueError(
            f"bad config under {where}: {exc.msg if hasattr(exc, 'msg') else exc}. "
            f"Valid keys of {key}: {[f.name for f in dataclasses.fields(schema)]}"
        ) from None


def as_dict(node: DictConfig | dict | None) -> dict[str, Any]:
    """A config node as plain, resolved data."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node or {})
