"""The report's generated notes: "How to read this" (what is compared, the budgets, widths, positions) and the
explained-variance note under the table, each written from the rows, never from a template that could
claim what the data does not show."""

from __future__ import annotations

import math

from pipeline.evals.results import RESULTS_SUBDIR
from pipeline.report.escape import md_code, md_text
from pipeline.report.rows import (
    COLUMNS,
    EV_COLUMN,
    EV_LEGACY_COLUMN,
    FIT_POSITIONS_EVAL,
    MODE_MEANINGS,
    ONE_MINUS_FVU,
    STATS,
    Row,
    fmt,
    fmt_count,
    fmt_seconds,
    is_number,
    joined_names,
    joined_values,
)


def how_to_read(rows: list[Row], cols: list[str]) -> list[str]:
    """The "How to read this" section, generated from the rows: what is compared, the budget mode(s) and what
    they mean, devices, widths, and which positions each column covers."""
    if not rows:
        return []
    lines = ["## How to read this", ""]
    dicts = [r for r in rows if r.is_dictionary]
    bases = [r for r in rows if not r.is_dictionary]
    arch = joined_values([r.architecture for r in bases])
    if dicts and bases:
        lines.append(
            f"- **Compared**: {len(dicts)} DB-KSVD dictionar{'y' if len(dicts) == 1 else 'ies'} "
            f"against {len(bases)} baseline SAE{'s' if len(bases) != 1 else ''} ({arch}). Rows are "
            "sorted by architecture, width, k; dictionary rows first."
        )
    elif dicts:
        lines.append(
            "- **No baseline** in these evaluations: the table describes the dictionary alone, it is not a comparison."
        )
    else:
        lines.append(f"- **No dictionary** in these evaluations: the table lists baselines only ({arch}).")
    lines += _budget_lines(rows, bases)
    lines += _sparsity_lines(rows)
    lines += _width_lines(rows)
    lines += _position_lines(rows, cols)
    return lines + [""]


def _budget_lines(rows: list[Row], bases: list[Row]) -> list[str]:
    out = []
    modes: dict[str, list[Row]] = {}
    for r in rows:
        if r.budget.get("mode"):
            modes.setdefault(str(r.budget["mode"]), []).append(r)
    if modes:
        out.append(
            "- **Budget** (`budget` column; `wall s` = training wall time, `samples` = training samples "
            "seen, `steps/updates` = optimiser steps of an SAE / dictionary updates):"
        )
    for mode, members in modes.items():
        factors = [float(r.budget["factor"]) for r in members if is_number(r.budget.get("factor"))]
        factor = "" if all(f == 1 for f in factors) else f" × {joined_values(factors, lambda f: fmt(f, 3))}"
        target = ""
        if mode in ("equal_time", "time"):
            ts = [r.budget.get("target_seconds") for r in members if is_number(r.budget.get("target_seconds"))]
            target = f" (target {joined_values(ts, fmt_seconds)} s)" if ts else ""
        elif mode in ("equal_samples", "samples"):
            ts = [r.budget.get("target_samples") for r in members if is_number(r.budget.get("target_samples"))]
            target = f" (target {joined_values(ts, fmt_count)} samples)" if ts else ""
        elif mode == "plateau":
            ts = [r.budget.get("cap_samples") for r in members if is_number(r.budget.get("cap_samples"))]
            target = f"; cap {joined_values(ts, fmt_count)} samples" if ts else ""
        elif mode == "steps":
            ts = [r.budget.get("steps") for r in members if is_number(r.budget.get("steps"))]
            target = f" ({joined_values(ts, fmt_count)})" if ts else ""
        meaning = MODE_MEANINGS.get(mode, "a budget mode this report does not know").format(
            factor=factor, target=target
        )
        out.append(f"  - {md_code(mode)}: {meaning}: {joined_names(members)}.")
    missing = [r for r in rows if not r.budget.get("mode")]
    if missing:
        out.append(
            f"- **No budget recorded** for {joined_names(missing)} (an older evaluate folder, or an SAE trained "
            "elsewhere): their budget columns are `—`."
        )
    base_budgets = {(str(r.budget.get("mode")), r.budget.get("factor")) for r in bases if r.budget.get("mode")}
    if len(base_budgets) > 1:
        out.append(
            "- **Budgets differ between baseline rows** ("
            + "; ".join(
                md_code(m) + (f" ×{fmt(float(f), 3)}" if is_number(f) and f != 1 else "")
                for m, f in sorted(base_budgets, key=str)
            )
            + "): compare rows trained under the same budget."
        )
    devices: dict[str, list[Row]] = {}
    for r in rows:
        if r.budget.get("device"):
            devices.setdefault(str(r.budget["device"]), []).append(r)
    if len(devices) > 1:
        what = (
            "an `equal_time` budget across devices is not a fair match"
            if "equal_time" in modes or "time" in modes
            else "wall times across devices are not comparable"
        )
        out.append(
            "- **Warning: devices differ** ("
            + "; ".join(f"{md_text(d)}: {joined_names(rs)}" for d, rs in devices.items())
            + f"): {what}."
        )
    elif devices:
        out.append(f"- Every recorded budget ran on {md_code(next(iter(devices)))}.")
    return out


#: Relative distance of a row's held-out L0 from its k beyond which the row is flagged as not at matched L0.
L0_MISMATCH = 0.1


def _sparsity_lines(rows: list[Row]) -> list[str]:
    """Rows whose held-out L0 is more than :data:`L0_MISMATCH` from their k: FVUs at different L0s do not rank
    methods (a short budget can leave a BatchTopK threshold or a JumpReLU L0 penalty short of its target)."""
    off = []
    for r in rows:
        l0 = r.value("L0 (held-out)")
        if r.k and l0 is not None and math.isfinite(l0) and abs(l0 - r.k) > L0_MISMATCH * r.k:
            off.append(f"{md_code(r.name)} (held-out L0 {fmt(l0)} against k = {r.k})")
    if not off:
        return []
    return [
        "- **Not at matched L0**: " + ", ".join(off) + ". Compare their FVU and loss recovered only with rows at "
        "a similar L0; a longer budget (`compare.factor`) or a sweep of the architecture's sparsity setting "
        "brings a baseline to its target."
    ]


def _width_lines(rows: list[Row]) -> list[str]:
    by_width: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: r.width or 0):
        by_width.setdefault(r.width_text, [])
        if r.architecture not in by_width[r.width_text]:
            by_width[r.width_text].append(r.architecture)
    out = [
        "- **Width** = latents of the SAE as SAEBench sees it; compared at "
        + "; ".join(f"{w} ({', '.join(map(md_text, a))})" for w, a in by_width.items())
        + "."
    ]
    if any(r.described.get("signed") and r.described.get("export", "split") == "split" for r in rows):
        out.append("  - A signed dictionary of K atoms is exported ± split (each atom as +d and −d): width 2K.")
    if any(r.described.get("signed") and r.described.get("export") == "signed" for r in rows):
        out.append("  - A signed dictionary exported with signed codes (`eval.signed_export=signed`): width K.")
    out += [
        f"  - {md_code(r.name)}: {md_text(str(r.described['width_note']).rstrip('.'))}."
        for r in rows
        if r.described.get("width_note")
    ]
    out += [
        f"  - {md_code(r.name)}: trained as {md_code(r.architecture)}; SAEBench's results record the inference "
        f"form {md_code(r.saebench_architecture)}."
        for r in rows
        if r.saebench_architecture and r.described.get("architecture") and r.saebench_architecture != r.architecture
    ]
    return out


def _position_lines(rows: list[Row], cols: list[str]) -> list[str]:
    out = ["- **Positions** each number covers:"]
    held = [r.described.get("heldout_rows") for r in rows if is_number(r.described.get("heldout_rows"))]
    out.append(
        "  - "
        + ", ".join(f"`{c}`" for c, _ in STATS if c != "mean max |cos|")
        + ": the harvest store's held-out rows"
        + (f" ({joined_values(held, fmt_count)} rows)" if held else "")
        + ", which leave out special tokens and attention-sink outlier positions (the store manifest "
        "records the counts); `mean max |cos|` is a property of the decoder weights."
    )
    notes = [str(r.described["heldout_positions_note"]) for r in rows if r.described.get("heldout_positions_note")]
    out += [f"    - {md_text(n.rstrip('.'))}." for n in dict.fromkeys(notes)]
    core_cols = [c for c, ev, *_ in COLUMNS if ev == "core" and c in cols]
    if core_cols:
        cores = [r.results["core"] for r in rows if "core" in r.results]
        cfgs = [c.get("eval_config") or {} for c in cores]
        excl = {cfg.get("exclude_special_tokens_from_reconstruction") for cfg in cfgs} - {None}
        datasets = [str(cfg["dataset"]) for cfg in cfgs if cfg.get("dataset")]
        splice = (
            "every position"
            if excl == {False}
            else "every position except special tokens"
            if excl == {True}
            else "the positions SAEBench's `exclude_special_tokens_from_reconstruction` selects"
        )
        out.append(
            "  - "
            + ", ".join(f"`{c}`" for c in core_cols)
            + ": SAEBench core on its own eval text"
            + (f" ({joined_values(datasets)})" if datasets else "")
            + f"; the reconstruction is spliced in at "
            f"{splice} for loss recovered / CE / KL; its sparsity and variance statistics skip only the "
            "tokens SAEBench is given as `ignore_tokens` (BOS/EOS/pad). Attention-sink outlier positions "
            "are included, unlike the held-out columns."
        )
    fit_cols = [c for c, ev, *_ in COLUMNS if ev == FIT_POSITIONS_EVAL and c in cols]
    if fit_cols:
        out.append(
            "  - " + ", ".join(f"`{c}`" for c in fit_cols) + ": SAEBench core with the SAE spliced in only "
            f"at the positions the fit trains on (`{RESULTS_SUBDIR}/{FIT_POSITIONS_EVAL}/`)."
        )
    other = [c for c, ev, *_ in COLUMNS if ev not in ("core", FIT_POSITIONS_EVAL) and c in cols]
    if other:
        out.append(
            "  - The other SAEBench metrics (" + ", ".join(f"`{c}`" for c in other) + ") use their own "
            "datasets and positions (see SAEBench)."
        )
    return out


def explained_variance_note(rows: list[Row], cols: list[str]) -> list[str]:
    """Why SAEBench's explained variance differs from ``1 − FVU`` (only when SAEBench's value is in the table)."""
    if EV_COLUMN not in cols:
        return []
    above = [(r, r.value(EV_COLUMN)) for r in rows]
    above = [(r, v) for r, v in above if v is not None and math.isfinite(v) and v > 1]
    exceed = ", ".join(f"{md_code(r.name)} ({fmt(v)})" for r, v in above)
    here = f" Here it exceeds 1 for {exceed}." if above else ""
    lines = [
        f"**Explained variance.** `{EV_COLUMN}` is SAEBench core's `explained_variance` = "
        "1 − E‖x − x̂‖² / (E‖x‖² − (mean_j E[x_j²])²): the denominator subtracts the square of a scalar, the "
        "per-dimension mean of E[x_j²], where a variance would subtract ‖E[x]‖², so it is not a fraction of "
        f"variance and can exceed 1.{here} `{ONE_MINUS_FVU}` = 1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over the held-out "
        "rows is the fraction of variance explained."
    ]
    if EV_LEGACY_COLUMN in cols:
        lines[0] += (
            f" `{EV_LEGACY_COLUMN}` (SAEBench's older formula) = the mean over positions of "
            "1 − ‖x − x̂‖² / ‖x − x̄‖², x̄ the batch mean: a mean of per-position ratios, not a ratio of "
            "sums."
        )
    return lines + [""]
