"""The comparison report: a table of every metric for the dictionary and its baselines, the fit curve and
SAEBench-style plots (headline metric vs L0, one marker per architecture, one colour per width), from the
evaluate stage folders of one experiment (several folders = a sweep, gathered into one table and plot).

Values are read from SAEBench's own result JSONs and the evaluate stage's ``saes.json``; nothing is
recomputed. Non-finite values are shown as ``+inf`` / ``-inf`` / ``nan``, never dropped; SAEBench's core writes
NaN as -1 (its ``replace_nans_with_negative_one``), which the table notes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.evals.results import FAILED_FILE, INFO_FILE, RESULTS_SUBDIR, SAES_FILE, SKIPPED_FILE
from pipeline.utils.atomic import atomic_write, atomic_write_text

REPORT_FILE = "report.md"
"""The report, in the report folder."""
SUMMARY_FILE = "summary.json"
"""Every row of the table as JSON."""
FIT_CURVE_FILE = "fit_curve.png"
"""The fit curve plot."""
METRIC_PLOT_FILE = "{eval}_vs_l0.png"
"""Headline metric of an eval vs L0."""
PLOT_DPI = 120

#: (column, eval, category, key, description) of every table column read from SAEBench results.
COLUMNS: list[tuple[str, str, str, str, str]] = [
    ("L0 (core)", "core", "sparsity", "l0", "mean active latents on the core eval text"),
    ("expl. var.", "core", "reconstruction_quality", "explained_variance", "core explained variance"),
    ("cossim", "core", "reconstruction_quality", "cossim", "cosine(x, x̂)"),
    ("loss recovered", "core", "model_performance_preservation", "ce_loss_score",
     "core CE loss recovered (headline)"),
    ("CE with SAE", "core", "model_performance_preservation", "ce_loss_with_sae", "next-token CE, SAE spliced in"),
    ("CE clean", "core", "model_performance_preservation", "ce_loss_without_sae", "next-token CE, clean"),
    ("KL score", "core", "model_behavior_preservation", "kl_div_score", "core KL-divergence score"),
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
HEADLINES = [("core", "loss recovered"), ("absorption", "absorption"), ("sparse_probing", "SAE probe top-1"),
             ("scr", "SCR@10"), ("tpp", "TPP@10"), ("autointerp", "autointerp"), ("ravel", "RAVEL"),
             ("unlearning", "unlearning")]
STATS = [("L0 (held-out)", "l0"), ("FVU (held-out)", "fvu"), ("dead frac.", "dead_fraction"),
         ("mean max |cos|", "mean_max_abs_cos")]


@dataclass
class Row:
    """One evaluated SAE of one evaluate folder."""

    name: str
    folder: Path
    described: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval -> SAEBench JSON

    @property
    def architecture(self) -> str:
        for r in self.results.values():
            a = (r.get("sae_cfg_dict") or {}).get("architecture")
            if a:
                return str(a)
        return str(self.described.get("architecture", "?"))

    @property
    def width(self) -> int | None:
        w = self.described.get("width")
        if w is None:
            for r in self.results.values():
                w = (r.get("sae_cfg_dict") or {}).get("d_sae")
                if w:
                    break
        return int(w) if w else None

    def metric(self, eval_name: str, category: str, key: str) -> float | None:
        r = self.results.get(eval_name)
        if r is None:
            return None
        v = (r.get("eval_result_metrics") or {}).get(category, {}).get(key)
        return None if v is None else float(v)

    def value(self, column: str) -> float | None:
        for col, ev, cat, key, _ in COLUMNS:
            if col == column:
                return self.metric(ev, cat, key)
        for col, key in STATS:
            if col == column:
                v = self.described.get(key)
                return None if v is None else float(v)
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


def load_rows(eval_folders: list[Path]) -> list[Row]:
    """Every SAE of every evaluate folder, with its SAEBench results."""
    rows = []
    for folder in eval_folders:
        saes_path = folder / SAES_FILE
        if not saes_path.exists():
            continue
        for desc in json.loads(saes_path.read_text()):
            row = Row(desc["name"], folder, desc)
            for ev_dir in (folder / RESULTS_SUBDIR).glob("*"):
                if not ev_dir.is_dir():
                    continue
                hits = sorted(ev_dir.glob(f"{_safe(desc['name'])}_*eval_results.json"))
                if hits:
                    row.results[ev_dir.name] = json.loads(hits[0].read_text())
            rows.append(row)
    return rows


def _safe(name: str) -> str:
    return name.replace("/", "_")


def _json_or(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def columns_present(rows: list[Row]) -> list[str]:
    cols = [c for c, *_ in COLUMNS if any(r.value(c) is not None for r in rows)]
    return [c for c, _ in STATS] + cols


# ============================================================================================= plots
def plot_fit_curves(rows: list[Row], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(r.name, r.described.get("history") or []) for r in rows if r.described.get("kind") == "dictionary"]
    curves = [(n, h) for n, h in curves if any("fvu" in x for x in h)]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, hist in curves:
        pts = [(x.get("iteration", i), x["fvu"]) for i, x in enumerate(hist) if "fvu" in x]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("FVU (training batch)")
    ax.set_yscale("log")
    ax.set_title("DB-KSVD fit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out / FIT_CURVE_FILE)


MARKERS = {"dbksvd": "*", "topk": "o", "batch_topk": "s", "matryoshka_batch_topk": "D", "standard": "^",
           "jumprelu": "v", "gated": "P"}


def plot_metric_vs_l0(rows: list[Row], column: str, out: Path, stem: str) -> Path | None:
    """SAEBench-style: headline metric vs L0, one marker per architecture, one colour per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r, r.l0, r.value(column)) for r in rows]
    pts = [(r, x, y) for r, x, y in pts if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if not pts:
        return None
    widths = sorted({width_label(r.width) for r, _, _ in pts}, key=lambda s: (len(s), s))
    colours = {w: plt.cm.tab10(i % 10) for i, w in enumerate(widths)}
    fig, ax = plt.subplots(figsize=(6, 4))
    seen = set()
    for r, x, y in pts:
        arch, w = r.architecture, width_label(r.width)
        label = f"{arch}, {w}"
        ax.scatter([x], [y], marker=MARKERS.get(arch, "X"), s=120 if arch == "dbksvd" else 60, color=colours[w],
                   edgecolor="black", linewidth=0.5, label=None if label in seen else label, zorder=3)
        seen.add(label)
    ax.set_xlabel("L0")
    ax.set_ylabel(column)
    ax.set_title(f"{column} vs L0")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="architecture, width", title_fontsize=7)
    fig.tight_layout()
    return _save(fig, out / METRIC_PLOT_FILE.format(eval=stem))


def _save(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda p: fig.savefig(p, dpi=PLOT_DPI, format="png"))
    plt.close(fig)
    return path


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
              "the evaluate stage's `saes.json` (held-out activations of the harvest store). "
              "`—` = not evaluated (see *Skipped*); `+inf`/`-inf`/`nan` are shown as the result files hold them; "
              "SAEBench's core writes NaN as -1.", ""]
    # the table
    lines.append("## Metrics")
    lines.append("")
    lines.append("| SAE | architecture | width | k | " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * (4 + len(cols)))
    for r in rows:
        cells = [f"`{r.name}`", r.architecture, width_label(r.width), str(r.described.get("k", "—"))]
        cells += [fmt(r.value(c)) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- **{c}**: {d}" for c, ev, cat, key, d in COLUMNS if c in cols]
    lines.append("- **L0 / FVU / dead frac. (held-out)**: on the store's held-out activations; dead = never "
                 "active there. **mean max |cos|**: mean over atoms of the largest |cosine| with another atom.")
    for r in rows:
        if r.described.get("width_note"):
            lines.append(f"- `{r.name}`: {r.described['width_note']}.")
    lines.append("")
    # plots
    plot_lines = []
    fit = plot_fit_curves(rows, out)
    for ev, col in HEADLINES:
        p = plot_metric_vs_l0(rows, col, out, ev)
        if p:
            plot_lines.append(f"![{col} vs L0]({p.name})")
    if plot_lines or fit:
        lines += ["## Plots", "", "Headline metric vs L0 (SAEBench convention): one marker per architecture "
                  "(★ = DB-KSVD), one colour per width.", ""]
        lines += plot_lines
        if fit:
            lines += ["", "Fit curve (FVU vs iteration):", "", f"![fit curve]({fit.name})"]
        lines.append("")
    # per folder: sizes, skipped, failures, notes
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
    if config_yaml:
        lines += ["## Config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    summary = [{"name": r.name, "folder": str(r.folder), "architecture": r.architecture, "width": r.width,
                **{c: r.value(c) for c in cols}} for r in rows]
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
    return atomic_write_text(out / REPORT_FILE, "\n".join(lines))
