"""Reuse SAEBench core's SAE-independent LLM forwards across the SAEs of one evaluation.

SAEBench's core (``sae_bench.evals.core.main``) runs, per SAE and per batch of eval contexts, three full forwards
for the reconstruction metrics (clean; with the SAE spliced in; with the hook zero-ablated) and one forward up to
the hook for the sparsity / variance metrics. Every SAE of a run sees the same contexts in the same order (the
store is shuffled with one seed), so only the spliced forward depends on the SAE: the clean logits, the
zero-ablated logits and the hook activations are the same for every SAE, and for the two position sets of
``eval.core.positions=both``. On 2 CPU cores those repeated forwards are most of core's time.

:class:`SharedForwards` wraps the model SAEBench gets and memoises exactly those three kinds of call, keyed by
the token ids and every argument of the call, within a memory cap:

* ``model(tokens, ...)`` (no hooks: the clean forward);
* ``model.run_with_cache(tokens, ...)`` (no hooks: the activations at the hook);
* ``model.run_with_hooks(tokens, fwd_hooks=...)`` when every hook is SAEBench core's zero-ablation hook
  (:data:`SAE_INDEPENDENT_HOOKS`, matched by qualified name; any other hook, e.g. the SAE splice, always runs).

A hit returns a copy of the stored tensors, so a caller that edits its result cannot change a later one. A call
whose result would overflow ``cap_mb`` is run and not stored. Nothing of SAEBench is patched: the wrapper only
answers the calls it would otherwise make again. The counts (:attr:`SharedForwards.stats`) go into
``eval_info.json``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import torch

#: Qualified names of the SAEBench hooks whose forward does not depend on the SAE (``get_recons_loss``'s
#: zero ablation: it replaces the hook's activations by zeros whatever the SAE).
SAE_INDEPENDENT_HOOKS = frozenset({"get_recons_loss.<locals>.standard_zero_ablate_hook"})


@dataclass
class ReuseStats:
    """What :class:`SharedForwards` did over one evaluation."""

    forwards_run: int = 0
    """Forwards the model ran (a call not memoised, a first call, or one that did not fit the cap)."""
    forwards_reused: int = 0
    """Forwards answered from memory."""
    stored_mb: float = 0.0
    """Memory held by the stored results (MiB)."""
    not_stored: int = 0
    """Results left unstored because they would overflow the cap."""

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}


class SharedForwards:
    """``model`` with its SAE-independent forwards memoised (module docstring); every other attribute is the
    wrapped model's. ``cap_mb``: the most memory the stored results may hold (0: nothing is stored)."""

    def __init__(self, model: Any, cap_mb: float):
        self._model, self._cap = model, float(cap_mb) * 2**20
        self._memo: dict[tuple[Any, ...], Any] = {}
        self._bytes = 0
        self.stats = ReuseStats()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        return self._answer(("call", args, kwargs), tokens, lambda: self._model(tokens, *args, **kwargs))

    def run_with_cache(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        return self._answer(
            ("cache", args, kwargs), tokens, lambda: self._model.run_with_cache(tokens, *args, **kwargs)
        )

    def run_with_hooks(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        run = lambda: self._model.run_with_hooks(tokens, *args, **kwargs)  # noqa: E731
        hooks = kwargs.get("fwd_hooks") or []
        if args or kwargs.get("bwd_hooks") or not hooks or not all(_sae_independent(fn) for _, fn in hooks):
            self.stats.forwards_run += 1
            return run()
        named = [(name, fn.__qualname__) for name, fn in hooks]
        rest = {k: v for k, v in kwargs.items() if k != "fwd_hooks"}
        return self._answer(("hooks", named, rest), tokens, run)

    def _answer(self, call: tuple[Any, ...], tokens: Any, run: Any) -> Any:
        key = _key(call, tokens)
        if key is not None and key in self._memo:
            self.stats.forwards_reused += 1
            return _copy(self._memo[key])
        out = run()
        self.stats.forwards_run += 1
        if key is not None:
            size = _nbytes(out)
            if self._bytes + size <= self._cap:
                self._memo[key] = _copy(out)
                self._bytes += size
                self.stats.stored_mb = self._bytes / 2**20
            else:
                self.stats.not_stored += 1
        return out


def _sae_independent(fn: Any) -> bool:
    return getattr(fn, "__qualname__", None) in SAE_INDEPENDENT_HOOKS


def _key(call: tuple[Any, ...], tokens: Any) -> tuple[Any, ...] | None:
    """A hashable key of a call on ``tokens`` (a tensor of ids), or None when an argument cannot be keyed
    (the call then always runs)."""
    if not isinstance(tokens, torch.Tensor):
        return None
    try:
        frozen = _freeze(call)
    except TypeError:
        return None
    t = tokens.detach().cpu().contiguous()
    digest = hashlib.sha256(t.numpy().tobytes()).hexdigest()
    return (frozen, tuple(t.shape), str(t.dtype), str(tokens.device), digest)


def _freeze(x: Any) -> Any:
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    raise TypeError(f"cannot key {type(x).__name__}")


def _copy(out: Any) -> Any:
    """``out`` with every tensor cloned (tuples, lists, dicts and TransformerLens ``ActivationCache`` walked)."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, tuple):
        values = [_copy(v) for v in out]
        return type(out)(*values) if hasattr(out, "_fields") else tuple(values)  # a NamedTuple keeps its type
    if isinstance(out, list):
        return [_copy(v) for v in out]
    if isinstance(out, dict):
        return {k: _copy(v) for k, v in out.items()}
    cache = getattr(out, "cache_dict", None)
    if isinstance(cache, dict):
        return type(out)({k: _copy(v) for k, v in cache.items()}, out.model, has_batch_dim=out.has_batch_dim)
    return out


def _nbytes(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(v) for v in out)
    if isinstance(out, dict):
        return sum(_nbytes(v) for v in out.values())
    cache = getattr(out, "cache_dict", None)
    return _nbytes(cache) if isinstance(cache, dict) else 0
