"""What a dictionary's fit spent (wall time, samples coded, updates, devices): the record the fit stage writes into
the dictionary's metadata and that SAE baselines are matched to (:mod:`pipeline.baselines.compare`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class FitSpend:
    """What the dictionary's fit spent: the quantities a baseline's budget is matched to."""

    seconds: float
    """Wall time of the fit (the learner's clock, which survives a resume)."""
    samples: int
    """Sample rows coded over all updates."""
    updates: int
    """Dictionary updates (iterations)."""
    device: str
    """Where it ran (rank 0's device for a data-parallel fit)."""
    ranks: int = 1
    """Data-parallel processes (devices) the fit ran on; ``equal_time`` matches their device-seconds,
    ``ranks × seconds``, since a baseline trains on one device."""

    @classmethod
    def from_history(
        cls,
        history: Sequence[Mapping[str, Any]],
        *,
        batch_size: int,
        device: str,
        fit_seconds: float | None = None,
        ranks: int = 1,
    ) -> FitSpend:
        """From a dictionary's per-iteration ``history`` (``seconds`` cumulative; ``rows`` per iteration, else
        ``batch_size``); ``fit_seconds``, the fit stage's own clock of the whole call, wins when larger (it
        also counts the initialisation; after a resume it counts only the resumed part, hence the max)."""
        if not history:
            raise ValueError(
                "the dictionary has no fit history: it was not fitted by learn_dictionary / "
                "fit_dictionary, so there is no fit time or sample count to match a baseline to."
            )
        seconds = max(float(history[-1].get("seconds", 0.0)), float(fit_seconds or 0.0))
        samples = sum(int(h.get("rows", batch_size)) for h in history)
        return cls(seconds=seconds, samples=samples, updates=len(history), device=str(device), ranks=ranks)

    @classmethod
    def of_dictionary(cls, dictionary: Any) -> FitSpend:
        """The spend a fitted :class:`~pipeline.core.dictionary.Dictionary` recorded (``metadata["spend"]``, written
        by the fit stage), else derived from its history and the learner settings in its metadata."""
        meta = dictionary.metadata
        if meta.get("spend"):
            return cls(**{k: v for k, v in meta["spend"].items() if k != "mode"})
        learner = meta.get("learner") or {}
        return cls.from_history(
            dictionary.history,
            batch_size=int(learner.get("batch_size") or 0),
            device=str(learner.get("device")),
            fit_seconds=meta.get("fit_seconds"),
            ranks=int(meta.get("ranks") or 1),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": "fit",
            "seconds": self.seconds,
            "samples": self.samples,
            "updates": self.updates,
            "device": self.device,
            "ranks": self.ranks,
        }
