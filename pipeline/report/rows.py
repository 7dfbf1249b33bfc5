"""The report's rows: one :class:`Row` per evaluated SAE (its ``saes.json`` description and SAEBench result
JSONs), the table's columns, and how cells are formatted. Used by :mod:`pipeline.report.markdown` (the markdown) and
:mod:`pipeline.report.notes` (the generated notes)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.evals.results import RESULTS_SUBDIR, SAES_FILE
from pipeline.report.escape import md_code, md_text

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
    (
        EV_COLUMN,
        "core",
        "reconstruction_quality",
        "explained_variance",
        "SAEBench core's `explained_variance` (not a fraction of variance, see the note below)",
    ),
    (
        EV_LEGACY_COLUMN,
        "core",
        "reconstruction_quality",
        "explained_variance_legacy",
        "SAEBench core's `explained_variance_legacy` (its older formula, see the note below)",
    ),
    ("cossim", "core", "reconstruction_quality", "cossim", "cosine(x, x̂)"),
    ("loss recovered", "core", "model_performance_preservation", "ce_loss_score", "core CE loss recovered (headline)"),
    ("CE with SAE", "core", "model_performance_preservation", "ce_loss_with_sae", "next-token CE, SAE spliced in"),
    ("CE clean", "core", "model_performance_preservation", "ce_loss_without_sae", "next-token CE, clean"),
    ("KL score", "core", "model_behavior_preservation", "kl_div_score", "core KL-divergence score"),
    (
        "loss recovered (fit positions)",
        FIT_POSITIONS_EVAL,
        "model_performance_preservation",
        "ce_loss_score",
        "core CE loss recovered, SAE spliced in only at the positions the fit trains on",
    ),
    (
        "KL score (fit positions)",
        FIT_POSITIONS_EVAL,
        "model_behavior_preservation",
        "kl_div_score",
        "core KL-divergence score, SAE spliced in only at the positions the fit trains on",
    ),
    ("alive", "core", "misc_metrics", "frac_alive", "fraction of latents that fired on the core text"),
    (
        "absorption",
        "absorption",
        "mean",
        "mean_absorption_fraction_score",
        "mean absorption fraction (lower is better)",
    ),
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
HEADLINES = [
    ("core", "loss recovered"),
    (FIT_POSITIONS_EVAL, "loss recovered (fit positions)"),
    ("absorption", "absorption"),
    ("sparse_probing", "SAE probe top-1"),
    ("scr", "SCR@10"),
    ("tpp", "TPP@10"),
    ("autointerp", "autointerp"),
    ("ravel", "RAVEL"),
    ("unlearning", "unlearning"),
]
#: (column, key of the description) of the held-out statistics; ``None``: derived (``1 − fvu``).
STATS: list[tuple[str, str | None]] = [
    ("L0 (held-out)", "l0"),
    ("FVU (held-out)", "fvu"),
    (ONE_MINUS_FVU, None),
    ("dead frac.", "dead_fraction"),
    ("mean max |cos|", "mean_max_abs_cos"),
]
#: The training-budget columns, right after ``k``.
BUDGET_COLUMNS = ["budget", "wall s", "samples", "steps/updates", "device"]
#: What each budget mode means (``{factor}`` / ``{target}`` filled from the rows).
MODE_MEANINGS = {
    "equal_time": "every baseline trained for the dictionary's measured fit wall time{target}{factor} on the "
    "device listed",
    "equal_samples": "as many training samples as the dictionary's fit saw{target}{factor}",
    "steps": "a fixed number of optimiser steps{target}",
    "plateau": "each baseline trained until its held-out curve flattened (FVU better by less than the "
    "threshold per doubling of samples and L0 settled{target}), then its lr decayed over a further quarter of its "
    "run; or to the cap",
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


def is_number(v: Any) -> bool:
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
    if not is_number(v):
        return "—"
    if not math.isfinite(v):
        return fmt(float(v))
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def fmt_count(v: Any) -> str:
    """A count with thousands separators; ``—`` when missing."""
    if not is_number(v):
        return "—"
    return f"{int(v):,}" if math.isfinite(v) else fmt(float(v))


def steps_text(budget: dict[str, Any]) -> str:
    """``735 steps`` (an SAE's optimiser steps) / ``40 updates`` (the dictionary's updates); ``—`` if neither."""
    parts = [f"{fmt_count(budget[key])} {key}" for key in ("steps", "updates") if is_number(budget.get(key))]
    return ", ".join(parts) or "—"


def budget_cells(row: Row) -> list[str]:
    """The :data:`BUDGET_COLUMNS` cells of a row as inline markdown (``—`` for anything its budget does not
    record; the recorded mode and device escaped)."""
    b = row.budget
    mode = md_text(b["mode"]) if b.get("mode") else "—"
    if mode != "—" and is_number(b.get("factor")) and b["factor"] != 1:
        mode += f" ×{fmt(float(b['factor']), 3)}"
    return [
        mode,
        fmt_seconds(b.get("seconds")),
        fmt_count(b.get("samples")),
        steps_text(b),
        md_text(b["device"]) if b.get("device") else "—",
    ]


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
    hits = [
        p
        for p in sorted(ev_dir.glob(f"{name}_*eval_results.json"))
        if not any(p.name.startswith(n + "_") for n in longer)
    ]
    return hits[0] if hits else None


def _safe(name: str) -> str:
    return name.replace("/", "_")


def read_json_or(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def columns_present(rows: list[Row]) -> list[str]:
    """The held-out columns, then every SAEBench column some row has a value for."""
    cols = [c for c, *_ in COLUMNS if any(r.value(c) is not None for r in rows)]
    return [c for c, _ in STATS] + cols


def joined_names(rows: list[Row]) -> str:
    """The rows' names as code spans, comma-separated."""
    return ", ".join(md_code(r.name) for r in rows)


def joined_values(vs: list[Any], render: Any = md_text) -> str:
    """``render`` of each value (default: as escaped text), duplicates dropped, comma-separated."""
    return ", ".join(dict.fromkeys(render(v) for v in vs))
