"""What to train (:class:`BaselineSpec`) and for how long (:class:`Budget`).

Defaults follow sae-lens 6.54's own defaults and documentation (its page ``training_saes.md``: the tutorial run and
the per-architecture examples) and, where sae-lens says nothing, SAEBench's published suites (trained with
``dictionary_learning_demo/demo_config.py``); each field's docstring names its source. Two kinds of setting need
the run's optimiser-step count (the lr decay and the sparsity-penalty warm-up, both fractions of the steps):
under a ``steps`` or ``samples`` budget that count is known before training; under ``time`` and ``converged``
it is not, so their ``None`` defaults resolve to 0 there, and an explicit non-zero value is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: The sae-lens training architectures this package trains (sae-lens's own registry names).
ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "standard", "matching_pursuit")
#: Budget modes: a fixed number of optimiser steps, of samples, of wall seconds, or until held-out FVU stalls.
BUDGET_MODES = ("steps", "samples", "time", "converged")
#: The :class:`Budget` fields each mode reads, the one it requires first.
BUDGET_FIELDS = {
    "steps": ("steps",),
    "samples": ("samples",),
    "time": ("seconds",),
    "converged": ("steps", "check_every", "rel_tol", "patience"),
}
#: ``normalize_activations`` values this package supports (the trainer estimates the factor and folds it in).
NORMALIZATIONS = ("none", "expected_average_only_in")
#: Smallest Matryoshka level of the default widths: 2^8, as DB-KSVD's Matryoshka groups (pipeline.core.matryoshka).
MATRYOSHKA_FIRST_WIDTH = 2**8
#: lr decay over the last 20% of steps: sae-lens tutorial (``lr_decay_steps = total_training_steps // 5``),
#: SAEBench suites (``DECAY_START_FRACTION = 0.8``).
DEFAULT_LR_DECAY_FRACTION = 0.2
#: L1 warm-up over the first 5% of steps (sae-lens tutorial: ``l1_warm_up_steps = total_training_steps // 20``).
DEFAULT_L1_WARM_UP_FRACTION = 0.05


@dataclass
class BaselineSpec:
    """How to train one SAE baseline with sae-lens's trainer (the width and k come with the call)."""

    architecture: str = "topk"
    """One of :data:`ARCHITECTURES`: ``topk`` (Gao et al.), ``batchtopk``, ``matryoshka_batchtopk``,
    ``jumprelu``, ``standard`` (ReLU + L1) or ``matching_pursuit`` (MP-SAE, tied encoder)."""
    lr: float = 3e-4
    """Adam learning rate (sae-lens ``LanguageModelSAERunnerConfig.lr`` default)."""
    batch_size: int = 4096
    """Samples per optimiser step (sae-lens ``train_batch_size_tokens`` default and tutorial). At short CPU
    budgets smaller batches win (docs/sae-lens-baselines.md: 1024 beats 4096 at equal time)."""
    lr_warm_up_steps: int = 0
    """Linear lr warm-up steps (sae-lens default and tutorial)."""
    lr_decay_fraction: float | None = None
    """Share of the steps, at the end, over which the lr decays linearly to 0 (sae-lens ``lr_decay_steps``).
    None: :data:`DEFAULT_LR_DECAY_FRACTION` under a steps/samples budget, 0 under time/converged."""
    dead_feature_window: int = 1000
    """Steps without firing after which a latent is dead (drives TopK's AuxK loss; sae-lens default)."""
    normalize_activations: str | None = None
    """sae-lens input normalisation, ``"none"`` or ``"expected_average_only_in"`` (scale to mean norm
    sqrt(d_in) during training, folded into the weights at the end). None: ``expected_average_only_in`` for
    ``standard`` and ``jumprelu`` (sae-lens docs' examples for both), ``"none"`` otherwise (sae-lens default)."""
    b_dec_init: str = "mean"
    """``"mean"``: start ``b_dec`` at the training data's mean (what sae-lens 5's runner did with
    ``b_dec_init_method``; 0.234 -> 0.198 held-out FVU in docs/sae-lens-baselines.md); ``"zeros"``: as the
    sae-lens training class initialises it."""
    l1_coefficient: float = 5.0
    """``standard``: L1 penalty weight (sae-lens docs and tutorial)."""
    sparsity_warm_up_fraction: float | None = None
    """``standard`` / ``jumprelu``: share of the steps over which the sparsity penalty ramps up from 0. None:
    :data:`DEFAULT_L1_WARM_UP_FRACTION` for ``standard`` (sae-lens tutorial), 0 for ``jumprelu`` (sae-lens
    default; its docs set none for the quadratic loss); 0 under time/converged budgets."""
    jumprelu_sparsity_loss_mode: str = "quadratic"
    """``jumprelu``: ``"quadratic"`` pulls L0 towards ``target_l0 = k`` (Gemma Scope 2, in the sae-lens docs),
    so the baseline sits at the comparison's L0; ``"step"`` (DeepMind) or ``"tanh"`` (Anthropic) penalise L0."""
    l0_coefficient: float = 5.0
    """``jumprelu``: weight of the L0 loss (sae-lens docs' examples, all modes)."""
    jumprelu_bandwidth: float = 0.01
    """``jumprelu``: straight-through-estimator bandwidth (sae-lens docs' step and quadratic examples)."""
    jumprelu_init_threshold: float = 0.01
    """``jumprelu``: initial threshold (sae-lens docs' step and quadratic examples)."""
    matryoshka_widths: list[int] | None = None
    """``matryoshka_batchtopk``: the nested prefix widths, strictly increasing, ending at the width (sae-lens
    ``matryoshka_widths``). None: 2^8, 2^9, ... below the width, then the width (the Matryoshka paper's and our
    DB-KSVD groups, :mod:`pipeline.core.matryoshka`)."""
    mp_residual_threshold: float = 0.0
    """``matching_pursuit``: stop a sample's pursuit when its residual norm falls below this (input units).
    0 with ``mp_max_iterations = k``: the sae-lens docs' "serial TopK" set-up (Overcomplete's MP-SAE)."""
    mp_max_iterations: int | None = None
    """``matching_pursuit``: pursuit steps per sample (L0 <= this); None: k."""
    seed: int = 0
    """Seed of the SAE's initialisation and of the sample order."""
    device: str | None = None
    """Where to train: None/"auto" for CUDA when available, else CPU."""
    sae_options: dict[str, Any] = field(default_factory=dict)
    """Further fields of the architecture's sae-lens training config (e.g. ``aux_loss_coefficient``)."""
    trainer_options: dict[str, Any] = field(default_factory=dict)
    """Further fields of ``sae_lens.config.SAETrainerConfig`` (e.g. ``adam_beta2``, ``lr_scheduler_name``)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r} is not one of {', '.join(ARCHITECTURES)}.")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0.")
        if self.batch_size < 1 or self.lr_warm_up_steps < 0 or self.dead_feature_window < 1:
            raise ValueError(
                f"batch_size={self.batch_size} and dead_feature_window={self.dead_feature_window} "
                f"must be >= 1, lr_warm_up_steps={self.lr_warm_up_steps} >= 0."
            )
        for name in ("lr_decay_fraction", "sparsity_warm_up_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name}={value} must be in [0, 1) (a share of the optimiser steps).")
        if self.normalize_activations is not None and self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} is not one of "
                f"{', '.join(NORMALIZATIONS)} (or None for the architecture's default)."
            )
        if self.b_dec_init not in ("mean", "zeros"):
            raise ValueError(f"b_dec_init={self.b_dec_init!r} must be 'mean' or 'zeros'.")
        if self.mp_max_iterations is not None and self.mp_max_iterations < 1:
            raise ValueError(f"mp_max_iterations={self.mp_max_iterations} must be >= 1 (or None for k).")

    def normalization(self) -> str:
        """The resolved ``normalize_activations`` (see the field)."""
        if self.normalize_activations is not None:
            return self.normalize_activations
        return "expected_average_only_in" if self.architecture in ("standard", "jumprelu") else "none"

    def widths(self, width: int) -> list[int]:
        """The Matryoshka prefix widths for an SAE of ``width`` latents (see ``matryoshka_widths``)."""
        if self.matryoshka_widths is not None:
            widths = [int(w) for w in self.matryoshka_widths]
        else:
            widths = [
                MATRYOSHKA_FIRST_WIDTH * 2**i
                for i in range(max(0, math.ceil(math.log2(width / MATRYOSHKA_FIRST_WIDTH))))
            ]
            widths = [w for w in widths if w < width] + [width]
        if widths[-1] != width or any(a >= b for a, b in zip(widths, widths[1:])) or widths[0] < 1:
            raise ValueError(
                f"matryoshka_widths={widths} must be strictly increasing positive widths ending at "
                f"the SAE's width {width}."
            )
        return widths


@dataclass
class Budget:
    """How long a baseline trains. ``steps``: exactly ``steps`` optimiser steps. ``samples``: ``samples``
    rounded down to whole batches (at least one). ``time``: steps until ``seconds`` of wall time have passed
    since :func:`~pipeline.baselines.train.train_baseline` was called (set-up included, held-out
    evaluation not), checked after each step. ``converged``: every ``check_every`` steps the held-out FVU is
    measured; training stops once it has failed ``patience`` times in a row to beat the best so far by a
    relative ``rel_tol``, or at ``steps``."""

    mode: str = "steps"
    """One of :data:`BUDGET_MODES`."""
    steps: int | None = None
    """``steps``: the optimiser steps; ``converged``: the cap."""
    samples: int | None = None
    """``samples``: the training samples (rounded down to whole batches)."""
    seconds: float | None = None
    """``time``: the wall-clock budget in seconds."""
    check_every: int = 100
    """``converged``: optimiser steps between held-out checks."""
    rel_tol: float = 1e-3
    """``converged``: a check improves when FVU < best * (1 - rel_tol)."""
    patience: int = 3
    """``converged``: checks in a row without improvement that end training."""

    def __post_init__(self) -> None:
        if self.mode not in BUDGET_FIELDS:
            raise ValueError(f"budget mode={self.mode!r} is not one of {', '.join(BUDGET_MODES)}.")
        need = BUDGET_FIELDS[self.mode][0]
        value = getattr(self, need)
        if value is None or not value > 0:
            raise ValueError(f"a {self.mode!r} budget needs {need} > 0, got {value!r}.")
        if self.check_every < 1 or self.patience < 1 or self.rel_tol < 0:
            raise ValueError(
                f"check_every={self.check_every} and patience={self.patience} must be >= 1, "
                f"rel_tol={self.rel_tol} >= 0."
            )

    def describe(self) -> dict[str, Any]:
        """The mode and the fields it reads (what a log line shows)."""
        return {"mode": self.mode, **{f: getattr(self, f) for f in BUDGET_FIELDS[self.mode]}}

    def known_steps(self, batch_size: int) -> int | None:
        """The optimiser steps this budget fixes in advance (None for ``time`` / ``converged``)."""
        if self.mode == "steps":
            return int(self.steps)
        if self.mode == "samples":
            return max(1, int(self.samples) // batch_size)
        return None


__all__ = ["ARCHITECTURES", "BUDGET_MODES", "NORMALIZATIONS", "BaselineSpec", "Budget"]
