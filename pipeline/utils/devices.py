"""Devices: the one place a default device is chosen, and how much memory a device has free."""

from __future__ import annotations

import os

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else CPU; anything else is taken as given.

    Raises ``ValueError`` (naming the fix) for a CUDA device on a machine without CUDA, before any work.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} was asked for but torch has no CUDA here "
                f"(torch {torch.__version__}, {'CPU build' if torch.version.cuda is None else 'no GPU visible'}); "
                "use device=cpu (or auto), or install a CUDA build of torch on a machine with a GPU."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} does not exist: {torch.cuda.device_count()} GPU(s) visible; "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1} or auto."
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but MPS is not available; use device=cpu or auto.")
    return dev


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the CUDA allocator's view on a GPU, available physical memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30
