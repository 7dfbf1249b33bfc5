"""How a baseline is matched to the dictionary it is compared with: the budget and the width.

The dictionary's fit spends wall time, samples and updates (:class:`~pipeline.core.spend.FitSpend`, read from
its history);
:class:`CompareConfig` (the ``compare`` config node) says which of them a baseline gets, and
:func:`matched_budget` turns that into a trainer :class:`~pipeline.baselines.config.Budget`:

=============== ======================================================================================
``equal_time``  ``factor`` × the dictionary's fit wall time (the default: what a user with that machine
                time would get), on the baseline's device (a different device is recorded and warned about);
                a fit on N data-parallel ranks gives N × its wall time (device-seconds)
``equal_samples`` ``factor`` × the samples the dictionary's fit coded
``steps``       ``steps`` optimiser steps
``converged``   until the held-out FVU stops improving (``check_every``, ``rel_tol``, ``patience``), at most
                ``steps`` (default :data:`CONVERGED_STEP_CAP`)
=============== ======================================================================================

Width: a non-negative dictionary of K atoms has K decoder directions; a signed one is compared as a ± split,
2K directions (SAEBench sees ``W_dec = [D; -D]``). ``width="atoms"`` trains baselines with K latents,
``width="directions"`` with as many latents as the dictionary has decoder directions (2K when signed); both
at the dictionary's k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.baselines.config import Budget
from pipeline.core.spend import FitSpend

#: Budget modes of the comparison.
COMPARE_BUDGETS = ("equal_time", "equal_samples", "steps", "converged")
#: Widths a baseline can be matched at.
COMPARE_WIDTHS = ("atoms", "directions")
#: Step cap of a ``converged`` budget when ``compare.steps`` is not set.
CONVERGED_STEP_CAP = 100_000


@dataclass
class CompareConfig:
    """The ``compare`` node: how every baseline is matched to the dictionary."""

    budget: str = "equal_time"
    """``equal_time`` (the dictionary's fit wall time), ``equal_samples``, ``steps`` or ``converged``."""
    factor: float = 1.0
    """``equal_time`` / ``equal_samples``: multiple of the dictionary's time / samples (5 = five times longer)."""
    steps: int | None = None
    """``steps``: the optimiser steps; ``converged``: the cap (None: :data:`CONVERGED_STEP_CAP`)."""
    check_every: int = 100
    """``converged``: optimiser steps between held-out FVU checks."""
    rel_tol: float = 1e-3
    """``converged``: a check improves when FVU < best × (1 − rel_tol)."""
    patience: int = 3
    """``converged``: checks in a row without improvement that end training."""
    batch_size: int | None = None
    """Samples per optimiser step of every baseline (None: each architecture's own, ``conf/baseline/*.yaml``).
    On short CPU budgets smaller batches win: more steps in the same time (docs/sae-lens-baselines.md)."""
    width: str = "atoms"
    """``atoms``: baselines get K latents; ``directions``: as many as the dictionary's decoder directions
    (2K for a signed dictionary, exported as a ± split; K otherwise)."""

    def validate(self) -> None:
        """``ValueError`` naming ``compare.<key>`` for a value no budget can use."""
        if self.budget not in COMPARE_BUDGETS:
            raise ValueError(f"compare.budget={self.budget!r} is not one of {', '.join(COMPARE_BUDGETS)}.")
        if self.width not in COMPARE_WIDTHS:
            raise ValueError(f"compare.width={self.width!r} is not one of {', '.join(COMPARE_WIDTHS)}.")
        if not self.factor > 0:
            raise ValueError(f"compare.factor={self.factor} must be > 0.")
        if self.budget == "steps" and (self.steps is None or self.steps < 1):
            raise ValueError("compare.budget=steps needs compare.steps >= 1 (the optimiser steps of each baseline).")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"compare.batch_size={self.batch_size} must be >= 1 (or null).")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"compare.steps={self.steps} must be >= 1 (or null).")
        if self.check_every < 1 or self.patience < 1 or self.rel_tol < 0:
            raise ValueError(
                f"compare.check_every={self.check_every} and compare.patience={self.patience} must "
                f"be >= 1, compare.rel_tol={self.rel_tol} >= 0."
            )


def matched_budget(compare: CompareConfig, spend: FitSpend) -> Budget:
    """The trainer budget of every baseline under ``compare`` against the dictionary's ``spend``."""
    compare.validate()
    if compare.budget == "equal_time":
        return Budget("time", seconds=compare.factor * spend.seconds * spend.ranks)
    if compare.budget == "equal_samples":
        return Budget("samples", samples=max(1, round(compare.factor * spend.samples)))
    if compare.budget == "steps":
        return Budget("steps", steps=compare.steps)
    return Budget(
        "converged",
        steps=compare.steps or CONVERGED_STEP_CAP,
        check_every=compare.check_every,
        rel_tol=compare.rel_tol,
        patience=compare.patience,
    )


def comparison_width(compare: CompareConfig, n_atoms: int, signed: bool) -> int:
    """Latents of every baseline: K, or the dictionary's decoder directions (2K when ``signed``)."""
    return 2 * n_atoms if compare.width == "directions" and signed else n_atoms


def budget_summary(
    compare: CompareConfig, spend: FitSpend, *, seconds: float, samples: int, steps: int, device: str
) -> dict[str, Any]:
    """A baseline's ``budget`` entry in ``saes.json``: what it was matched to and what it spent."""
    return {
        "mode": compare.budget,
        "factor": compare.factor,
        "seconds": seconds,
        "samples": samples,
        "steps": steps,
        "device": device,
        "target_seconds": compare.factor * spend.seconds * spend.ranks if compare.budget == "equal_time" else None,
        "target_samples": round(compare.factor * spend.samples) if compare.budget == "equal_samples" else None,
        "dictionary_device": spend.device,
        "dictionary_ranks": spend.ranks,
    }


__all__ = [
    "COMPARE_BUDGETS",
    "COMPARE_WIDTHS",
    "CompareConfig",
    "FitSpend",
    "budget_summary",
    "comparison_width",
    "matched_budget",
]
