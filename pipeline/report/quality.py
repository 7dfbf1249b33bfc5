"""The report's opening table: time-to-quality of each SAE baseline against the dictionary it was trained beside.

Every method's held-out FVU is measured on the same held-out rows on a log grid of its updates / steps (the
``heldout_curve`` of each row's description). For each baseline, against the dictionary of its evaluate folder:

* its held-out FVU at the dictionary's fit time (read off its curve, linear in log time), and at its end;
* whether its curve had flattened (held-out FVU gain per doubling of samples at full lr below the plateau
  threshold, and held-out L0 settled) and what stopped it;
* the training time and samples it needed to reach the dictionary's held-out FVU, or "not reached by" its end.

A figure from a curve that had not flattened carries that label: it measures a run that was still improving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.report.escape import md_cell, md_code, md_text
from pipeline.report.rows import Row, fmt, fmt_count, fmt_seconds, is_number
from pipeline.utils.curves import first_reaching, improvement_per_doubling, value_at

#: What stopped a baseline (``budget.stop_reason``), in words.
STOP_WORDS = {
    "plateau": "plateau",
    "cap_samples": "sample cap",
    "cap_seconds": "time cap",
    "budget": "its budget",
}
#: The label a figure from a curve that had not flattened carries.
NOT_FLAT = "not flattened"


def heldout_curve(row: Row) -> list[dict[str, Any]]:
    """The row's held-out curve (points with ``seconds``, ``samples``, ``fvu``), [] when it has none."""
    pts = row.described.get("heldout_curve") or []
    return [p for p in pts if isinstance(p, dict) and is_number(p.get("fvu")) and is_number(p.get("seconds"))]


def time_to_quality(rows: list[Row]) -> list[str]:
    """The "Time to quality" section: one table per evaluate folder with a dictionary and baselines; [] when no
    folder has both."""
    lines: list[str] = []
    by_folder: dict[Path, list[Row]] = {}
    for r in rows:
        by_folder.setdefault(r.folder, []).append(r)
    for folder, members in by_folder.items():
        dicts = [r for r in members if r.is_dictionary and is_number(r.described.get("fvu"))]
        bases = [r for r in members if not r.is_dictionary]
        if len(dicts) != 1 or not bases:
            continue
        lines += _table(dicts[0], bases, folder if len(by_folder) > 1 else None)
    if not lines:
        return []
    return ["## Time to quality", "", *_preamble(), "", *lines]


def _preamble() -> list[str]:
    return [
        "Held-out FVU (‖Y − Ŷ‖² / ‖Y − mean Y‖² on the store's held-out rows, the same rows for every method), "
        "measured while each method trained, on a log grid of its updates / optimiser steps. Times are "
        "training wall seconds on the device listed (held-out measurement excluded); samples are training "
        "samples seen. Values between measured points are read linearly in log time.",
        "",
        f"A figure marked *{NOT_FLAT}* comes from a curve still improving by more than the plateau threshold "
        "per doubling of samples, or whose L0 was still moving, when its run ended: it is a lower bound on what "
        "the architecture reaches, "
        "not its result.",
        "",
        "An SAE's FVU at the fit's time is read from its own curve at that point of a longer run, at full lr (its "
        "lr decays at the end of its run): usually higher than a run given exactly that time ends at "
        "(`compare.budget=equal_time`).",
    ]


def _table(dictionary: Row, bases: list[Row], folder: Path | None) -> list[str]:
    target = float(dictionary.described["fvu"])
    db = dictionary.budget
    fit_s = db.get("seconds") if is_number(db.get("seconds")) else None
    fit_samples = db.get("samples") if is_number(db.get("samples")) else None
    head = f"Against {md_code(dictionary.name)}" + (f" ({md_code(folder.name)})" if folder is not None else "")
    dict_curve = heldout_curve(dictionary)
    flat = _dictionary_flatness(dict_curve)
    lines = [
        f"{head}: held-out FVU **{fmt(target)}** after {fmt_seconds(fit_s)} s of fitting and "
        f"{fmt_count(fit_samples)} samples coded{flat}.",
        "",
    ]
    t_col = f"FVU at the fit's {fmt_seconds(fit_s)} s" if fit_s is not None else "FVU at the fit's time"
    head_cells = [
        "SAE",
        "architecture",
        t_col,
        "FVU at its end",
        "end (s / samples)",
        "flattened?",
        "stopped by",
        f"time to FVU {fmt(target)}",
        f"samples to FVU {fmt(target)}",
    ]
    lines += ["| " + " | ".join(md_cell(h) for h in head_cells) + " |", "|" + "---|" * len(head_cells)]
    for r in bases:
        lines.append("| " + " | ".join(md_cell(c) for c in _cells(r, target, fit_s)) + " |")
    return lines + [""]


def _cells(r: Row, target: float, fit_s: float | None) -> list[str]:
    b = r.budget
    curve = heldout_curve(r)
    flattened = b.get("flattened")
    label = "" if flattened is True else f" ({NOT_FLAT})"
    end_fvu = r.described.get("fvu")
    end_s, end_n = b.get("seconds"), b.get("samples")
    at_fit = "—"
    if fit_s is not None and curve:
        v = value_at(curve, fit_s, "seconds")
        if v is not None:
            at_fit = fmt(v) + label
        elif fit_s > float(curve[-1]["seconds"]):
            at_fit = f"— (ended at {fmt_seconds(curve[-1]['seconds'])} s)"
    reached_s = first_reaching(curve, target, "seconds") if curve else None
    reached_n = first_reaching(curve, target, "samples") if curve else None
    by = f"{fmt_seconds(end_s)} s / {fmt_count(end_n)} samples" if is_number(end_s) and is_number(end_n) else "—"
    return [
        md_code(r.name),
        md_text(r.architecture),
        at_fit,
        (fmt(end_fvu) + label) if is_number(end_fvu) else "—",
        by,
        {True: "yes", False: "no"}.get(flattened, "not recorded"),
        STOP_WORDS.get(str(b.get("stop_reason")), "—"),
        fmt_seconds(reached_s) + " s" if reached_s is not None else (f"not reached by {by}" if curve else "—"),
        fmt_count(round(reached_n)) if reached_n is not None else (f"not reached by {by}" if curve else "—"),
    ]


def _dictionary_flatness(curve: list[dict[str, Any]]) -> str:
    """`` (curve flattened: …)`` for the dictionary's own held-out curve, by the same rule's quantity."""
    if not curve:
        return ""
    gain = improvement_per_doubling(curve, "samples")
    if gain is None:
        return ""
    return f"; its own held-out FVU improved by {fmt(100 * gain, 3)}% over its last doubling of samples"


__all__ = ["NOT_FLAT", "heldout_curve", "time_to_quality"]
