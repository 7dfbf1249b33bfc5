"""The report's plots (PNG, matplotlib with the Agg backend, every file written atomically).

* :func:`plot_fit_curves`: the dictionary's fit history, FVU vs iteration (``fit_curve.png``);
* :func:`plot_fvu_vs_time`: every SAE's training-batch FVU vs wall time on one plot, the held-out FVU at the
  end of training as a marker (``fvu_vs_time.png``);
* :func:`plot_metric_vs_l0`: SAEBench-style headline metric vs L0, one marker per architecture, one colour per
  width, points of one (architecture, width) joined by a line sorted by L0 when a sweep gives several
  (``<eval>_vs_l0.png``).

The plots read :class:`~pipeline.report.rows.Row` objects; nothing is recomputed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.utils.atomic import atomic_write

if TYPE_CHECKING:
    from pipeline.report.rows import Row

FIT_CURVE_FILE = "fit_curve.png"
"""The dictionary's fit curve (FVU vs iteration)."""
FVU_TIME_PLOT_FILE = "fvu_vs_time.png"
"""Training-batch FVU vs wall time of every SAE, held-out FVU as end markers."""
METRIC_PLOT_FILE = "{eval}_vs_l0.png"
"""Headline metric of an eval vs L0."""
PLOT_DPI = 120

#: Marker per architecture: the training architectures (sae-lens registry names, ``dbksvd`` for the
#: dictionary) and SAEBench's ``sae_cfg_dict.architecture`` names (what older folders carry). Anything else
#: (a hub baseline's own label) gets ``X``.
MARKERS = {
    "dbksvd": "*",
    "topk": "o",
    "batchtopk": "s",
    "matryoshka_batchtopk": "D",
    "jumprelu": "v",
    "standard": "^",
    "matching_pursuit": "p",
    "gated": "P",
    "batch_topk": "s",
    "matryoshka_batch_topk": "D",
    "relu": "^",
}
OTHER_MARKER = "X"


def marker(architecture: str) -> str:
    """The plot marker of an architecture (:data:`MARKERS`, ``X`` for one not listed)."""
    return MARKERS.get(architecture, OTHER_MARKER)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(*vs: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vs)


def plot_fit_curves(rows: list[Row], out: Path) -> Path | None:
    """The dictionary rows' fit history (``history``: FVU per iteration), log FVU; None when no row has one."""
    plt = _pyplot()
    curves = [(r.name, r.described.get("history") or []) for r in rows if r.is_dictionary]
    curves = [(n, h) for n, h in curves if any(isinstance(x, dict) and "fvu" in x for x in h)]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, hist in curves:
        pts = [(x.get("iteration", i), x["fvu"]) for i, x in enumerate(hist) if isinstance(x, dict) and "fvu" in x]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("FVU (training batch)")
    ax.set_yscale("log")
    ax.set_title("DB-KSVD fit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out / FIT_CURVE_FILE)


def curve_points(row: Row) -> tuple[list[tuple[float, float]], bool]:
    """``(seconds, fvu)`` of a row's held-out curve (``heldout_curve`` of its description), else of its
    training-batch curve (``curve``: older folders), finite positive values only (both axes are log-scale),
    in ascending seconds; and whether they are held-out."""
    for key, heldout in (("heldout_curve", True), ("curve", False)):
        pts = []
        for p in row.described.get(key) or []:
            if isinstance(p, dict) and _finite(p.get("seconds"), p.get("fvu")) and p["fvu"] > 0 and p["seconds"] > 0:
                pts.append((float(p["seconds"]), float(p["fvu"])))
        if pts:
            return sorted(pts), heldout
    return [], False


def plot_fvu_vs_time(rows: list[Row], out: Path) -> Path | None:
    """Every method's held-out FVU against training wall time on one log-log plot, one colour per SAE, measured
    on each one's log grid of updates / steps (a row without a held-out curve shows its training-batch curve,
    dashed); its final held-out FVU as a marker; the dictionaries' fit times and FVUs as dotted guides. None (no
    file) when no row has a curve."""
    curves = [(r, *curve_points(r)) for r in rows]
    if not any(pts for _, pts, _ in curves):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.cm.tab10 if len(curves) <= 10 else plt.cm.tab20
    for i, (r, pts, heldout) in enumerate(curves):
        colour = cmap(i % cmap.N)
        final = r.described.get("fvu")
        end_s = r.budget.get("seconds")
        if not _finite(end_s) and pts:
            end_s = pts[-1][0]
        has_marker = _finite(end_s, final) and final > 0 and end_s > 0
        if not pts and not has_marker:
            continue
        label = f"{r.name} ({r.architecture})" + ("" if heldout or not pts else ", training batches")
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                color=colour,
                linewidth=1.2,
                linestyle="-" if heldout else "--",
                marker="." if len(pts) < 60 else None,
                markersize=4,
                label=label,
            )
        if has_marker:
            ax.scatter(
                [end_s],
                [final],
                marker=marker(r.architecture),
                s=110 if r.is_dictionary else 60,
                color=colour,
                edgecolor="black",
                linewidth=0.6,
                zorder=3,
                label=None if pts else label,
            )
        if r.is_dictionary and has_marker:
            ax.axvline(end_s, color=colour, linestyle=":", linewidth=0.8)
            ax.axhline(final, color=colour, linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training wall time (s, log scale)")
    ax.set_ylabel("held-out FVU (log scale)")
    ax.set_title(
        "Held-out FVU while training (log grid of updates / steps); markers: the end of training;\n"
        "dotted: the dictionary's fit time and held-out FVU",
        fontsize=9,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out / FVU_TIME_PLOT_FILE)


def plot_metric_vs_l0(rows: list[Row], column: str, out: Path, stem: str) -> Path | None:
    """SAEBench-style: headline metric vs L0, one marker per architecture, one colour per width; the points of
    rows sharing (architecture, width) joined by a line in L0 order when there are several (a sweep)."""
    pts = [(r, r.l0, r.value(column)) for r in rows]
    pts = [(r, x, y) for r, x, y in pts if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if not pts:
        return None
    plt = _pyplot()
    widths = sorted({r.width_text for r, _, _ in pts}, key=lambda s: (len(s), s))
    colours = {w: plt.cm.tab10(i % 10) for i, w in enumerate(widths)}
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r, x, y in pts:
        groups.setdefault((r.architecture, r.width_text), []).append((x, y))
    for (arch, w), xy in sorted(groups.items()):
        xy.sort()
        if len(xy) > 1:
            ax.plot(
                [p[0] for p in xy],
                [p[1] for p in xy],
                color=colours[w],
                linewidth=1,
                alpha=0.8,
                zorder=2,
                linestyle="--" if arch == "dbksvd" else "-",
            )
        ax.scatter(
            [p[0] for p in xy],
            [p[1] for p in xy],
            marker=marker(arch),
            s=120 if arch == "dbksvd" else 60,
            color=colours[w],
            edgecolor="black",
            linewidth=0.5,
            label=f"{arch}, {w}",
            zorder=3,
        )
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


__all__ = [
    "FIT_CURVE_FILE",
    "FVU_TIME_PLOT_FILE",
    "MARKERS",
    "METRIC_PLOT_FILE",
    "PLOT_DPI",
    "curve_points",
    "marker",
    "plot_fit_curves",
    "plot_fvu_vs_time",
    "plot_metric_vs_l0",
]
