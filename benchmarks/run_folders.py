"""What the benchmarks that read a finished run share: its latest finished stage folder."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.runs.layout import DONE_MARKER  # noqa: E402


def latest_finished(run: Path, pattern: str) -> Path:
    """The latest finished stage folder of the experiment folder ``run`` matching ``pattern`` (``fit-*``)."""
    found = [p for p in run.glob(pattern) if (p / DONE_MARKER).exists()]
    if not found:
        raise SystemExit(f"no finished {pattern} folder under {run}: run `python -m pipeline` first")
    return max(found, key=lambda p: p.stat().st_mtime)
