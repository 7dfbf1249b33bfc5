"""The comparison report: one table of every metric for the dictionary and its baselines (sorted by
architecture, with each SAE's training budget), a generated "How to read this" section, the FVU-vs-wall-time
plot, the fit curve and SAEBench-style plots (headline metric vs L0, one marker per architecture, one colour per
width, a line through a sweep's points), from the evaluate stage folders of one experiment (several folders =
a sweep, gathered into one table and plot). The plots are in :mod:`pipeline.report.plots`.

Values are read from SAEBench's own result JSONs and the evaluate stage's ``saes.json``; nothing is
recomputed (``1 − FVU`` is the held-out FVU subtracted from 1). Non-finite values are shown as ``+inf`` /
``-inf`` / ``nan``, never dropped; SAEBench's core writes NaN as -1 (its ``replace_nans_with_negative_one``),
which the report notes.

Every string the report shows that the project does not write itself (names, skip reasons, notes, failure
messages, labelled titles, the config) goes through :mod:`pipeline.report.escape`: it reads as itself in the
markdown and in ``report.html``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.evals.results import FAILED_FILE, INFO_FILE, SKIPPED_FILE
from pipeline.report.escape import md_cell, md_code, md_fence, md_text
from pipeline.report.notes import explained_variance_note, how_to_read
from pipeline.report.plots import (
    FIT_CURVE_FILE,
    FVU_TIME_PLOT_FILE,
    MARKERS,
    METRIC_PLOT_FILE,
    PLOT_DPI,
    plot_fit_curves,
    plot_fvu_vs_time,
    plot_metric_vs_l0,
)
from pipeline.report.quality import time_to_quality
from pipeline.report.rows import (
    BUDGET_COLUMNS,
    COLUMNS,
    FIT_POSITIONS_EVAL,
    HEADLINES,
    REPORT_FILE,
    STATS,
    SUMMARY_FILE,
    Row,
    budget_cells,
    columns_present,
    fmt,
    load_rows,
    read_json_or,
    steps_text,
    width_label,
)
from pipeline.utils.atomic import atomic_write_text


# ============================================================================================= markdown
def write_report(eval_folders: list[Path], out: Path, config_yaml: str = "", title: str = "") -> Path:
    """Write ``out/report.md`` (+ PNGs, ``summary.json``), every file atomically, from the evaluate folders;
    returns the report path. ``title``: the heading, as inline markdown (its caller escapes what it interpolates,
    :func:`~pipeline.report.escape.md_code`)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(eval_folders)
    cols = columns_present(rows)
    lines = [f"# {title or 'DB-KSVD dictionary vs SAE baselines'}", ""]
    if not rows:
        lines += [
            "No evaluated SAE found (the evaluate stage has not run, or wrote no `saes.json`):",
            *[f"- {md_code(f)}" for f in eval_folders],
            "",
        ]
    lines += time_to_quality(rows)
    lines += [
        "Every number below is read from SAEBench's own result files (`eval_results/<eval>/*.json`) and "
        "the evaluate stage's `saes.json` (held-out activations of the harvest store, training budgets). "
        "`—` = not evaluated or not recorded (see *Skipped*); `+inf`/`-inf`/`nan` are shown as the result "
        "files hold them; SAEBench's core writes NaN as -1.",
        "",
    ]
    lines += how_to_read(rows, cols)
    # the table
    head = ["SAE", "architecture", "width", "k", *BUDGET_COLUMNS, *cols]
    lines += ["## Metrics", "", "| " + " | ".join(md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            md_code(r.name),
            md_text(r.architecture),
            r.width_text,
            str(r.k) if r.k is not None else "—",
            *budget_cells(r),
            *[fmt(r.value(c)) for c in cols],
        ]
        lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
    lines.append("")
    lines += [f"- **{c}**: {d}" for c, ev, cat, key, d in COLUMNS if c in cols]
    lines.append(
        "- **L0 / FVU / 1 − FVU / dead frac. (held-out)**: on the store's held-out activations; dead = "
        "never active there. **mean max |cos|**: mean over atoms of the largest |cosine| with another atom."
    )
    lines.append("")
    lines += explained_variance_note(rows, cols)
    lines += _plots(rows, out)
    lines += _folder_sections(eval_folders)
    if config_yaml:
        lines += ["## Config", "", *md_fence(config_yaml, "yaml"), ""]
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary(rows, cols), indent=2, default=str))
    return atomic_write_text(out / REPORT_FILE, "\n".join(lines))


def summary(rows: list[Row], cols: list[str]) -> list[dict[str, Any]]:
    """Every row as JSON: identity, the budget dict and its columns, every column of the table."""
    out = []
    for r in rows:
        b = r.budget
        out.append(
            {
                "name": r.name,
                "folder": str(r.folder),
                "kind": r.described.get("kind"),
                "architecture": r.architecture,
                "saebench_architecture": r.saebench_architecture,
                "width": r.width,
                "k": r.k,
                "budget": b or None,
                "budget mode": b.get("mode"),
                "wall s": b.get("seconds"),
                "samples": b.get("samples"),
                "steps/updates": None if steps_text(b) == "—" else steps_text(b),
                "device": b.get("device"),
                **{c: r.value(c) for c in cols},
            }
        )
    return out


def _plots(rows: list[Row], out: Path) -> list[str]:
    lines = []
    time_plot = plot_fvu_vs_time(rows, out)
    fit = plot_fit_curves(rows, out)
    l0_plots = []
    for ev, col in HEADLINES:
        p = plot_metric_vs_l0(rows, col, out, ev)
        if p:
            l0_plots.append(f"![{col} vs L0]({p.name})")
    if not (l0_plots or fit or time_plot):
        return []
    lines += ["## Plots", ""]
    if time_plot:
        lines += [
            "Held-out FVU against training wall time, every method on one log-log plot, measured while each "
            "trained (log grid of updates / steps); markers = the end of training; dotted = the dictionary's "
            "fit time and held-out FVU.",
            "",
            f"![FVU vs wall time]({time_plot.name})",
            "",
        ]
    if l0_plots:
        lines += [
            "Headline metric vs L0 (SAEBench convention): one marker per architecture (★ = DB-KSVD), one "
            "colour per width; rows of one architecture and width (a sweep) joined by a line in L0 order.",
            "",
        ]
        lines += l0_plots
    if fit:
        lines += ["", "Dictionary fit curve (training-batch FVU vs iteration):", "", f"![fit curve]({fit.name})"]
    return lines + [""]


def _folder_sections(eval_folders: list[Path]) -> list[str]:
    """Per evaluate folder: model, sizes, skipped, failures, notes."""
    lines = []
    for folder in eval_folders:
        info = read_json_or(folder / INFO_FILE, {})
        skipped = read_json_or(folder / SKIPPED_FILE, [])
        failed = read_json_or(folder / FAILED_FILE, [])
        lines += [f"## Evaluation {md_code(folder.name)}", ""]
        if info:
            lines += _info_lines(info)
        for note in info.get("notes", []):
            low = " (low confidence)" if note.get("low_confidence") else ""
            lines.append(f"- **{md_text(note['metric'])}{low}**: {md_text(note['note'])}")
        if skipped:
            lines += ["", "Skipped:", ""]
            lines += [
                f"- {md_text(s['what'])}{' / ' + md_text(s['sae']) if s.get('sae') else ''}: {md_text(s['reason'])}"
                for s in skipped
            ]
        if failed:
            lines += ["", "**Failed** (re-run the evaluate stage to retry):", ""]
            lines += [f"- {md_text(f['metric'])}: {md_code(f['error'])}" for f in failed]
        if info.get("sizes"):
            lines += ["", "Eval sizes used:", "", *md_fence(json.dumps(info["sizes"], indent=1, default=str), "json")]
        lines.append("")
    return lines


def _info_lines(info: dict[str, Any]) -> list[str]:
    """The model, hook, device and timings of one evaluate folder, and its labelled data (``eval_info.json``)."""
    m = info.get("model", {})
    timings = ", ".join(f"{md_text(k)} {v:.0f} s" for k, v in (info.get("timings_s") or {}).items())
    lines = [
        f"- model {md_code(m.get('name'))} ({fmt(m.get('n_params'), 3)} parameters), hook "
        f"{md_code(m.get('hook'))}, device {md_text(info.get('device'))}; evals took "
        f"{fmt(info.get('total_eval_s'), 4)} s ({timings})"
    ]
    ld = info.get("labelled_data")
    if ld:
        lines.append(
            f"- labelled data {md_code(ld['name'])}: paragraphs of {', '.join(map(md_text, ld['titles']))}; "
            "column1 = which document, column2 = dialogue vs narration (SAEBench's bias_in_bios layout)"
        )
    return lines


__all__ = [
    "BUDGET_COLUMNS",
    "COLUMNS",
    "FIT_CURVE_FILE",
    "FIT_POSITIONS_EVAL",
    "FVU_TIME_PLOT_FILE",
    "HEADLINES",
    "MARKERS",
    "METRIC_PLOT_FILE",
    "PLOT_DPI",
    "REPORT_FILE",
    "STATS",
    "SUMMARY_FILE",
    "Row",
    "budget_cells",
    "columns_present",
    "explained_variance_note",
    "fmt",
    "how_to_read",
    "load_rows",
    "summary",
    "width_label",
    "write_report",
]
