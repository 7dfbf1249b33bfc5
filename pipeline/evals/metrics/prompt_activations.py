"""Absorption's LLM runs on its prompts, made once: the activations at the hook kept for every SAE and every run.

SAEBench's absorption reads the residual stream at ``blocks.<L>.hook_resid_post`` of lists of prompt strings with
``model.run_with_cache(prompts, names_filter=[hook])``: while training its first-letter probe
(``probing.gen_and_save_df_acts_probing``) and, for every SAE, in its feature-absorption experiment
(``FeatureAbsorptionCalculator.calculate_absorption``), which encodes those activations with the SAE. The prompts
do not depend on the SAE (their in-context examples are drawn from ``random``, which
:func:`~pipeline.evals.metrics.rng_pinning.pinned_absorption_rng` seeds before each SAE's experiment), so the LLM
work is the same for every SAE.

:class:`PromptActivations` wraps the model SAEBench gets and answers exactly that call:

* from memory when the same prompts were run before (this run, or a run whose results :meth:`save` wrote into the
  shared eval cache and :meth:`load` read back);
* otherwise by running the model only up to the hook (``stop_at_layer``): the activations are those of the full
  forward (the same blocks on the same tokens), without the blocks above and the unembedding.

It returns ``(None, cache)``: both SAEBench callers read only the cache, and a caller that read the logits would
fail on ``None`` instead of reading something else. Any other call (other arguments, other hooks, token tensors)
goes to the model unchanged. A hit returns a copy, so a caller that edits it cannot change a later answer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.evals.metrics.shared_forwards import RoundedStats, resid_hook_start
from pipeline.utils.atomic import atomic_write

#: Suffix of the files :meth:`PromptActivations.save` writes.
ACTS_SUFFIX = ".prompt_acts.pt"


@dataclass
class PromptStats(RoundedStats):
    """What :class:`PromptActivations` did over one evaluation."""

    runs: int = 0
    """Prompt lists the model ran (up to the hook)."""
    reused: int = 0
    """Prompt lists answered from memory."""
    passed_on: int = 0
    """Calls of another form, passed to the model unchanged."""
    not_stored: int = 0
    """Results left unstored because they would overflow the cap."""
    loaded: int = 0
    """Stored results read from disk."""
    stored_mb: float = 0.0
    """Memory held by the stored activations (MiB)."""


class PromptActivations:
    """``model`` with ``run_with_cache(prompts, names_filter=[hook])`` on lists of strings answered once (module
    docstring); every other attribute is the wrapped model's. ``cap_mb``: the most memory the kept activations
    may hold (0: nothing kept, every call runs to the hook)."""

    def __init__(self, model: Any, cap_mb: float):
        self._model, self._cap = model, float(cap_mb) * 2**20
        self._memo: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self.stats = PromptStats()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def run_with_cache(self, prompts: Any, *args: Any, **kwargs: Any) -> Any:
        hook = _one_resid_hook(prompts, args, kwargs)
        if hook is None:
            self.stats.passed_on += 1
            return self._model.run_with_cache(prompts, *args, **kwargs)
        from transformer_lens import ActivationCache

        key = prompt_key(hook, prompts)
        acts = self._memo.get(key)
        if acts is not None:
            self.stats.reused += 1
            return None, ActivationCache({hook: acts.clone()}, self._model)
        stop = resid_hook_start(hook)
        _, cache = self._model.run_with_cache(prompts, names_filter=[hook], stop_at_layer=stop)
        self.stats.runs += 1
        if not self._store(key, cache[hook]):
            self.stats.not_stored += 1
        return None, cache

    def _store(self, key: str, acts: torch.Tensor) -> bool:
        size = acts.numel() * acts.element_size()
        if self._bytes + size > self._cap:
            return False
        if key not in self._memo:
            self._memo[key] = acts.detach().clone()
            self._bytes += size
            self.stats.stored_mb = self._bytes / 2**20
        return True

    def save(self, folder: Path) -> list[Path]:
        """Write every kept result into ``folder`` (``<key>`` :data:`ACTS_SUFFIX`, atomically; files already
        there are kept); returns the files written."""
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for key, acts in self._memo.items():
            path = folder / f"{key}{ACTS_SUFFIX}"
            if not path.exists():
                blob = {"key": key, "acts": acts}
                atomic_write(path, lambda tmp, blob=blob: torch.save(blob, tmp))
                written.append(path)
        return written

    def load(self, folder: Path) -> int:
        """Read what :meth:`save` wrote into ``folder`` (as far as the cap allows); returns how many."""
        n = 0
        device = getattr(getattr(self._model, "cfg", None), "device", None) or "cpu"
        for path in sorted(folder.glob(f"*{ACTS_SUFFIX}")) if folder.is_dir() else []:
            blob = torch.load(path, map_location=device, weights_only=True)
            if path.name != f"{blob['key']}{ACTS_SUFFIX}":
                raise ValueError(f"{path}: its key {blob['key']!r} does not match its name")
            if self._store(blob["key"], blob["acts"]):
                n += 1
        self.stats.loaded += n
        return n


def prompt_key(hook: str, prompts: list[str]) -> str:
    """sha256 (hex) of the hook and the prompt strings, in order."""
    return hashlib.sha256(json.dumps([hook, prompts], ensure_ascii=False).encode()).hexdigest()


def _one_resid_hook(prompts: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The hook of a call this wrapper answers (a list of strings, ``names_filter=[one residual-stream hook]`` and
    nothing else), or None."""
    names = kwargs.get("names_filter")
    if args or set(kwargs) != {"names_filter"} or not isinstance(names, list) or len(names) != 1:
        return None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        return None
    return names[0] if isinstance(names[0], str) and resid_hook_start(names[0]) is not None else None


__all__ = ["ACTS_SUFFIX", "PromptActivations", "PromptStats", "prompt_key"]
