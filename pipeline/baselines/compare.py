"""How a baseline is matched to the dictionary it is compared with: the budget and the width.

The dictionary's fit spends wall time, samples and updates (:class:`~pipeline.core.spend.FitSpend`, read from
its history);
:class:`CompareConfig` (the ``compare`` config node) says which of them a baseline gets, and
:func:`matched_budget` turns that into a trainer :class:`~pipeline.baselines.config.Budget`:

=============== ======================================================================================
``plateau``     (the default) until the baseline's held-out curve flattens (``plateau_threshold``), at most
                ``cap_samples`` (and ``cap_seconds`` if set); the report then states time-to-quality: how
                long each SAE needed to reach the dictionary's held-out FVU, and where each one stopped
``equal_time``  ``factor`` × the dictionary's fit wall time, on the baseline's device (a different device is
                recorded and warned about); a fit on N data-parallel ranks gives N × its wall time
``equal_samples`` ``factor`` × the samples the dictionary's fit coded
``steps``       ``steps`` optimiser steps
=============== ======================================================================================

Every budget trains with sae-lens's lr shape (warm-up, constant, linear decay over the last 20%) and a
dead-latent window scaled to the run (:mod:`pipeline.baselines.control`).

Width: a non-negative dictionary of K atoms has K decoder directions; a signed one is compared as a ± split,
2K directions (SAEBench sees ``W_dec = [D; -D]``). ``width="atoms"`` trains baselines with K latents,
``width="directions"`` with as many latents as the dictionary has decoder directions (2K when signed); both
at the dictionary's k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.baselines.config import DEFAULT_PLATEAU_L0_THRESHOLD, DEFAULT_PLATEAU_THRESHOLD, Budget
from pipeline.core.spend import FitSpend

#: Budget modes of the comparison.
COMPARE_BUDGETS = ("plateau", "equal_time", "equal_samples", "steps")
#: Widths a baseline can be matched at.
COMPARE_WIDTHS = ("atoms", "directions")


@dataclass
class CompareConfig:
    """The ``compare`` node: how every baseline is matched to the dictionary."""

    budget: str = "plateau"
    """``plateau`` (train to the curve's plateau or the cap), ``equal_time`` (the dictionary's fit wall time),
    ``equal_samples`` or ``steps``."""
    factor: float = 1.0
    """``equal_time`` / ``equal_samples``: multiple of the dictionary's time / samples (5 = five times longer)."""
    steps: int | None = None
    """``steps``: the optimiser steps of each baseline."""
    cap_samples: int = 2**21
    """``plateau``: the most training samples a baseline sees (its lr decays over the last 20% of them when the
    curve has not flattened first)."""
    cap_seconds: float | None = None
    """``plateau``: an optional cap on each baseline's training seconds as well (None: samples only, so that
    where a run stops does not depend on the machine's speed)."""
    plateau_threshold: float = DEFAULT_PLATEAU_THRESHOLD
    """``plateau``: the curve has flattened when held-out FVU improved by less than this share of itself over
    the last doubling of the samples."""
    plateau_l0_threshold: float = DEFAULT_PLATEAU_L0_THRESHOLD
    """``plateau``: ... and held-out L0 moved by less than this share of itself (either way) over that doubling (an
    L0-penalised SAE trades FVU for sparsity while L0 still moves: :mod:`pipeline.baselines.control`)."""
    plateau_min_samples: int = 2**18
    """``plateau``: samples before the rule is first applied."""
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
        if self.cap_samples < 1 or self.plateau_min_samples < 0:
            raise ValueError(
                f"compare.cap_samples={self.cap_samples} must be >= 1 and compare.plateau_min_samples="
                f"{self.plateau_min_samples} >= 0."
            )
        if self.cap_seconds is not None and not (math.isfinite(self.cap_seconds) and self.cap_seconds > 0):
            raise ValueError(f"compare.cap_seconds={self.cap_seconds} must be a number of seconds > 0 (or null).")
        if not (math.isfinite(self.plateau_threshold) and self.plateau_threshold >= 0):
            raise ValueError(
                f"compare.plateau_threshold={self.plateau_threshold} must be a finite share >= 0 (e.g. 0.01: "
                "less than 1% better per doubling of samples counts as flat)."
            )
        if not (math.isfinite(self.plateau_l0_threshold) and self.plateau_l0_threshold >= 0):
            raise ValueError(
                f"compare.plateau_l0_threshold={self.plateau_l0_threshold} must be a finite share >= 0 (e.g. 0.05: "
                "L0 moving by less than 5% per doubling of samples counts as settled)."
            )
        if not math.isfinite(self.factor):
            raise ValueError(f"compare.factor={self.factor} must be a finite number > 0.")


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
        "plateau",
        samples=compare.cap_samples,
        seconds=compare.cap_seconds,
        threshold=compare.plateau_threshold,
        l0_threshold=compare.plateau_l0_threshold,
        min_samples=compare.plateau_min_samples,
    )


def comparison_width(compare: CompareConfig, n_atoms: int, signed: bool) -> int:
    """Latents of every baseline: K, or the dictionary's decoder directions (2K when ``signed``)."""
    return 2 * n_atoms if compare.width == "directions" and signed else n_atoms


#: Fields of a baseline's ``record.json`` that say how its training went, copied into its budget summary.
TRAINING_FACTS = (
    "stop_reason",
    "flattened",
    "improvement_per_doubling",
    "l0_change_per_doubling",
    "decay_start_step",
    "dead_window_steps",
    "dead_mask_steps",
    "final_lr",
)


def budget_summary(compare: CompareConfig, spend: FitSpend, record: dict[str, Any]) -> dict[str, Any]:
    """A baseline's ``budget`` entry in ``saes.json``: what it was matched to, what it spent (from its
    ``record.json`` dict), how it trained (lr, schedule, why it stopped, whether its curve had flattened)."""
    spec = record.get("spec") or {}
    return {
        "mode": compare.budget,
        "factor": compare.factor,
        "seconds": record["seconds"],
        "samples": record["samples"],
        "steps": record["steps"],
        "device": record.get("device") or "?",
        "target_seconds": compare.factor * spend.seconds * spend.ranks if compare.budget == "equal_time" else None,
        "target_samples": round(compare.factor * spend.samples) if compare.budget == "equal_samples" else None,
        "cap_samples": compare.cap_samples if compare.budget == "plateau" else None,
        "cap_seconds": compare.cap_seconds if compare.budget == "plateau" else None,
        "plateau_threshold": compare.plateau_threshold if compare.budget == "plateau" else None,
        "plateau_l0_threshold": compare.plateau_l0_threshold if compare.budget == "plateau" else None,
        "dictionary_device": spend.device,
        "dictionary_ranks": spend.ranks,
        "lr": spec.get("lr"),
        "batch_size": spec.get("batch_size"),
        "lr_decay_fraction": spec.get("lr_decay_fraction"),
        **{key: record.get(key) for key in TRAINING_FACTS},
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
