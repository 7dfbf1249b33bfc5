"""Train an SAE baseline with sae-lens's own trainer (``SAETrainer.fit()``) on our activations.

The recipe is sae-lens's (:mod:`~pipeline.baselines.lens`); ours are only the data provider
(:mod:`~pipeline.baselines.batches`), ``b_dec`` starting at the data mean, and the budget
(:mod:`~pipeline.baselines.control` sets what sae-lens cannot know in advance):

* ``steps`` / ``samples``: the trainer's ``total_training_samples`` is ``steps × batch_size`` (samples rounded
  down to whole batches, at least one), and every batch is full, so ``fit()`` runs exactly that many steps and
  its lr schedule knows the count (decay and sparsity warm-up are placed in it);
* ``time`` / ``plateau``: ``fit()`` runs with an open-ended total (``plateau``: its sample cap) and a subclass
  hook around each optimiser step sets the lr and decides to stop. It stops by lowering
  ``total_training_samples`` to the samples seen, so ``fit()``'s own loop test ends the loop and ``fit()`` itself
  runs everything it runs after the loop (folding the normalisation factor into the weights, the final L0 /
  dead-latent metadata). A provider that raised ``StopIteration`` instead would skip all of that
  (docs/sae-lens-baselines.md). The time check is after each step, so a run overshoots its seconds by at most
  one step plus that finalisation.

With ``heldout`` rows, held-out FVU is measured on the log grid of steps (the record's ``heldout_curve``, whose
last point is the final SAE's held-out FVU). If ``normalize_activations`` is ``expected_average_only_in``, the
scaling factor is estimated (by sae-lens's ``ActivationScaler``, as ``fit()`` would) before ``fit()``, so that
``b_dec`` can start at the *scaled* mean; ``fit()`` keeps a factor that is already set.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import sae_lens
import torch
from sae_lens import SAE
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training import activation_scaler as _scaler_module
from sae_lens.training import sae_trainer as _trainer_module
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor

from pipeline.baselines.batches import data_mean, training_batches
from pipeline.baselines.config import DEFAULT_L1_WARM_UP_FRACTION, BaselineSpec, Budget
from pipeline.baselines.control import RunControl
from pipeline.baselines.lens import build_training_sae, inference_form, trainer_config
from pipeline.saes.heldout import heldout_stats
from pipeline.utils.devices import resolve_device

#: ``total_training_samples`` of an open-ended (``time``) run: never reached, the stop hook ends it.
OPEN_ENDED_SAMPLES = 2**62
#: The training curve records the batch FVU at steps 1-10, then every ``CURVE_EVERY`` steps ...
CURVE_EVERY = 10
#: ... and keeps at most this many points, evenly spread (:func:`thin_curve`).
MAX_CURVE_POINTS = 256


@dataclass
class BaselineRecord:
    """What was trained and how it went (``record.json`` beside the sae-lens folder)."""

    architecture: str
    d_in: int
    width: int
    k: int
    steps: int
    """Optimiser steps taken."""
    samples: int
    """Training samples seen (steps × batch_size)."""
    seconds: float
    """Wall time from the call to the end of ``fit()`` (set-up included, held-out evaluation not)."""
    final_lr: float
    lr_decay_steps: int
    """Decay steps of sae-lens's own scheduler (``steps`` / ``samples`` budgets; 0 where :mod:`control` sets
    the lr)."""
    sparsity_warm_up_steps: int
    normalize_activations: str
    budget: dict[str, Any]
    spec: dict[str, Any]
    sae_lens_version: str
    device: str | None = None
    """Where it trained."""
    curve: list[dict[str, float]] | None = None
    """Training-batch FVU (on the step's batch, before its update) against wall ``seconds`` (training clock),
    ``samples`` and ``steps``: what the report plots beside the dictionary's fit curve."""
    heldout_rows: int | None = None
    heldout_fvu: float | None = None
    """‖Y − Ŷ‖² / ‖Y − mean(Y)‖² of the inference SAE on the held-out rows."""
    heldout_l0: float | None = None
    heldout_dead_fraction: float | None = None
    heldout_mean_max_abs_cos: float | None = None
    heldout_fvu_init: float | None = None
    """The same FVU at step 0 (after ``b_dec`` init), for the inference form of the untrained SAE."""
    heldout_curve: list[dict[str, float]] | None = None
    """Held-out FVU on the log grid of steps (``steps``, ``samples``, ``seconds``, ``fvu``, ``lr``), last point the
    final SAE's (:class:`~pipeline.baselines.control.RunControl`)."""
    stop_reason: str | None = None
    """``budget``, ``plateau``, ``cap_samples`` or ``cap_seconds`` (:mod:`~pipeline.baselines.control`)."""
    improvement_per_doubling: float | None = None
    """Relative held-out FVU gain over the last doubling of samples at full lr, before the decay."""
    l0_change_per_doubling: float | None = None
    """Relative held-out L0 change over the same doubling (negative: L0 fell)."""
    flattened: bool | None = None
    """Whether that gain was below the budget's plateau threshold and the L0 change below its L0 threshold: the
    curve had flattened."""
    decay_start_step: int | None = None
    """``plateau``: steps done when the lr decay began."""
    dead_window_steps: int | None = None
    """The dead-latent window at the end of training, in steps."""
    dead_mask_steps: int | None = None
    """Steps at which some latent was inside the dead window (AuxK / pre-activation losses acting)."""


@dataclass
class TrainedBaseline:
    """A trained sae-lens SAE: ``sae`` in inference form (what sae-lens saves: BatchTopK and Matryoshka become
    JumpReLU), ``training_sae`` as trained (after ``fit()``'s end-of-training folding), and the record."""

    sae: SAE
    training_sae: TrainingSAE
    record: BaselineRecord


def train_baseline(
    data: Tensor | Iterable[Tensor],
    d_in: int,
    width: int,
    k: int,
    spec: BaselineSpec,
    budget: Budget,
    *,
    heldout: Tensor | None = None,
    progress: bool = False,
    logging: dict[str, Any] | None = None,
) -> TrainedBaseline:
    """Train a ``width``-latent sae-lens SAE of ``spec.architecture`` on ``data`` for ``budget``.

    ``data``: an ``(n, d_in)`` tensor or a re-iterable of ``(b, d_in)`` batches; ``k``: the L0 the baseline is
    trained at (TopK / BatchTopK / Matryoshka ``k``, JumpReLU's quadratic ``target_l0``, MP-SAE's iterations;
    unused by ``standard``, whose L0 follows ``l1_coefficient``). ``heldout: (m, d_in)`` adds held-out FVU / L0
    and the held-out curve to the record (required by a ``plateau`` budget). ``progress`` shows sae-lens's tqdm
    bars. ``logging``: sae-lens ``LoggingConfig`` fields (:func:`pipeline.utils.tracking.sae_lens_logging`)
    for wandb logging of the training by sae-lens itself; None: off.
    """
    clock = _Clock()
    if not 1 <= k <= width or d_in < 1:
        raise ValueError(f"need 1 <= k <= width and d_in >= 1, got k={k}, width={width}, d_in={d_in}.")
    if heldout is not None and (heldout.ndim != 2 or heldout.shape[1] != d_in or heldout.shape[0] < 2):
        raise ValueError(f"heldout must be (m >= 2, {d_in}), got {tuple(heldout.shape)}.")
    device = resolve_device(spec.device)
    known = budget.known_steps(spec.batch_size)
    decay_steps, warm_steps = _schedule(spec, budget, known)
    if known is not None:
        total = known * spec.batch_size
    elif budget.mode == "plateau":
        total = int(budget.samples)
    else:
        total = OPEN_ENDED_SAMPLES
    held = heldout.to(device) if heldout is not None else None
    measure = None
    if held is not None:
        measure = lambda tr: _fvu_l0(_finished_copy(tr.sae, tr.activation_scaler.scaling_factor), held)  # noqa: E731
    control = RunControl(spec, budget, clock, measure)
    curve: list[dict[str, float]] = []
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), _progress_bars(progress), torch.enable_grad():
        torch.manual_seed(spec.seed)
        sae = build_training_sae(spec, d_in, width, k, warm_steps, str(device))
        trainer = _BudgetedTrainer(
            cfg=trainer_config(spec, total, decay_steps, control.dead_window_steps, str(device), logging),
            sae=sae,
            data_provider=training_batches(data, d_in, spec.batch_size, spec.seed, device),
            control=control,
            clock=clock,
            curve=curve,
        )
        scale = _estimate_scale(trainer)
        if spec.b_dec_init == "mean":
            with torch.no_grad():
                sae.b_dec.copy_(data_mean(data, d_in, device) * (scale or 1.0))
        fvu_init = None
        if held is not None:  # evaluation, not training: its time is taken off the clock
            with clock.paused():
                fvu_init = _fvu_l0(_finished_copy(sae, scale), held)[0]
        trainer.fit()
        if device.type == "cuda":  # queued kernels belong to the training time
            torch.cuda.synchronize(device)
        seconds = clock()
    final = inference_form(trainer.sae)
    record = BaselineRecord(
        architecture=spec.architecture,
        d_in=d_in,
        width=width,
        k=k,
        steps=trainer.n_training_steps,
        samples=trainer.n_training_samples,
        seconds=seconds,
        final_lr=control.last_lr,
        lr_decay_steps=decay_steps,
        sparsity_warm_up_steps=warm_steps,
        normalize_activations=spec.normalization(),
        budget=asdict(budget),
        spec=asdict(spec),
        sae_lens_version=sae_lens.__version__,
        device=str(device),
        heldout_fvu_init=fvu_init,
        curve=thin_curve(curve),
        **control.summary(),
    )
    if held is not None:
        stats = heldout_stats(final, held)
        record.heldout_rows, record.heldout_fvu, record.heldout_l0 = stats["heldout_rows"], stats["fvu"], stats["l0"]
        record.heldout_dead_fraction = stats["dead_fraction"]
        record.heldout_mean_max_abs_cos = stats["mean_max_abs_cos"]
        points = [p for p in control.curve if p["steps"] < record.steps]
        last = {"steps": record.steps, "samples": record.samples, "seconds": seconds, "fvu": stats["fvu"]}
        last["l0"] = stats["l0"]
        record.heldout_curve = [*points, {**last, "lr": control.last_lr}]
    return TrainedBaseline(sae=final, training_sae=trainer.sae, record=record)


class _Clock:
    """Training wall seconds since creation, with evaluation time taken off (:meth:`paused`)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - start


def thin_curve(points: list[dict[str, float]], max_points: int = MAX_CURVE_POINTS) -> list[dict[str, float]]:
    """At most ``max_points`` of ``points``, evenly spread, first and last kept."""
    if len(points) <= max_points:
        return list(points)
    idx = sorted({round(i * (len(points) - 1) / (max_points - 1)) for i in range(max_points)})
    return [points[i] for i in idx]


class _BudgetedTrainer(SAETrainer):
    """sae-lens's trainer plus a hook around each optimiser step: ``control`` sets the step's lr and dead window
    before it, measures and may end training after it.

    It ends training through ``fit()``'s own loop test (``n_training_samples < total_training_samples``) by
    lowering the total to the samples seen, so ``fit()`` still runs its end-of-training work. ``step()`` is the
    public seam ``fit()`` calls once per step, before it counts the step in ``n_training_steps``.
    """

    def __init__(
        self,
        *args: Any,
        control: RunControl,
        clock: Callable[[], float],
        curve: list[dict[str, float]],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._control, self._clock, self._curve = control, clock, curve

    def step(self, batch: Tensor) -> Any:
        self._control.before_step(self)
        output = super().step(batch)
        step = self.n_training_steps + 1  # fit() counts the step after this returns
        if step <= 10 or step % CURVE_EVERY == 0:
            with torch.no_grad():
                x, x_hat = output.sae_in.float(), output.sae_out.float()
                fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp(min=1e-30))
            self._curve.append(
                {"seconds": self._clock(), "samples": self.n_training_samples, "steps": step, "fvu": fvu}
            )
        if self._control.after_step(self):
            self.cfg.total_training_samples = self.n_training_samples
        return output


def _schedule(spec: BaselineSpec, budget: Budget, steps: int | None) -> tuple[int, int]:
    """``(lr_decay_steps, sparsity_warm_up_steps)`` of sae-lens's own schedulers: fractions of the known step
    count; ``time`` / ``plateau`` runs get 0 decay steps (:class:`RunControl` decays their lr)."""
    if steps is None:
        if spec.sparsity_warm_up_fraction:
            raise ValueError(
                f"sparsity_warm_up_fraction={spec.sparsity_warm_up_fraction} is a share of the optimiser "
                f"steps, which a {budget.mode!r} budget does not know in advance: set it to 0 (or None), or "
                "use a 'steps' / 'samples' budget."
            )
        return 0, 0
    warm = spec.sparsity_warm_up_fraction
    if warm is None:
        warm = DEFAULT_L1_WARM_UP_FRACTION if spec.architecture == "standard" else 0.0
    decay_steps = min(int(spec.decay_fraction() * steps), max(0, steps - spec.lr_warm_up_steps - 1))
    return decay_steps, int(warm * steps)


def _estimate_scale(trainer: SAETrainer) -> float | None:
    """sae-lens's ``expected_average_only_in`` factor, estimated now (``fit()`` keeps a factor already set)."""
    if trainer.sae.cfg.normalize_activations != "expected_average_only_in":
        return None
    trainer.activation_scaler.estimate_scaling_factor(
        d_in=trainer.sae.cfg.d_in,
        data_provider=trainer.data_provider,
        n_batches_for_norm_estimate=trainer.cfg.n_batches_for_norm_estimate,
    )
    return trainer.activation_scaler.scaling_factor


def _finished_copy(sae: TrainingSAE, scale: float | None) -> Any:
    """The inference form of a copy of ``sae`` with ``fit()``'s normalisation fold applied."""
    done = copy.deepcopy(sae)
    if scale is not None:
        done.fold_activation_norm_scaling_factor(scale)
    return inference_form(done)


@torch.no_grad()
def _fvu_l0(sae: Any, Y: Tensor, chunk: int = 4096) -> tuple[float, float]:
    """``sae``'s FVU ‖Y − decode(encode(Y))‖² / ‖Y − mean(Y)‖² and mean L0 (non-zero codes per row) on
    ``Y: (m, d)``, in chunks of ``chunk`` rows."""
    Y = Y.float()
    err, active = 0.0, 0.0
    for s in range(0, len(Y), chunk):
        codes = sae.encode(Y[s : s + chunk])
        err += float((Y[s : s + chunk] - sae.decode(codes)).pow(2).sum())
        active += float((codes != 0).sum())
    return err / max(float((Y - Y.mean(0)).pow(2).sum()), 1e-30), active / len(Y)


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """sae-lens's trainer and scaler always draw tqdm bars; unless ``show``, their module-level ``tqdm`` is
    swapped for a disabled one while training (restored after)."""
    if show:
        yield
        return
    saved = _trainer_module.tqdm, _scaler_module.tqdm
    quiet = functools.partial(saved[0], disable=True)
    _trainer_module.tqdm = _scaler_module.tqdm = quiet
    try:
        yield
    finally:
        _trainer_module.tqdm, _scaler_module.tqdm = saved


__all__ = ["BaselineRecord", "TrainedBaseline", "train_baseline"]
