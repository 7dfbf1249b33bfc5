"""Reuse SAEBench core's SAE-independent LLM forwards across the SAEs of one evaluation, and across runs.

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

**The splice starts at the hook.** Given ``hook`` (a ``blocks.<L>.hook_resid_post`` / ``hook_resid_pre`` name),
the clean forward also keeps the residual stream at the hook (a hook that reads and returns nothing: the logits
are those of the plain call). SAEBench's SAE splice (``get_recons_loss``'s ``standard_replacement_hook``, matched
by qualified name, alone at ``hook``) is then answered without the layers below the hook: the hook function is
applied to the kept residual and the model runs from the next block (TransformerLens's ``start_at_layer``, with
the tokens, attention mask and positional input ``input_to_embed`` gives the full forward). The blocks above the
hook see the same tensor in the same batch layout as in the full forward, so the logits and per-token loss are
the same numbers (``tests/evals/test_shared_forwards.py`` pins them bit for bit on CPU).

**Across runs.** :meth:`SharedForwards.save` writes every stored result (one ``.pt`` file each, named by the
hash of its key) and :meth:`SharedForwards.load` reads them back, so the evaluate stage can keep them in the
shared eval cache (:mod:`pipeline.evals.metrics.artifact_reuse`): a later run on the same model, hook and eval
text runs only the per-SAE splices.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.evals.metrics.recons_loss import SPLICE_HOOK as RECONS_SPLICE_HOOK
from pipeline.utils.atomic import atomic_write

#: Qualified names of the SAEBench hooks whose forward does not depend on the SAE (``get_recons_loss``'s
#: zero ablation: it replaces the hook's activations by zeros whatever the SAE).
SAE_INDEPENDENT_HOOKS = frozenset({"get_recons_loss.<locals>.standard_zero_ablate_hook"})
#: Qualified name of SAEBench core's SAE splice at a residual-stream hook (``get_recons_loss``'s replacement of
#: the hook's activations by the SAE's reconstruction): answered from the kept residual (module docstring).
SPLICE_HOOK = "get_recons_loss.<locals>.standard_replacement_hook"
#: Every splice answered from the kept residual: SAEBench's, and the same replacement made by
#: :func:`pipeline.evals.metrics.recons_loss.recons_loss`.
SPLICE_HOOKS = frozenset({SPLICE_HOOK, RECONS_SPLICE_HOOK})
#: Suffix of the files :meth:`SharedForwards.save` writes.
FORWARD_SUFFIX = ".forward.pt"
_RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def resid_hook_start(hook: str | None) -> int | None:
    """The block a forward from a residual-stream ``hook`` starts at (``blocks.<L>.hook_resid_pre``: L;
    ``hook_resid_post``: L + 1), which is also the ``stop_at_layer`` of a run that ends there; None for any other
    hook."""
    match = _RESID_HOOK.match(hook or "")
    return int(match.group(1)) + (match.group(2) == "post") if match else None


class RoundedStats:
    """Counters of a dataclass, written with floats rounded to 0.1 (``eval_info.json``)."""

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class ReuseStats(RoundedStats):
    """What :class:`SharedForwards` did over one evaluation."""

    forwards_run: int = 0
    """Forwards the model ran (a call not memoised, a first call, or one that did not fit the cap)."""
    forwards_reused: int = 0
    """Forwards answered from memory."""
    stored_mb: float = 0.0
    """Memory held by the stored results (MiB)."""
    not_stored: int = 0
    """Results left unstored because they would overflow the cap."""
    started_at_hook: int = 0
    """SAE splices run from the kept residual at the hook (the layers above it only)."""
    loaded: int = 0
    """Stored results read from disk (:meth:`SharedForwards.load`)."""


class SharedForwards:
    """``model`` with its SAE-independent forwards memoised (module docstring); every other attribute is the
    wrapped model's. ``cap_mb``: the most memory the stored results may hold (0: nothing is stored). ``hook``:
    the SAEs' hook; a residual-stream hook lets the SAE splice start there (None: every splice runs in full)."""

    def __init__(self, model: Any, cap_mb: float, hook: str | None = None):
        self._model, self._cap = model, float(cap_mb) * 2**20
        self._memo: dict[tuple[Any, ...], Any] = {}
        self._bytes = 0
        self._start = resid_hook_start(hook)
        self._hook = hook if self._start is not None else None
        self.stats = ReuseStats()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        if self._hook is None or args or not isinstance(tokens, torch.Tensor):
            return self._answer(("call", args, kwargs), tokens, lambda: self._model(tokens, *args, **kwargs))
        kept: list[torch.Tensor] = []

        def keep(acts: torch.Tensor, hook: Any) -> None:
            kept.append(acts.detach().clone())

        def run() -> Any:
            out = self._model.run_with_hooks(tokens, fwd_hooks=[(self._hook, keep)], **kwargs)
            self._store(self._resid_key(tokens, kwargs), kept[0])  # the residual the splice starts from
            return out

        return self._answer(("call", args, kwargs), tokens, run)

    def run_with_cache(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        return self._answer(
            ("cache", args, kwargs), tokens, lambda: self._model.run_with_cache(tokens, *args, **kwargs)
        )

    def run_with_hooks(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        run = lambda: self._model.run_with_hooks(tokens, *args, **kwargs)  # noqa: E731
        hooks = kwargs.get("fwd_hooks") or []
        if args or kwargs.get("bwd_hooks") or not hooks or not all(_sae_independent(fn) for _, fn in hooks):
            self.stats.forwards_run += 1
            spliced = self._splice_from_hook(tokens, args, kwargs)
            return run() if spliced is None else spliced
        named = [(name, fn.__qualname__) for name, fn in hooks]
        rest = {k: v for k, v in kwargs.items() if k != "fwd_hooks"}
        return self._answer(("hooks", named, rest), tokens, run)

    @property
    def keeps(self) -> bool:
        """Whether anything can be kept (a cap above 0)."""
        return self._cap > 0

    def memo(self, name: str, tokens: Any, compute: Any) -> Any:
        """``compute(model, tokens)`` (``model``: the wrapped model), computed once per ``name`` and ``tokens`` and
        kept like a forward (within the cap, saved and loaded with them; a hit returns a copy). For SAE-independent
        values derived from a forward: :mod:`pipeline.evals.metrics.recons_loss`'s zero-ablated CE and KL. Counted
        as one forward run when computed, one reused when read back."""
        return self._answer(("memo", name), tokens, lambda: compute(self._model, tokens))

    def _answer(self, call: tuple[Any, ...], tokens: Any, run: Any) -> Any:
        key = _key(call, tokens)
        if key is not None and key in self._memo:
            self.stats.forwards_reused += 1
            return _copy(self._memo[key])
        out = run()
        self.stats.forwards_run += 1
        if key is not None and not self._store(key, out):
            self.stats.not_stored += 1
        return out

    def _store(self, key: tuple[Any, ...] | None, out: Any) -> bool:
        """Keep a copy of ``out`` under ``key`` if it fits the cap; whether it was kept."""
        size = _nbytes(out)
        if key is None or self._bytes + size > self._cap:
            return False
        if key not in self._memo:
            self._memo[key] = _copy(out)
            self._bytes += size
            self.stats.stored_mb = self._bytes / 2**20
        return True

    def _resid_key(self, tokens: Any, kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
        """Key of the residual at the hook kept for ``tokens`` (what shapes the forward below the hook: every
        argument but the return type, the loss form and the hooks)."""
        rest = {k: v for k, v in kwargs.items() if k not in ("return_type", "loss_per_token", "fwd_hooks")}
        return _key(("resid", self._hook, rest), tokens)

    def _splice_from_hook(self, tokens: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """SAEBench's splice answered from the kept residual (module docstring), or None when it is not one
        (another hook, other arguments) or no residual is kept for ``tokens``."""
        hooks = kwargs.get("fwd_hooks") or []
        rest = {k: v for k, v in kwargs.items() if k not in ("return_type", "loss_per_token", "fwd_hooks")}
        if self._hook is None or args or rest or len(hooks) != 1 or not isinstance(tokens, torch.Tensor):
            return None
        name, fn = hooks[0]
        if name != self._hook or getattr(getattr(fn, "func", fn), "__qualname__", None) not in SPLICE_HOOKS:
            return None
        resid = self._memo.get(self._resid_key(tokens, kwargs))  # type: ignore[arg-type]
        if resid is None:
            return None
        spliced = fn(resid.clone(), hook=self._model.hook_dict[name])
        _, toks, pos_embed, mask = self._model.input_to_embed(tokens)
        self.stats.started_at_hook += 1
        return self._model(
            spliced,
            start_at_layer=self._start,
            tokens=toks,
            shortformer_pos_embed=pos_embed,
            attention_mask=mask,
            return_type=kwargs.get("return_type", "logits"),
            loss_per_token=kwargs.get("loss_per_token", False),
        )

    # ---- across runs --------------------------------------------------------------------------------------
    def save(self, folder: Path) -> list[Path]:
        """Write every stored result to ``folder`` (one ``<sha256 of its key>`` :data:`FORWARD_SUFFIX` file
        each, written atomically; files already there are kept); returns the files written."""
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for key, out in self._memo.items():
            path = folder / f"{hashlib.sha256(repr(key).encode()).hexdigest()[:32]}{FORWARD_SUFFIX}"
            if not path.exists():
                blob = {"key": repr(key), "out": _plain(out)}
                atomic_write(path, lambda tmp, blob=blob: torch.save(blob, tmp))
                written.append(path)
        return written

    def load(self, folder: Path) -> int:
        """Read the results :meth:`save` wrote into ``folder`` (as far as the cap allows); returns how many."""
        n = 0
        for path in sorted(folder.glob(f"*{FORWARD_SUFFIX}")) if folder.is_dir() else []:
            blob = torch.load(path, map_location=_device(self._model), weights_only=True)
            key = _unrepr(blob["key"])
            if self._store(key, _rebuilt(blob["out"], self._model)):
                n += 1
        self.stats.loaded += n
        return n


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


_CACHE_TAG = "__activation_cache__"


def _plain(out: Any) -> Any:
    """``out`` as tensors, tuples, lists and dicts only (a TransformerLens ``ActivationCache`` becomes a tagged
    dict; a NamedTuple a tuple tagged with its type's name), so that ``torch.load(weights_only=True)`` reads it."""
    cache = getattr(out, "cache_dict", None)
    if isinstance(cache, dict):
        return {_CACHE_TAG: dict(cache), "has_batch_dim": bool(out.has_batch_dim)}
    if isinstance(out, tuple):
        values = [_plain(v) for v in out]
        return {"__namedtuple__": type(out).__name__, "values": values} if hasattr(out, "_fields") else tuple(values)
    if isinstance(out, list):
        return [_plain(v) for v in out]
    if isinstance(out, dict):
        return {k: _plain(v) for k, v in out.items()}
    return out


def _rebuilt(out: Any, model: Any) -> Any:
    """The inverse of :func:`_plain` (``model``: the wrapped TransformerLens model the caches belong to)."""
    if isinstance(out, dict) and _CACHE_TAG in out:
        from transformer_lens import ActivationCache

        return ActivationCache(out[_CACHE_TAG], model, has_batch_dim=out["has_batch_dim"])
    if isinstance(out, dict) and "__namedtuple__" in out:
        from transformer_lens.HookedTransformer import Output

        if out["__namedtuple__"] != Output.__name__:
            raise ValueError(f"stored forward of unknown type {out['__namedtuple__']!r}")
        return Output(*[_rebuilt(v, model) for v in out["values"]])
    if isinstance(out, tuple):
        return tuple(_rebuilt(v, model) for v in out)
    if isinstance(out, list):
        return [_rebuilt(v, model) for v in out]
    if isinstance(out, dict):
        return {k: _rebuilt(v, model) for k, v in out.items()}
    return out


def _unrepr(text: str) -> tuple[Any, ...]:
    """A key :meth:`SharedForwards.save` wrote with ``repr`` (nested tuples of str, int, float, bool, None)."""
    import ast

    key = ast.literal_eval(text)
    if not isinstance(key, tuple):
        raise ValueError(f"stored forward key is not a tuple: {text[:80]!r}")
    return key


def _device(model: Any) -> Any:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "device", None) or "cpu"
