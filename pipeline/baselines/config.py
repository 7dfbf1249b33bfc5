"""What to train (:class:`BaselineSpec`) and for how long (:class:`Budget`).

Defaults follow sae-lens 6.54's own defaults and documentation (its page ``training_saes.md``: the tutorial run and
the per-architecture examples) and, where sae-lens says nothing, SAEBench's published suites (trained with
``dictionary_learning_demo/demo_config.py``); each field's docstring names its source.

The lr schedule has sae-lens's shape under every budget: linear warm-up over ``lr_warm_up_steps``, constant,
then a linear decay to 0 over the last ``lr_decay_fraction`` of the run. Under ``steps`` / ``samples`` the run's
length is known and sae-lens's own scheduler places the decay; under ``time`` the decay covers the last
fraction of the *seconds* (the lr follows the elapsed share of the budget); under ``plateau`` the run's length
is found while training, so the decay starts when the curve has flattened (or near the cap) and lasts
``fraction / (1 − fraction)`` of the run so far: the same share of the whole run (a warm-up–stable–decay run).
The sparsity-penalty warm-up of ``standard`` / ``jumprelu`` is a share of the steps and needs them in advance,
so under ``time`` / ``plateau`` its ``None`` default resolves to 0 and an explicit value is refused.

The dead-latent window (what sae-lens's AuxK and pre-activation losses act on) is set in samples and scaled to
the run (:meth:`BaselineSpec.dead_window_samples_for`), so that it acts in short runs too; sae-lens's own
default, 1,000 steps, is longer than a whole short run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: The sae-lens training architectures this package trains (sae-lens's own registry names).
ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "standard", "matching_pursuit")
#: Budget modes: a fixed number of optimiser steps, of samples, of wall seconds, or until the held-out curve
#: flattens (within a cap).
BUDGET_MODES = ("steps", "samples", "time", "plateau")
#: The :class:`Budget` fields each mode reads, the one it requires first.
BUDGET_FIELDS = {
    "steps": ("steps",),
    "samples": ("samples",),
    "time": ("seconds",),
    "plateau": ("samples", "seconds", "threshold", "min_samples"),
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
#: Shortest dead-latent window, in samples, whatever the run's length: at a typical L0/width of 1/64 a latent
#: firing at 1% of the average rate still fires ~2.5 times in it, so silence over it means dead.
MIN_DEAD_WINDOW_SAMPLES = 2**14
#: Longest dead-latent window as a share of the run, whatever the other bounds say: the last 3/4 of any run, however
#: short, can revive latents.
MAX_DEAD_WINDOW_SHARE = 0.25
#: A ``plateau`` budget's default threshold: the curve has flattened when held-out FVU improved by less than 1%
#: of itself over the last doubling of the samples.
DEFAULT_PLATEAU_THRESHOLD = 0.01
#: A ``plateau`` budget's default L0 threshold: a curve has not flattened while its held-out L0 still moves by 5%
#: or more of itself per doubling of the samples (an L0-penalised SAE, JumpReLU or Standard, trades FVU for L0
#: as it goes: its FVU can rise while L0 falls, which the FVU rule alone reads as flat).
DEFAULT_PLATEAU_L0_THRESHOLD = 0.05


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
    """Share of the run, at the end, over which the lr decays linearly to 0 (sae-lens ``lr_decay_steps``; of
    the seconds under a ``time`` budget, of the whole run under ``plateau``: see the module docstring).
    None: :data:`DEFAULT_LR_DECAY_FRACTION`."""
    dead_window_fraction: float = 0.05
    """The dead-latent window as a share of the run's samples (of the budget's, when known in advance; of the
    samples trained so far under ``plateau``), at least :data:`MIN_DEAD_WINDOW_SAMPLES`, at most
    ``dead_window_samples`` and :data:`MAX_DEAD_WINDOW_SHARE` of the run. A latent that has not fired for that
    long is dead: TopK-family AuxK and JumpReLU's pre-activation loss act on it. 5% is of the order of the
    field's windows (Gao et al.: 10 M tokens; sae-lens: 1,000 steps) relative to their runs' lengths."""
    dead_window_samples: int = 4096 * 1000
    """The longest dead-latent window, in samples: sae-lens's default window (1,000 steps) at its default batch
    of 4,096."""
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
    default; its docs set none for the quadratic loss); 0 under time/plateau budgets."""
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
        if self.batch_size < 1 or self.lr_warm_up_steps < 0 or self.dead_window_samples < 1:
            raise ValueError(
                f"batch_size={self.batch_size} and dead_window_samples={self.dead_window_samples} "
                f"must be >= 1, lr_warm_up_steps={self.lr_warm_up_steps} >= 0."
            )
        if not 0 < self.dead_window_fraction <= 1:
            raise ValueError(f"dead_window_fraction={self.dead_window_fraction} must be in (0, 1].")
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

    def decay_fraction(self) -> float:
        """The resolved ``lr_decay_fraction``."""
        return DEFAULT_LR_DECAY_FRACTION if self.lr_decay_fraction is None else float(self.lr_decay_fraction)

    def dead_window_samples_for(self, run_samples: float) -> int:
        """The dead-latent window in samples for a run of ``run_samples``: ``dead_window_fraction`` of it, at
        least :data:`MIN_DEAD_WINDOW_SAMPLES`, at most ``dead_window_samples`` and at most
        :data:`MAX_DEAD_WINDOW_SHARE` of the run."""
        window = max(self.dead_window_fraction * run_samples, MIN_DEAD_WINDOW_SAMPLES)
        return int(min(window, self.dead_window_samples, MAX_DEAD_WINDOW_SHARE * run_samples))

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
    evaluation not), checked after each step. ``plateau``: until the held-out curve has flattened (improved by
    less than ``threshold`` of itself over the last doubling of the samples, judged from ``min_samples`` on),
    or until the cap (``samples``, and ``seconds`` if set) is near; then the lr decays (module docstring)."""

    mode: str = "steps"
    """One of :data:`BUDGET_MODES`."""
    steps: int | None = None
    """``steps``: the optimiser steps."""
    samples: int | None = None
    """``samples``: the training samples (rounded down to whole batches); ``plateau``: the cap in samples."""
    seconds: float | None = None
    """``time``: the wall-clock budget in seconds; ``plateau``: an optional cap in training seconds."""
    threshold: float = DEFAULT_PLATEAU_THRESHOLD
    """``plateau``: the largest relative improvement of held-out FVU per doubling of samples that counts as
    flat."""
    min_samples: int = 2**18
    """``plateau``: samples before the rule is first applied (early curves can pause before they fall)."""
    l0_threshold: float = DEFAULT_PLATEAU_L0_THRESHOLD
    """``plateau``: the largest relative change of held-out L0 (either way) per doubling of samples that counts as
    settled; the curve has flattened only when FVU is flat and L0 settled."""

    def __post_init__(self) -> None:
        if self.mode not in BUDGET_FIELDS:
            raise ValueError(f"budget mode={self.mode!r} is not one of {', '.join(BUDGET_MODES)}.")
        need = BUDGET_FIELDS[self.mode][0]
        value = getattr(self, need)
        if value is None or not value > 0:
            raise ValueError(f"a {self.mode!r} budget needs {need} > 0, got {value!r}.")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"budget seconds={self.seconds!r} must be > 0 (or None under 'plateau').")
        if not self.threshold >= 0 or self.min_samples < 0 or not self.l0_threshold >= 0:
            raise ValueError(
                f"plateau threshold={self.threshold}, l0_threshold={self.l0_threshold} and "
                f"min_samples={self.min_samples} must be >= 0."
            )

    def describe(self) -> dict[str, Any]:
        """The mode and the fields it reads (what a log line shows)."""
        return {"mode": self.mode, **{f: getattr(self, f) for f in BUDGET_FIELDS[self.mode]}}

    def known_steps(self, batch_size: int) -> int | None:
        """The optimiser steps this budget fixes in advance (None for ``time`` / ``plateau``)."""
        if self.mode == "steps":
            return int(self.steps)
        if self.mode == "samples":
            return max(1, int(self.samples) // batch_size)
        return None


__all__ = ["ARCHITECTURES", "BUDGET_MODES", "NORMALIZATIONS", "BaselineSpec", "Budget"]
