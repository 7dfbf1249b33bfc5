"""What happens around each optimiser step of a baseline's training (:class:`RunControl`): the lr where sae-lens's
step-count scheduler cannot place it, the dead-latent window, the held-out curve on the log grid, and the stop.

sae-lens's scheduler needs the run's step count when the trainer is built. Under ``steps`` / ``samples`` budgets
it is known and sae-lens's scheduler runs as it is. Under ``time`` and ``plateau`` it is not, so the trainer gets
a constant schedule and :class:`RunControl` sets the lr before each step with the same shape (linear warm-up
over ``lr_warm_up_steps``, constant, linear decay to 0):

* ``time``: the decay covers the last ``lr_decay_fraction`` of the budget's seconds, read from the training clock;
* ``plateau``: warm-up, stable, decay. The decay starts when the held-out curve has flattened (or when the cap
  is ``lr_decay_fraction`` away) and lasts ``fraction / (1 − fraction)`` of the steps so far, so that it is
  that fraction of the whole run, as under a step budget.

Held-out FVU and L0 are measured after the steps :func:`~pipeline.utils.curves.on_log_grid` names, on the inference
form of a copy of the SAE (what is saved), with the training clock paused. A curve has flattened when FVU improved
by less than the budget's ``threshold`` over the last doubling of samples *and* L0 moved by less than its
``l0_threshold`` either way: an L0-penalised SAE (JumpReLU, Standard) trades FVU for sparsity as it trains, so its
FVU can stall or rise while L0 is still falling, and the FVU rule alone would stop it there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pipeline.baselines.config import BaselineSpec, Budget
from pipeline.utils.curves import improvement_per_doubling, on_log_grid

#: Why a run stopped (``record.json``'s ``stop_reason``).
STOP_BUDGET = "budget"  # steps / samples / time spent
STOP_PLATEAU = "plateau"  # the held-out curve flattened (then the lr decayed)
STOP_CAP_SAMPLES = "cap_samples"  # a plateau run reached its sample cap before flattening
STOP_CAP_SECONDS = "cap_seconds"  # ... or its time cap


class RunControl:
    """Per-step control of one sae-lens training run (see the module docstring).

    ``clock()`` is the training clock (with a ``paused()`` context for evaluation); ``measure(trainer)`` returns
    the held-out ``(fvu, l0)`` of the SAE as it stands (None: no curve, and no ``plateau`` budget).
    """

    def __init__(
        self,
        spec: BaselineSpec,
        budget: Budget,
        clock: Any,
        measure: Callable[[Any], tuple[float, float]] | None,
    ) -> None:
        if budget.mode == "plateau" and measure is None:
            raise ValueError("a 'plateau' budget measures held-out FVU: pass heldout=(m, d_in) rows.")
        self.spec, self.budget, self.clock, self.measure = spec, budget, clock, measure
        self.decay = spec.decay_fraction()
        self.known_steps = budget.known_steps(spec.batch_size)
        self.curve: list[dict[str, float]] = []
        """Held-out FVU and L0 at the log-grid steps: ``steps``, ``samples``, ``seconds`` (training clock),
        ``fvu``, ``l0``, ``lr`` (the lr of that step)."""
        self.stop_reason: str | None = None
        self.decay_start_step: int | None = None
        """``plateau``: steps done when the decay began."""
        self.decay_steps = 0
        self.dead_window_steps = 1
        self._dead_mask_steps: Any = 0
        """Steps at which some latent was inside the dead window (so AuxK / pre-activation losses had work),
        counted on the SAE's device (no host sync per step); :attr:`dead_mask_steps` reads it."""
        self.last_lr = spec.lr
        """The lr of the last step taken."""

    # --------------------------------------------------------------------------------------- before a step
    def before_step(self, trainer: Any) -> None:
        """Set the dead window and (``time`` / ``plateau``) the lr of the step about to run."""
        step, samples = trainer.n_training_steps, trainer.n_training_samples
        self.dead_window_steps = self._dead_window_steps(samples)
        trainer.cfg.dead_feature_window = self.dead_window_steps
        factor = self.lr_factor(step)
        if factor is not None:
            for group in trainer.optimizer.param_groups:
                group["lr"] = self.spec.lr * factor
        self.last_lr = float(trainer.optimizer.param_groups[0]["lr"])
        self._dead_mask_steps = self._dead_mask_steps + trainer.dead_neurons.any().int()

    def lr_factor(self, step: int) -> float | None:
        """The lr multiple of 0-based ``step``; None where sae-lens's own scheduler sets it (known step count)."""
        if self.budget.mode not in ("time", "plateau"):
            return None
        w = self.spec.lr_warm_up_steps
        warm = 1.0 if w <= 1 or step >= w - 1 else 1 / w + (1 - 1 / w) * step / (w - 1)
        if self.budget.mode == "time":
            frac = self.clock() / self.budget.seconds
            decay = 1.0 if self.decay == 0 or frac <= 1 - self.decay else max(0.0, (1 - frac) / self.decay)
        elif self.decay_start_step is None:
            decay = 1.0
        else:
            decay = max(0.0, 1 - (step - self.decay_start_step) / max(self.decay_steps, 1))
        return warm * decay

    def _dead_window_steps(self, samples_done: int) -> int:
        """The dead window in steps: a share of the budget's samples (projected from the elapsed share of the
        seconds under ``time``; the samples so far under ``plateau``)."""
        b = self.spec.batch_size
        if self.known_steps is not None:
            run = self.known_steps * b
        elif self.budget.mode == "time":
            frac = self.clock() / self.budget.seconds
            run = samples_done / frac if frac > 0 else 0.0
        else:
            run = samples_done
        return max(1, round(self.spec.dead_window_samples_for(run) / b))

    @property
    def dead_mask_steps(self) -> int:
        """Steps so far at which some latent was inside the dead window."""
        return int(self._dead_mask_steps)

    # ---------------------------------------------------------------------------------------- after a step
    def after_step(self, trainer: Any) -> bool:
        """Measure on the log grid, start a ``plateau`` run's decay when due; True when the run must stop."""
        steps, samples = trainer.n_training_steps + 1, trainer.n_training_samples  # fit() counts the step later
        if self.measure is not None and on_log_grid(steps):
            with self.clock.paused():
                fvu, l0 = self.measure(trainer)
            point = {"steps": steps, "samples": samples, "seconds": self.clock(), "fvu": float(fvu), "l0": float(l0)}
            self.curve.append({**point, "lr": self.last_lr})
        if self.budget.mode == "time":
            if self.clock() >= self.budget.seconds:
                self.stop_reason = STOP_BUDGET
                return True
            return False
        if self.budget.mode != "plateau":
            return False  # fit()'s own loop ends a known step count
        if self.decay_start_step is None:
            reason = self._due(steps, samples)
            if reason is not None:
                self.decay_start_step, self.stop_reason = steps, reason
                self.decay_steps = math.ceil(self.decay / (1 - self.decay) * steps) if self.decay > 0 else 0
        return self.decay_start_step is not None and steps >= self.decay_start_step + self.decay_steps

    def _due(self, steps: int, samples: int) -> str | None:
        """Why the decay should start now, if it should."""
        b = self.budget
        if samples >= (1 - self.decay) * b.samples:
            return STOP_CAP_SAMPLES
        if b.seconds is not None and self.clock() >= (1 - self.decay) * b.seconds:
            return STOP_CAP_SECONDS
        last = self.curve[-1] if self.curve else None
        if last is not None and last["steps"] == steps and samples >= b.min_samples and self._flat(self.curve)[0]:
            return STOP_PLATEAU
        return None

    def _flat(self, curve: list[dict[str, float]]) -> tuple[bool, float | None, float | None]:
        """Whether ``curve`` has flattened at its last point (FVU gain below ``threshold`` and L0 change below
        ``l0_threshold`` per doubling of samples), with the FVU gain and the L0 change (None: too short)."""
        gain = improvement_per_doubling(curve, "samples")
        l0_change = improvement_per_doubling(curve, "samples", "l0")
        flat = gain is not None and gain < self.budget.threshold
        settled = l0_change is not None and abs(l0_change) < self.budget.l0_threshold
        return flat and settled, gain, (None if l0_change is None else -l0_change)

    # ------------------------------------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        """``record.json``'s account of the run: why it stopped and whether its curve had flattened (the rule
        applied to the points at full lr, before any decay)."""
        full = [p for p in self.curve if p["lr"] >= self.spec.lr * (1 - 1e-6)]
        flattened, gain, l0_change = self._flat(full)
        return {
            "stop_reason": self.stop_reason or STOP_BUDGET,
            "improvement_per_doubling": gain,
            "l0_change_per_doubling": l0_change,
            "flattened": flattened,
            "decay_start_step": self.decay_start_step,
            "dead_window_steps": self.dead_window_steps,
            "dead_mask_steps": self.dead_mask_steps,
        }


__all__ = ["STOP_BUDGET", "STOP_CAP_SAMPLES", "STOP_CAP_SECONDS", "STOP_PLATEAU", "RunControl"]
