"""Optional experiment tracking with Weights & Biases: off by default, and ``wandb`` is imported only when on.

One :class:`Tracker` is one wandb run. Opened from a disabled config (the default) it is a no-op: every method
returns at once and ``wandb`` is never imported. Tracking never breaks a pipeline run: if ``wandb`` is missing
or ``wandb.init`` fails, a warning is logged and the tracker is a no-op; if a later call fails, a warning is
logged and that call is skipped.

    with open_tracker(cfg.wandb, name="fit-L6", job_type="fit", config=plain_config,
                      default_group="default/multirun-2026-01-01") as tracker:
        tracker.log_curve("fit", dictionary.history, x="iteration")
        tracker.log_metrics("heldout", {"fvu": fvu, "l0": l0})
        tracker.log_table("summary", rows)

**sae-lens.** ``SAETrainer`` does not call ``wandb.init`` (only sae-lens's own runners do): with
``LoggingConfig.log_to_wandb`` on, ``fit()`` calls the module-level ``wandb.log(..., step=n_training_steps)``,
which needs an active global run (``wandb.run``) and raises without one. So open a tracker around ``fit()``
and build the trainer's logger from it, ``LoggingConfig(**sae_lens_logging(tracker))``: its run is the
global run, and ``sae_lens_logging`` turns sae-lens's logging off unless that run is live (disabled tracking,
or a tracker that fell back to a no-op). sae-lens logs at explicit steps, and wandb drops values logged at a
step below the run's current one: log your own values into that run only *after* ``fit()`` (or use one run
per baseline, as the ``job_type``/``group`` scheme suggests).

wandb keeps one global run per process: opening a tracker finishes any run still open (``reinit=
"finish_previous"``), so open them one after the other, not nested. wandb reads its ``WANDB_*`` environment
variables once per process (at its first run, until ``wandb.teardown()``); the config's fields are passed to
every run.

Offline (``mode: offline`` or ``WANDB_MODE=offline``) wandb 0.31 writes ``<dir>/wandb/offline-run-*/`` with the
run's records in ``run-<id>.wandb`` (upload later with ``wandb sync``); it writes no ``wandb-summary.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

#: Values of ``wandb.mode`` (None: wandb's own default, i.e. the ``WANDB_MODE`` environment variable or online).
MODES = ("online", "offline", "disabled")
#: ``eval_every_n_wandb_logs`` meaning "never": sae-lens's periodic evals (weight histograms, and its evaluator
#: when one is given) stay off; the project evaluates with SAEBench.
NEVER = 2**31 - 1


@dataclass
class TrackingConfig:
    """The ``wandb`` config node: whether and where runs are tracked."""

    enabled: bool = False
    """Track runs with wandb. Off: nothing is logged and ``wandb`` is not imported."""
    project: str = "dbksvd-pipeline"
    """wandb project."""
    entity: str | None = None
    """wandb entity (user or team); None: the logged-in user's default entity."""
    group: str | None = None
    """wandb group gathering the runs of one sweep; None: the caller's default (e.g. experiment name + sweep
    folder)."""
    mode: str | None = None
    """``"online"``, ``"offline"`` (write locally, ``wandb sync`` later) or ``"disabled"`` (same as
    ``enabled: false``); None: the ``WANDB_MODE`` environment variable, else online."""
    tags: list[str] = field(default_factory=list)
    """Tags added to every run."""
    dir: str | None = None
    """Folder under which wandb writes its ``wandb/`` run folders; None: ``WANDB_DIR``, else the working
    directory."""

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(
                f"wandb.mode must be one of {list(MODES)} or null (WANDB_MODE / wandb's default), got {self.mode!r}."
            )

    @property
    def active(self) -> bool:
        """Whether this config asks for tracking (``enabled`` and not ``mode: disabled``)."""
        return self.enabled and self.mode != "disabled"


class Tracker:
    """One wandb run, or a no-op. Every method is safe to call in either state and never raises for wandb's
    sake; used as a context manager it finishes the run on exit (exit code 1 if the block raised)."""

    def __init__(self, run: Any = None) -> None:
        self._run = run
        self._defined: set[str] = set()
        self.failures = 0
        """Tracker calls that failed (each skipped with a warning)."""

    @property
    def run(self) -> Any:
        """The wandb run, or None when tracking is off, failed or finished."""
        return self._run

    @property
    def active(self) -> bool:
        """Whether values logged now reach a wandb run."""
        return self._run is not None

    def log_metrics(self, prefix: str, values: Mapping[str, Any]) -> None:
        """Log ``values`` (nested mappings flattened to ``prefix/a/b``; None values skipped) as one history row."""
        if self._run is None:
            return
        with self._guard(f"logging {prefix or 'metrics'}"):
            row = flatten(values, prefix)
            if row:
                self._run.log(row)

    def log_curve(self, name: str, points: Iterable[Mapping[str, Any]], x: str) -> None:
        """Log a curve, one history row per point, each value as ``name/<key>`` plotted against ``name/<x>``.

        ``points``: e.g. a dictionary's fit history, ``[{"iteration": 0, "seconds": 1.2, "fvu": 0.4}, ...]``;
        ``x``: the key used as the x axis (``wandb.define_metric(..., step_metric=...)``), in every point.
        """
        if self._run is None:
            return
        with self._guard(f"logging curve {name}"):
            x_key = f"{name}/{x}"
            rows = [flatten(p, name) for p in points]
            missing = sum(x_key not in row for row in rows)
            if missing:
                raise ValueError(f"{missing} of {len(rows)} points of curve {name!r} have no {x!r} value")
            if x_key not in self._defined:
                self._run.define_metric(x_key)
                self._defined.add(x_key)
            for row in rows:
                for key in row:
                    if key != x_key and key not in self._defined:
                        self._run.define_metric(key, step_metric=x_key)
                        self._defined.add(key)
                self._run.log(row)

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Log ``rows`` as a ``wandb.Table`` named ``name``: the columns are the rows' keys in first-seen order,
        a missing value is None, a nested value is stored as JSON text."""
        if self._run is None:
            return
        with self._guard(f"logging table {name}"):
            import json

            import wandb

            columns: list[str] = []
            for row in rows:
                columns += [str(k) for k in row if str(k) not in columns]
            data = []
            for row in rows:
                cells = {str(k): plain(v) for k, v in row.items()}
                data.append(
                    [
                        c if not isinstance(c, (dict, list)) else json.dumps(c)
                        for c in (cells.get(col) for col in columns)
                    ]
                )
            self._run.log({name: wandb.Table(columns=columns, data=data, allow_mixed_types=True)})

    def finish(self, exit_code: int | None = None) -> None:
        """End the run (uploads online; completes the offline folder). Idempotent."""
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001 - tracking must not break a run
            log.warning(
                "wandb: finishing the run failed (%s: %s); its records may be incomplete.", type(exc).__name__, exc
            )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)

    def _guard(self, what: str) -> _Guard:
        return _Guard(self, what)


class _Guard:
    """Turns an exception in a tracker call into a warning (the first; later ones at debug level) and skips
    that call. The run stays open: sae-lens may still be logging into it."""

    def __init__(self, tracker: Tracker, what: str) -> None:
        self.tracker, self.what = tracker, what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc_type is None or not issubclass(exc_type, Exception):
            return False
        self.tracker.failures += 1
        level = logging.WARNING if self.tracker.failures == 1 else logging.DEBUG
        log.log(level, "wandb: %s failed (%s: %s); skipped, the run goes on.", self.what, exc_type.__name__, exc)
        return True


def open_tracker(
    cfg: TrackingConfig,
    *,
    name: str,
    job_type: str,
    config: Mapping[str, Any] | None = None,
    default_group: str | None = None,
    tags: Sequence[str] = (),
) -> Tracker:
    """A :class:`Tracker` for one run: a no-op if ``cfg`` does not ask for tracking, else a new wandb run.

    ``name``: the run's display name; ``job_type``: the kind of run (``"fit"``, ``"baseline"``, ``"evaluate"``,
    ...); ``config``: the run's config (made JSON-friendly); ``default_group``: the group when ``cfg.group`` is
    None; ``tags``: added to ``cfg.tags``. Any run still open in this process is finished first. If ``wandb``
    cannot be imported or ``wandb.init`` fails, a warning is logged and the tracker is a no-op.
    """
    if not cfg.active:
        return Tracker()
    try:
        import wandb
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        log.warning(
            "wandb: tracking is on (wandb.enabled) but wandb cannot be imported (%s: %s); continuing without tracking.",
            type(exc).__name__,
            exc,
        )
        return Tracker()
    try:
        if cfg.dir is not None:
            Path(cfg.dir).mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group or default_group,
            name=name,
            job_type=job_type,
            tags=list(dict.fromkeys([*cfg.tags, *tags])) or None,
            config=plain(dict(config or {})),
            mode=cfg.mode,
            dir=cfg.dir,
            reinit="finish_previous",
        )
    except Exception as exc:  # noqa: BLE001 - UsageError (no API key), CommError, timeouts, ...
        log.warning(
            "wandb: wandb.init failed (%s: %s); continuing without tracking. Offline: wandb.mode=offline "
            "(or WANDB_MODE=offline), then `wandb sync`.",
            type(exc).__name__,
            exc,
        )
        return Tracker()
    return Tracker(run)


def sae_lens_logging(tracker: Tracker, *, log_every: int = 10, evals_every: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``sae_lens.config.LoggingConfig`` so that sae-lens's ``SAETrainer.fit()`` logs its
    training (``losses/*``, ``metrics/*``, ``sparsity/*``, ``details/*``) into ``tracker``'s run.

    ``log_to_wandb`` is on only while ``tracker``'s run is live and is the global ``wandb.run`` (``fit()`` calls
    ``wandb.log``; it never calls ``wandb.init``), so keep the tracker open until ``fit()`` returns.
    ``log_every``: steps between logged rows (``wandb_log_frequency``); ``evals_every``: logged rows between
    sae-lens's evals (``eval_every_n_wandb_logs``), None for never. Artifacts (weights, optimiser state,
    activation store) are off: the pipeline saves the SAEs itself. sae-lens's runners alone read the project,
    entity, name and id fields (for their own ``wandb.init``); they are filled in from the run for the record.
    """
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}.")
    off = dict(log_to_wandb=False, eval_every_n_wandb_logs=NEVER)
    run = tracker.run
    if run is None:
        return off
    try:
        import wandb

        if wandb.run is not run:
            log.warning(
                "wandb: this tracker's run is not the active wandb run (another run was opened after it); "
                "sae-lens will not log to wandb."
            )
            return off
        return dict(
            log_to_wandb=True,
            log_weights_to_wandb=False,
            log_optimizer_state_to_wandb=False,
            log_activations_store_to_wandb=False,
            wandb_project=run.project,
            wandb_entity=run.entity,
            run_name=run.name,
            wandb_id=run.id,
            wandb_log_frequency=log_every,
            eval_every_n_wandb_logs=NEVER if evals_every is None else evals_every,
        )
    except Exception as exc:  # noqa: BLE001
        log.warning(
            "wandb: reading the run for sae-lens failed (%s: %s); sae-lens will not log to wandb.",
            type(exc).__name__,
            exc,
        )
        return off


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"prefix/a/b": 1}``, values made JSON-friendly by :func:`plain`; None skipped."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, full))
        elif value is not None:
            out[full] = plain(value)
    return out


def plain(value: Any) -> Any:
    """``value`` as JSON-friendly Python data: tensors and numpy values via ``tolist()`` (a scalar becomes a
    number), mappings to dicts with string keys, other sequences to lists, paths and other objects to strings.
    Non-finite floats stay floats (wandb records them)."""
    if value is None:
        return None
    for kind in (bool, int, float, str):  # builtins exactly (numpy's float64 is a float, an IntEnum an int)
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if hasattr(value, "tolist") and callable(value.tolist):  # torch.Tensor, numpy arrays and scalars
        return plain(value.tolist())
    if isinstance(value, (Sequence, set, frozenset)) and not isinstance(value, (bytes, bytearray)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return plain(value.item())
    return str(value)


__all__ = ["MODES", "TrackingConfig", "Tracker", "open_tracker", "sae_lens_logging", "flatten", "plain"]
