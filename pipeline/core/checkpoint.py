"""The learner's checkpoint: what a fit writes after each iteration so that a killed fit resumes to the result
of the uninterrupted one, and the settings a resumed fit must share with it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.core.learner_config import LearnerConfig
from pipeline.utils.atomic import atomic_write


def save_checkpoint(
    cfg: LearnerConfig,
    D: Tensor,
    centre: Tensor | None,
    history: list,
    it: int,
    epoch: int,
    batch_pos: int,
    gen: torch.Generator,
) -> None:
    """Write the fit's state after iteration ``it`` to ``cfg.checkpoint_path`` (temp file, then rename): the
    atoms, the centre, the history, where the schedule is (iteration, epoch, position in the epoch's batches),
    the random generator and the settings."""
    path = Path(cfg.checkpoint_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(
        atoms=D.cpu(),
        centre=None if centre is None else centre.cpu(),
        history=history,
        iteration=it,
        epoch=epoch,
        batch_pos=batch_pos,
        generator=gen.get_state(),
        config={k_: v for k_, v in asdict(cfg).items() if k_ not in ("progress", "resume")},
    )
    atomic_write(path, lambda p: torch.save(state, p))


#: Settings a checkpoint must share with the fit that resumes it.
_RESUME_KEYS = (
    "n_atoms",
    "k",
    "method",
    "nonnegative",
    "matryoshka",
    "seed",
    "batch_size",
    "center",
    "init",
    "reference_rules",
    "matryoshka_loop",
    "sample_order",
    "shuffle_once",
)
#: Values of settings added after checkpoints were first written (an older checkpoint ran with these).
_RESUME_DEFAULTS = {
    "reference_rules": False,
    "matryoshka_loop": "cascade",
    "sample_order": "shuffled",
    "shuffle_once": False,
}


def _resume_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The :data:`_RESUME_KEYS` of a config as ``asdict`` writes it (coder fields nested under ``coder``)."""
    flat = {**config.get("coder", {}), **{key: v for key, v in config.items() if key != "coder"}}
    return {key: flat.get(key, _RESUME_DEFAULTS.get(key)) for key in _RESUME_KEYS}


def load_checkpoint(cfg: LearnerConfig, device: torch.device) -> dict | None:
    """The state :func:`save_checkpoint` wrote at ``cfg.checkpoint_path`` (atoms and centre on ``device``), or
    None when there is none; ``ValueError`` when it was written with settings (:data:`_RESUME_KEYS`) that differ
    from ``cfg``'s. Loaded with ``weights_only=True`` (it holds only tensors and plain types): a file holding
    anything else raises ``pickle.UnpicklingError`` without running it."""
    path = Path(cfg.checkpoint_path)
    if not path.exists():
        return None
    # tensors and plain types only: torch's restricted unpickler, which runs no code a file could carry
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved, now = _resume_identity(state.get("config", {})), _resume_identity(asdict(cfg))
    clash = {k_: (saved[k_], now[k_]) for k_ in _RESUME_KEYS if saved[k_] != now[k_]}
    if clash:
        raise ValueError(
            f"checkpoint {path} was written with different settings {clash} (saved, now); "
            f"use a new checkpoint_path or the original settings."
        )
    state["atoms"] = state["atoms"].to(device)
    if state["centre"] is not None:
        state["centre"] = state["centre"].to(device)
    return state
