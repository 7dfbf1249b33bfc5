"""The comparison report: one table of every metric for the dictionary and its baselines (sorted by
architecture, with each SAE's training budget), a generated "How to read this" section, the FVU-vs-wall-time
plot, the fit curve and SAEBench-style plots (headline metric vs L0, one marker per architecture, one colour per
width, a line through a sweep's points), from the evaluate stage folders of one experiment (several folders =
a sweep, gathered into one table and plot). The plots are in :mod:`pipeline.evals.report_plots`.

Values are read from SAEBench's own result JSONs and the evaluate stage's ``saes.json``; nothing is
recomputed (``1 − FVU`` is the held-out FVU subtracted from 1). Non-finite values are shown as ``+inf`` /
``-inf`` / ``nan``, never dropped; SAEBench's core writes NaN as -1 (its ``replace_nans_with_negative_one``),
which the report notes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.evals.report_plots import (FIT_CURVE_FILE, FVU_TIME_PLOT_FILE, MARKERS, METRIC_PLOT_FILE, PLOT_DPI,
                                         plot_fit_curves, plot_fvu_vs_time, plot_metric_vs_l0)
from pipeline.evals.results import FAILED_FILE, INFO_FILE, RESULTS_SUBDIR, SAES_FILE, SKIPPED_FILE
from pipeline.utils.atomic import atomic_write_text

REPORT_FILE = "report.md"
"""The report, in the report folder."""
SUMMARY_FILE = "summary.json"
"""Every row of the table as JSON."""
FIT_POSITIONS_EVAL = "core_fit_positions"
"""The ``eval_results/`` folder of SAEBench core restricted to the positions the fit trains on (core's layout)."""

EV_COLUMN = "expl. var. (SAEBench)"
EV_LEGACY_COLUMN = "expl. var. legacy"
ONE_MINUS_FVU = "1 − FVU (held-out)"

#: (column, eval, category, key, description) of every table column read from SAEBench results.
COLUMNS: list[tuple[str, str, str, str, str]] = [
    ("L0 (core)", "core", "sparsity", "l0", "mean active latents on the core eval text"),
    (EV_COLUMN, "core", "reconstruction_quality", "explained_variance",
     "SAEBench core's `explained_variance` (not a fraction of variance, see the note below)"),
    (EV_LEGACY_COLUMN, "core", "reconstruction_quality", "explained_variance_legacy",
     "SAEBench core's `explained_variance_legacy` (its older formula, see the note below)"),
    ("cossim", "core", "reconstruction_quality", "cossim", "cosine(x, x̂)"),
    ("loss recovered", "core", "model_performance_preservation", "ce_loss_score",
     "core CE loss recovered (headline)"),
    ("CE with SAE", "core", "model_performance_preservation", "ce_loss_with_sae", "next-token CE, SAE spliced in"),
    ("CE clean", "core", "model_performance_preservation", "ce_loss_without_sae", "next-token CE, clean"),
    ("KL score", "core", "model_behavior_preservation", "kl_div_score", "core KL-divergence score"),
    ("loss recovered (fit positions)", FIT_POSITIONS_EVAL, "model_performance_preservation", "ce_loss_score",
     "core CE loss recovered, SAE spliced in only at the positions the fit trains on"),
    ("KL score (fit positions)", FIT_POSITIONS_EVAL, "model_behavior_preservation", "kl_div_score",
     "core KL-divergence score, SAE spliced in only at the positions the fit trains on"),
    ("alive", "core", "misc_metrics", "frac_alive", "fraction of latents that fired on the core text"),
    ("absorption", "absorption", "mean", "mean_absorption_fraction_score",
     "mean absorption fraction (lower is better)"),
    ("full absorption", "absorption", "mean", "mean_full_absorption_score", "full absorption rate"),
    ("split feats", "absorption", "mean", "mean_num_split_features", "mean split features per letter"),
    ("SAE probe top-1", "sparse_probing", "sae", "sae_top_1_test_accuracy", "sparse probing, top-1 latent"),
    ("SAE probe top-5", "sparse_probing", "sae", "sae_top_5_test_accuracy", "sparse probing, top-5 latents"),
    ("SAE probe all", "sparse_probing", "sae", "sae_test_accuracy", "probe on all latents"),
    ("LLM probe top-1", "sparse_probing", "llm", "llm_top_1_test_accuracy", "residual-stream reference"),
    ("SCR@10", "scr", "scr_metrics", "scr_metric_threshold_10", "SCR, 10 latents ablated"),
    ("SCR@20", "scr", "scr_metrics", "scr_metric_threshold_20", "SCR, 20 latents ablated"),
    ("TPP@10", "tpp", "tpp_metrics", "tpp_threshold_10_total_metric", "TPP, 10 latents ablated"),
    ("TPP@20", "tpp", "tpp_metrics", "tpp_threshold_20_total_metric", "TPP, 20 latents ablated"),
    ("autointerp", "autointerp", "autointerp", "autointerp_score", "autointerp score"),
    ("RAVEL", "ravel", "ravel", "disentanglement_score", "RAVEL disentanglement"),
    ("unlearning", "unlearning", "unlearning", "unlearning_score", "unlearning score"),
]
#: Headline metric per eval for the plots (SAEBench graphing_utils convention).
HEADLINES = [("core", "loss recovered"), (FIT_POSITIONS_EVAL, "loss recovered (fit positions)"),
             ("absorption", "absorption"), ("sparse_probing", "SAE probe top-1"), ("scr", "SCR@10"),
             ("tpp", "TPP@10"), ("autointerp", "autointerp"), ("ravel", "RAVEL"), ("unlearning", "unlearning")]
#: (column, key of the description) of the held-out statistics; ``None``: derived (``1 − fvu``).
STATS: list[tuple[str, str | None]] = [("L0 (held-out)", "l0"), ("FVU (held-out)", "fvu"), (ONE_MINUS_FVU, None),
                                       ("dead frac.", "dead_fraction"), ("mean max |cos|", "mean_max_abs_cos")]
#: The training-budget columns, right after ``k``.
BUDGET_COLUMNS = ["budget", "wall s", "samples", "steps/updates", "device"]
#: What each budget mode means (``{factor}`` / ``{target}`` filled from the rows).
MODE_MEANINGS = {
    "equal_time": "every baseline trained for the dictionary's measured fit wall time{target}{factor} on the "
                  "device listed",
    "equal_samples": "as many training samples as the dictionary's fit saw{target}{factor}",
    "steps": "a fixed number of optimiser steps{target}",
    "converged": "trained until the held-out FVU stopped improving",
    "fit": "the dictionary's own schedule (its fit)",
    "time": "a fixed wall-time budget{target}",
    "samples": "a fixed number of training samples{target}",
}


@dataclass
class Row:
    """One evaluated SAE of one evaluate folder: its description (``saes.json``) and SAEBench results."""

    name: str
    folder: Path
    described: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval -> SAEBench JSON

    @property
    def saebench_architecture(self) -> str | None:
        """``sae_cfg_dict.architecture`` of SAEBench's results (the inference form: sae-lens saves a BatchTopK
        SAE as JumpReLU)."""
        for r in self.results.values():
            a = (r.get("sae_cfg_dict") or {}).get("architecture")
            if a:
                return str(a)
        return None

    @property
    def architecture(self) -> str:
        """The training architecture of the description, else SAEBench's, else ``?``."""
        return str(self.described.get("architecture") or self.saebench_architecture or "?")

    @property
    def is_dictionary(self) -> bool:
        """A DB-KSVD dictionary (``kind`` = dictionary, or no kind and architecture ``dbksvd``)."""
        kind = self.described.get("kind")
        return kind == "dictionary" or (kind is None and self.architecture == "dbksvd")

    @property
    def width(self) -> int | None:
        w = self.described.get("width")
        if w is None:
            for r in self.results.values():
                w = (r.get("sae_cfg_dict") or {}).get("d_sae")
                if w:
                    break
        return int(w) if w else None

    @property
    def width_text(self) -> str:
        """The width as SAEBench labels it (:func:`width_label`)."""
        return width_label(self.width)

    @property
    def k(self) -> int | None:
        k = self.described.get("k")
        return int(k) if isinstance(k, (int, float)) and not isinstance(k, bool) else None

    @property
    def budget(self) -> dict[str, Any]:
        """The description's ``budget`` dict ({} when absent)."""
        b = self.described.get("budget")
        return b if isinstance(b, dict) else {}

    def sort_key(self) -> tuple:
        """Dictionary rows first, then (architecture, width, k, name)."""
        return (not self.is_dictionary, self.architecture, self.width or 0, self.k or 0, self.name)

    def metric(self, eval_name: str, category: str, key: str) -> float | None:
        r = self.results.get(eval_name)
        if r is None:
            return None
        v = ((r.get("eval_result_metrics") or {}).get(category) or {}).get(key)
        return None if v is None else float(v)

    def value(self, column: str) -> float | None:
        for col, ev, cat, key, _ in COLUMNS:
            if col == column:
                return self.metric(ev, cat, key)
        for col, key in STATS:
            if col == column:
                v = self.described.get(key or "fvu")
                if v is None:
                    return None
                return float(v) if key else 1.0 - float(v)
        raise KeyError(column)

    @property
    def l0(self) -> float | None:
        v = self.value("L0 (core)")
        return v if v is not None else self.value("L0 (held-out)")


def width_label(w: int | None) -> str:
    """SAEBench's width labels: 4096 -> 4k, 16384 -> 16k, 65536 -> 65k."""
    if not w:
        return "?"
    return f"{w // 1000}k" if w >= 1000 and w % 1024 == 0 else str(w)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: float | None, digits: int = 4) -> str:
    """A table cell: ``—`` for missing, ``+inf``/``-inf``/``nan`` for non-finite values."""
    if v is None:
        return "—"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.{digits}g}"


def fmt_seconds(v: Any) -> str:
    """Wall seconds: ``—`` when missing, one decimal (two below 10 s)."""
    if not _number(v):
        return "—"
    if not math.isfinite(v):
        return fmt(float(v))
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def fmt_count(v: Any) -> str:
    """A count with thousands separators; ``—`` when missing."""
    if not _number(v):
        return "—"
    return f"{int(v):,}" if math.isfinite(v) else fmt(float(v))


def steps_text(budget: dict[str, Any]) -> str:
    """``735 steps`` (an SAE's optimiser steps) / ``40 updates`` (the dictionary's updates); ``—`` if neither."""
    parts = [f"{fmt_count(budget[key])} {key}" for key in ("steps", "updates") if _number(budget.get(key))]
    return ", ".join(parts) or "—"


def budget_cells(row: Row) -> list[str]:
    """The :data:`BUDGET_COLUMNS` cells of a row (``—`` for anything its budget does not record)."""
    b = row.budget
    mode = str(b["mode"]) if b.get("mode") else "—"
    if mode != "—" and _number(b.get("factor")) and b["factor"] != 1:
        mode += f" ×{fmt(float(b['factor']), 3)}"
    return [mode, fmt_seconds(b.get("seconds")), fmt_count(b.get("samples")), steps_text(b),
            str(b["device"]) if b.get("device") else "—"]


def load_rows(eval_folders: list[Path]) -> list[Row]:
    """Every SAE of every evaluate folder, with its SAEBench results, sorted by :meth:`Row.sort_key`."""
    rows = []
    for folder in eval_folders:
        saes_path = folder / SAES_FILE
        if not saes_path.exists():
            continue
        descs = [d for d in json.loads(saes_path.read_text()) if isinstance(d, dict) and d.get("name")]
        names = [_safe(d["name"]) for d in descs]
        for desc in descs:
            row = Row(desc["name"], folder, desc)
            for ev_dir in sorted((folder / RESULTS_SUBDIR).glob("*")):
                if not ev_dir.is_dir():
                    continue
                hit = _result_file(ev_dir, _safe(desc["name"]), names)
                if hit is not None:
                    row.results[ev_dir.name] = json.loads(hit.read_text())
            rows.append(row)
    return sorted(rows, key=Row.sort_key)


def _result_file(ev_dir: Path, name: str, names: list[str]) -> Path | None:
    """The result JSON of SAE ``name`` in one metric folder: ``<name>_*eval_results.json``, leaving out files of
    another SAE of the folder whose name extends this one (``topk_k4`` vs ``topk_k4_b``)."""
    longer = [n for n in names if n != name and n.startswith(name + "_")]
    hits = [p for p in sorted(ev_dir.glob(f"{name}_*eval_results.json"))
            if not any(p.name.startswith(n + "_") for n in longer)]
    return hits[0] if hits else None


def _safe(name: str) -> str:
    return name.replace("/", "_")


def _json_or(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def columns_present(rows: list[Row]) -> list[str]:
    """The held-out columns, then every SAEBench column some row has a value for."""
    cols = [c for c, *_ in COLUMNS if any(r.value(c) is not None for r in rows)]
    return [c for c, _ in STATS] + cols


def _cell(text: str) -> str:
    """A markdown table cell: ``|`` escaped (``mean max |cos|`` would otherwise split the cell)."""
    return text.replace("|", "\\|")


def _names(rows: list[Row]) -> str:
    return ", ".join(f"`{r.name}`" for r in rows)


def _values(vs: list[Any], render: Any = str) -> str:
    return ", ".join(dict.fromkeys(render(v) for v in vs))


# ============================================================================================= how to read
def how_to_read(rows: list[Row], cols: list[str]) -> list[str]:
    """The "How to read this" section, generated from the rows: what is compared, the budget mode(s) and what
    they mean, devices, widths, and which positions each column covers."""
    if not rows:
        return []
    lines = ["## How to read this", ""]
    dicts = [r for r in rows if r.is_dictionary]
    bases = [r for r in rows if not r.is_dictionary]
    arch = _values([r.architecture for r in bases])
    if dicts and bases:
        lines.append(f"- **Compared**: {len(dicts)} DB-KSVD dictionar{'y' if len(dicts) == 1 else 'ies'} "
                     f"against {len(bases)} baseline SAE{'s' if len(bases) != 1 else ''} ({arch}). Rows are "
                     "sorted by architecture, width, k; dictionary rows first.")
    elif dicts:
        lines.append("- **No baseline** in these evaluations: the table describes the dictionary alone, it is "
                     "not a comparison.")
    else:
        lines.append(f"- **No dictionary** in these evaluations: the table lists baselines only ({arch}).")
    lines += _budget_lines(rows, bases)
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
        out.append("- **Budget** (`budget` column; `wall s` = training wall time, `samples` = training samples "
                   "seen, `steps/updates` = optimiser steps of an SAE / dictionary updates):")
    for mode, members in modes.items():
        factors = [float(r.budget["factor"]) for r in members if _number(r.budget.get("factor"))]
        factor = "" if all(f == 1 for f in factors) else f" × {_values(factors, lambda f: fmt(f, 3))}"
        target = ""
        if mode in ("equal_time", "time"):
            ts = [r.budget.get("target_seconds") for r in members if _number(r.budget.get("target_seconds"))]
            target = f" (target {_values(ts, fmt_seconds)} s)" if ts else ""
        elif mode in ("equal_samples", "samples"):
            ts = [r.budget.get("target_samples") for r in members if _number(r.budget.get("target_samples"))]
            target = f" (target {_values(ts, fmt_count)} samples)" if ts else ""
        elif mode == "steps":
            ts = [r.budget.get("steps") for r in members if _number(r.budget.get("steps"))]
            target = f" ({_values(ts, fmt_count)})" if ts else ""
        meaning = MODE_MEANINGS.get(mode, "a budget mode this report does not know").format(factor=factor,
                                                                                           target=target)
        out.append(f"  - `{mode}`: {meaning}: {_names(members)}.")
    missing = [r for r in rows if not r.budget.get("mode")]
    if missing:
        out.append(f"- **No budget recorded** for {_names(missing)} (an older evaluate folder, or an SAE trained "
                   "elsewhere): their budget columns are `—`.")
    base_budgets = {(str(r.budget.get("mode")), r.budget.get("factor")) for r in bases if r.budget.get("mode")}
    if len(base_budgets) > 1:
        out.append("- **Budgets differ between baseline rows** (" + "; ".join(
            f"`{m}`" + (f" ×{fmt(float(f), 3)}" if _number(f) and f != 1 else "") for m, f in sorted(
                base_budgets, key=str)) + "): compare rows trained under the same budget.")
    devices: dict[str, list[Row]] = {}
    for r in rows:
        if r.budget.get("device"):
            devices.setdefault(str(r.budget["device"]), []).append(r)
    if len(devices) > 1:
        what = ("an `equal_time` budget across devices is not a fair match" if "equal_time" in modes or "time"
                in modes else "wall times across devices are not comparable")
        out.append("- **Warning: devices differ** (" + "; ".join(f"{d}: {_names(rs)}" for d, rs in devices.items())
                   + f"): {what}.")
    elif devices:
        out.append(f"- Every recorded budget ran on `{next(iter(devices))}`.")
    return out


def _width_lines(rows: list[Row]) -> list[str]:
    by_width: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: r.width or 0):
        by_width.setdefault(r.width_text, [])
        if r.architecture not in by_width[r.width_text]:
            by_width[r.width_text].append(r.architecture)
    out = ["- **Width** = latents of the SAE as SAEBench sees it; compared at " +
           "; ".join(f"{w} ({', '.join(a)})" for w, a in by_width.items()) + "."]
    if any(r.described.get("signed") for r in rows):
        out.append("  - A signed dictionary of K atoms is exported ± split (each atom as +d and −d): width 2K.")
    out += [f"  - `{r.name}`: {str(r.described['width_note']).rstrip('.')}." for r in rows
            if r.described.get("width_note")]
    out += [f"  - `{r.name}`: trained as `{r.architecture}`; SAEBench's results record the inference form "
            f"`{r.saebench_architecture}`." for r in rows
            if r.saebench_architecture and r.described.get("architecture")
            and r.saebench_architecture != r.architecture]
    return out


def _position_lines(rows: list[Row], cols: list[str]) -> list[str]:
    out = ["- **Positions** each number covers:"]
    held = [r.described.get("heldout_rows") for r in rows if _number(r.described.get("heldout_rows"))]
    out.append("  - " + ", ".join(f"`{c}`" for c, _ in STATS if c != "mean max |cos|") +
               ": the harvest store's held-out rows" + (f" ({_values(held, fmt_count)} rows)" if held else "") +
               ", which leave out special tokens and attention-sink outlier positions (the store manifest "
               "records the counts); `mean max |cos|` is a property of the decoder weights.")
    notes = [str(r.described["heldout_positions_note"]) for r in rows if r.described.get("heldout_positions_note")]
    out += [f"    - {n.rstrip('.')}." for n in dict.fromkeys(notes)]
    core_cols = [c for c, ev, *_ in COLUMNS if ev == "core" and c in cols]
    if core_cols:
        cores = [r.results["core"] for r in rows if "core" in r.results]
        cfgs = [c.get("eval_config") or {} for c in cores]
        excl = {cfg.get("exclude_special_tokens_from_reconstruction") for cfg in cfgs} - {None}
        datasets = [str(cfg["dataset"]) for cfg in cfgs if cfg.get("dataset")]
        splice = ("every position" if excl == {False} else "every position except special tokens" if excl == {True}
                  else "the positions SAEBench's `exclude_special_tokens_from_reconstruction` selects")
        out.append("  - " + ", ".join(f"`{c}`" for c in core_cols) + ": SAEBench core on its own eval text"
                   + (f" ({_values(datasets)})" if datasets else "") + f"; the reconstruction is spliced in at "
                   f"{splice} for loss recovered / CE / KL; its sparsity and variance statistics skip only the "
                   "tokens SAEBench is given as `ignore_tokens` (BOS/EOS/pad). Attention-sink outlier positions "
                   "are included, unlike the held-out columns.")
    fit_cols = [c for c, ev, *_ in COLUMNS if ev == FIT_POSITIONS_EVAL and c in cols]
    if fit_cols:
        out.append("  - " + ", ".join(f"`{c}`" for c in fit_cols) + ": SAEBench core with the SAE spliced in only "
                   f"at the positions the fit trains on (`{RESULTS_SUBDIR}/{FIT_POSITIONS_EVAL}/`).")
    other = [c for c, ev, *_ in COLUMNS if ev not in ("core", FIT_POSITIONS_EVAL) and c in cols]
    if other:
        out.append("  - The other SAEBench metrics (" + ", ".join(f"`{c}`" for c in other) + ") use their own "
                   "datasets and positions (see SAEBench).")
    return out


def explained_variance_note(rows: list[Row], cols: list[str]) -> list[str]:
    """Why SAEBench's explained variance differs from ``1 − FVU`` (only when SAEBench's value is in the table)."""
    if EV_COLUMN not in cols:
        return []
    above = [(r, r.value(EV_COLUMN)) for r in rows]
    above = [(r, v) for r, v in above if v is not None and math.isfinite(v) and v > 1]
    here = (" Here it exceeds 1 for " + ", ".join(f"`{r.name}` ({fmt(v)})" for r, v in above) + ".") if above else ""
    lines = [f"**Explained variance.** `{EV_COLUMN}` is SAEBench core's `explained_variance` = "
             "1 − E‖x − x̂‖² / (E‖x‖² − (mean_j E[x_j²])²): the denominator subtracts the square of a scalar, the "
             "per-dimension mean of E[x_j²], where a variance would subtract ‖E[x]‖², so it is not a fraction of "
             f"variance and can exceed 1.{here} `{ONE_MINUS_FVU}` = 1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over the held-out "
             "rows is the fraction of variance explained."]
    if EV_LEGACY_COLUMN in cols:
        lines[0] += (f" `{EV_LEGACY_COLUMN}` (SAEBench's older formula) = the mean over positions of "
                     "1 − ‖x − x̂‖² / ‖x − x̄‖², x̄ the batch mean: a mean of per-position ratios, not a ratio of "
                     "sums.")
    return lines + [""]


# ============================================================================================= markdown
def write_report(eval_folders: list[Path], out: Path, config_yaml: str = "", title: str = "") -> Path:
    """Write ``out/report.md`` (+ PNGs, ``summary.json``), every file atomically, from the evaluate folders;
    returns the report path."""
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(eval_folders)
    cols = columns_present(rows)
    lines = [f"# {title or 'DB-KSVD dictionary vs SAE baselines'}", ""]
    if not rows:
        lines += ["No evaluated SAE found (the evaluate stage has not run, or wrote no `saes.json`):",
                  *[f"- `{f}`" for f in eval_folders], ""]
    lines += ["Every number below is read from SAEBench's own result files (`eval_results/<eval>/*.json`) and "
              "the evaluate stage's `saes.json` (held-out activations of the harvest store, training budgets). "
              "`—` = not evaluated or not recorded (see *Skipped*); `+inf`/`-inf`/`nan` are shown as the result "
              "files hold them; SAEBench's core writes NaN as -1.", ""]
    lines += how_to_read(rows, cols)
    # the table
    head = ["SAE", "architecture", "width", "k", *BUDGET_COLUMNS, *cols]
    lines += ["## Metrics", "", "| " + " | ".join(_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r.name}`", r.architecture, r.width_text, str(r.k) if r.k is not None else "—",
                 *budget_cells(r), *[fmt(r.value(c)) for c in cols]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    lines += [f"- **{c}**: {d}" for c, ev, cat, key, d in COLUMNS if c in cols]
    lines.append("- **L0 / FVU / 1 − FVU / dead frac. (held-out)**: on the store's held-out activations; dead = "
                 "never active there. **mean max |cos|**: mean over atoms of the largest |cosine| with another atom.")
    lines.append("")
    lines += explained_variance_note(rows, cols)
    lines += _plots(rows, out)
    lines += _folder_sections(eval_folders)
    if config_yaml:
        lines += ["## Config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary(rows, cols), indent=2, default=str))
    return atomic_write_text(out / REPORT_FILE, "\n".join(lines))


def summary(rows: list[Row], cols: list[str]) -> list[dict[str, Any]]:
    """Every row as JSON: identity, the budget dict and its columns, every column of the table."""
    out = []
    for r in rows:
        b = r.budget
        out.append({"name": r.name, "folder": str(r.folder), "kind": r.described.get("kind"),
                    "architecture": r.architecture, "saebench_architecture": r.saebench_architecture,
                    "width": r.width, "k": r.k, "budget": b or None,
                    "budget mode": b.get("mode"), "wall s": b.get("seconds"), "samples": b.get("samples"),
                    "steps/updates": None if steps_text(b) == "—" else steps_text(b), "device": b.get("device"),
                    **{c: r.value(c) for c in cols}})
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
        lines += ["FVU against wall time, every SAE on one plot: lines = training-batch FVU (measured before each "
                  "update/step), markers = held-out FVU at the end of training, at the budget's wall time.", "",
                  f"![FVU vs wall time]({time_plot.name})", ""]
    if l0_plots:
        lines += ["Headline metric vs L0 (SAEBench convention): one marker per architecture (★ = DB-KSVD), one "
                  "colour per width; rows of one architecture and width (a sweep) joined by a line in L0 order.", ""]
        lines += l0_plots
    if fit:
        lines += ["", "Dictionary fit curve (training-batch FVU vs iteration):", "", f"![fit curve]({fit.name})"]
    return lines + [""]


def _folder_sections(eval_folders: list[Path]) -> list[str]:
    """Per evaluate folder: model, sizes, skipped, failures, notes."""
    lines = []
    for folder in eval_folders:
        info = _json_or(folder / INFO_FILE, {})
        skipped = _json_or(folder / SKIPPED_FILE, [])
        failed = _json_or(folder / FAILED_FILE, [])
        lines += [f"## Evaluation `{folder.name}`", ""]
        if info:
            m = info.get("model", {})
            lines.append(f"- model `{m.get('name')}` ({fmt(m.get('n_params'), 3)} parameters), hook "
                         f"`{m.get('hook')}`, device {info.get('device')}; evals took "
                         f"{fmt(info.get('total_eval_s'), 4)} s "
                         f"({', '.join(f'{k} {v:.0f} s' for k, v in (info.get('timings_s') or {}).items())})")
            ld = info.get("labelled_data")
            if ld:
                lines.append(f"- labelled data `{ld['name']}`: paragraphs of {', '.join(ld['titles'])}; column1 = "
                             "which document, column2 = dialogue vs narration (SAEBench's bias_in_bios layout)")
        for note in info.get("notes", []):
            lines.append(f"- **{note['metric']}{' (low confidence)' if note.get('low_confidence') else ''}**: "
                         f"{note['note']}")
        if skipped:
            lines += ["", "Skipped:", ""]
            lines += [f"- {s['what']}{' / ' + s['sae'] if s.get('sae') else ''}: {s['reason']}" for s in skipped]
        if failed:
            lines += ["", "**Failed** (re-run the evaluate stage to retry):", ""]
            lines += [f"- {f['metric']}: `{f['error']}`" for f in failed]
        if info.get("sizes"):
            lines += ["", "<details><summary>Eval sizes used</summary>", "", "```json",
                      json.dumps(info["sizes"], indent=1, default=str), "```", "", "</details>"]
        lines.append("")
    return lines


__all__ = ["BUDGET_COLUMNS", "COLUMNS", "FIT_CURVE_FILE", "FIT_POSITIONS_EVAL", "FVU_TIME_PLOT_FILE", "HEADLINES",
           "MARKERS", "METRIC_PLOT_FILE", "PLOT_DPI", "REPORT_FILE", "STATS", "SUMMARY_FILE", "Row", "budget_cells",
           "columns_present", "explained_variance_note", "fmt", "how_to_read", "load_rows", "summary",
           "width_label", "write_report"]
