"""The SAEs an evaluation runs: the fitted dictionary, the sae-lens baselines, SAEBench's published suites.

Each is one :class:`SAERecord`: its name, the SAEBench SAE object (or a sae-lens ``(release, sae_id)`` on the
hub) and its description (what ``saes.json`` records about it).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core.dictionary import DICTIONARY_META
from pipeline.evals.config import HubBaseline
from pipeline.evals.results import result_path
from pipeline.saes.export_forms import NONNEGATIVE, SIGNED, SPLIT
from pipeline.saes.heldout import heldout_stats
from pipeline.utils.atomic import atomic_write

#: Published result files copied from a ``results_dir`` hub baseline.
PUBLISHED_RESULTS_GLOB = "*_eval_results.json"


@dataclass
class SAERecord:
    """One SAE to evaluate."""

    name: str
    """Its name in ``saes.json`` and the result file names."""
    description: dict[str, Any]
    """What ``saes.json`` records (kind, architecture, width, k, held-out statistics, fit history, ...)."""
    sae: Any = None
    """The SAEBench SAE object (a ``BaseSAE``), or None for a hub SAE."""
    hub: tuple[str, str] | None = None
    """sae-lens ``(release, sae_id)`` of an SAE SAEBench loads from the hub, or None."""

    @property
    def selected(self) -> tuple[str, Any]:
        """The pair SAEBench's ``run_eval`` takes: ``(name, SAE object)`` or ``(release, sae_id)``."""
        return self.hub if self.hub is not None else (self.name, self.sae)

    def result_path(self, results_dir: Path, metric: str) -> Path:
        """Where SAEBench writes this SAE's result of ``metric``."""
        return result_path(results_dir, metric, *self.selected)


def dictionary_record(
    path: Path,
    *,
    model_name: str,
    hook: str,
    layer: int,
    device: str,
    cache_mb: int,
    context_size: int,
    signed_export: str = SPLIT,
) -> SAERecord:
    """The dictionary of ``path`` (``Dictionary.save``) as a :class:`DictionarySAE` record; a signed dictionary in
    the form ``signed_export`` (``eval.signed_export``: :mod:`pipeline.saes.export_forms`)."""
    from pipeline.core.dictionary import Dictionary
    from pipeline.saes.dictionary_sae import DictionarySAE

    if not (path / DICTIONARY_META).exists():
        raise FileNotFoundError(
            f"no dictionary at {path}; run the fit stage first (`python -m pipeline "
            "stage=fit`) or point the config at the right experiment"
        )
    from pipeline.core.spend import FitSpend

    d = Dictionary.load(path)
    sae = DictionarySAE(
        d, model_name, layer, hook, device=device, cache_bytes=cache_mb << 20, signed_export=signed_export
    )
    spend = FitSpend.of_dictionary(d).as_dict() if d.history else None
    sae.cfg.context_size = context_size
    groups = "matryoshka" if d.groups is not None else "plain"
    name = f"dbksvd_{groups}_K{d.n_atoms}_k{d.coder.k}" + ("_signed" if sae.signed_codes else "")
    return SAERecord(
        name,
        {
            "name": name,
            "kind": "dictionary",
            "architecture": sae.cfg.architecture,
            "n_atoms": d.n_atoms,
            "width": sae.cfg.d_sae,
            "k": d.coder.k,
            "signed": sae.signed,
            "export": sae.export_form,
            "coder": sae.coder_metadata(),
            "matryoshka": d.groups is not None,
            "width_note": WIDTH_NOTES[sae.export_form],
            "budget": spend,
            "curve": dictionary_curve(d.history),
            "heldout_curve": dictionary_curve(d.history, key="heldout_fvu"),
            "history": d.history,
        },
        sae=sae,
    )


#: ``saes.json``'s ``width_note`` of a dictionary, by its form (:mod:`pipeline.saes.export_forms`).
WIDTH_NOTES = {
    NONNEGATIVE: "non-negative dictionary compared at width K",
    SPLIT: "signed dictionary compared at width 2K (W_dec = [D; -D])",
    SIGNED: (
        "signed dictionary compared at width K with signed codes (W_dec = D, eval.signed_export=signed, as the "
        "DB-KSVD authors' SAEBench wrapper)"
    ),
}


def dictionary_curve(history: list[dict[str, Any]], key: str = "fvu") -> list[dict[str, float]]:
    """The fit's training-batch FVU (``key="fvu"``: each batch's, before its update), or its held-out FVU on the
    log grid of updates (``key="heldout_fvu"``), against the learner's wall clock, the samples coded so far and
    the updates: the same axes as a baseline's curves."""
    samples, out = 0, []
    for h in history:
        samples += int(h.get("rows", 0))
        if key in h and "seconds" in h:
            out.append(
                {
                    "seconds": float(h["seconds"]),
                    "samples": samples or None,
                    "updates": int(h.get("iteration", len(out) + 1)),
                    "fvu": float(h[key]),
                }
            )
    return out


def baseline_record(
    name: str,
    folder: Path,
    *,
    device: str,
    context_size: int | None = None,
    prepend_bos: bool | None = None,
    budget: dict[str, Any] | None = None,
) -> SAERecord:
    """The sae-lens baseline saved in ``folder`` (:func:`~pipeline.baselines.save_baseline`), loaded by
    plain ``sae_lens.SAE.load_from_disk`` and handed to SAEBench as any sae-lens SAE (decoder norms folded into
    the encoder where the architecture allows, as SAEBench does for SAEs it loads itself). ``context_size`` /
    ``prepend_bos`` fill the SAE's metadata where its folder leaves them unset (sae-lens's activation store,
    which SAEBench's core uses, requires them)."""
    from pipeline.baselines.io import load_baseline, load_record

    sae = load_baseline(folder, device=device)
    for key, value in (("context_size", context_size), ("prepend_bos", prepend_bos)):
        if getattr(sae.cfg.metadata, key, None) is None and value is not None:
            setattr(sae.cfg.metadata, key, value)
    try:
        sae.fold_W_dec_norm()
    except NotImplementedError:
        pass
    r = load_record(folder)
    label = f"{name}_K{r['width']}_k{r['k']}"
    return SAERecord(
        label,
        {
            "name": label,
            "kind": "baseline",
            "architecture": r["architecture"],
            "config_name": name,
            "inference_architecture": sae.cfg.architecture(),
            "width": r["width"],
            "k": r["k"],
            "signed": False,
            "budget": budget
            or {
                "mode": r["budget"].get("mode"),
                "seconds": r["seconds"],
                "samples": r["samples"],
                "steps": r["steps"],
                "device": r.get("device"),
            },
            "curve": r.get("curve") or [],
            "heldout_curve": r.get("heldout_curve") or [],
            "folder": str(folder),
            "sae_lens_version": r.get("sae_lens_version"),
        },
        sae=sae,
    )


def fit_records(
    which: list[str],
    dictionary_dir: Path,
    baselines_dir: Path | None,
    baseline_names: list[str],
    *,
    model_name: str,
    hook: str,
    layer: int,
    device: str,
    cache_mb: int,
    context_size: int,
    prepend_bos: bool = True,
    signed_export: str = SPLIT,
) -> tuple[list[SAERecord], list[dict]]:
    """The SAEs named in ``which`` (``dictionary``, ``baselines`` = every one of ``baseline_names``, or single
    names) and skip records for those not found in ``baselines_dir``; a signed dictionary in the form
    ``signed_export``."""
    records, skipped = [], []
    if "dictionary" in which:
        records.append(
            dictionary_record(
                dictionary_dir,
                model_name=model_name,
                hook=hook,
                layer=layer,
                device=device,
                cache_mb=cache_mb,
                context_size=context_size,
                signed_export=signed_export,
            )
        )
    names = [n for n in baseline_names if "baselines" in which or n in which]
    summary = _baseline_summary(baselines_dir)
    for name in names:
        folder = baselines_dir / name if baselines_dir is not None else None
        if folder is None or not folder.is_dir():
            skipped.append(
                {
                    "what": f"sae:{name}",
                    "reason": f"no trained baseline {name!r} at {folder} (the baselines stage has not trained it)",
                }
            )
            continue
        records.append(
            baseline_record(
                name,
                folder,
                device=device,
                context_size=context_size,
                prepend_bos=prepend_bos,
                budget=summary.get(name, {}).get("budget_summary"),
            )
        )
    return records, skipped


def _baseline_summary(folder: Path | None) -> dict[str, Any]:
    """The baselines stage's summary file (name -> record + budget summary), or {}."""
    import json

    from pipeline.baselines.io import SUMMARY_FILE

    path = folder / SUMMARY_FILE if folder is not None else None
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.exists() else {}


def hub_records(
    baselines: list[HubBaseline], hub_ok: bool, results_dir: Path, metric_names: Iterable[str]
) -> tuple[list[SAERecord], list[dict]]:
    """SAEBench's published suites (baseline b). A ``results_dir`` entry has its published result files copied
    into ``results_dir`` (SAEBench's layout, ``metric_names`` folders only; existing files kept); a
    ``release``/``sae_id`` entry becomes a record SAEBench loads through sae-lens from the hub, or a skip record
    when the hub is unreachable."""
    records, skipped = [], []
    for b in baselines:
        reason = None
        if b.results_dir is not None:
            reason = copy_published_results(Path(b.results_dir), results_dir, metric_names)
        elif not hub_ok:
            reason = (
                "SAEBench's published SAE suites load through sae-lens from the Hugging Face hub, which is "
                "unreachable; with hub access they are evaluated like the dictionary (or point "
                "results_dir at a local copy of their result files)"
            )
        else:
            name = f"{b.release}_{b.sae_id}"
            records.append(
                SAERecord(
                    name,
                    {
                        "name": name,
                        "kind": "hub_baseline",
                        "architecture": b.architecture,
                        "release": b.release,
                        "sae_id": b.sae_id,
                    },
                    hub=(b.release, b.sae_id),
                )
            )
        if reason:
            skipped.append({"what": f"hub_baseline:{b.release}/{b.sae_id}", "reason": reason})
    return records, skipped


def copy_published_results(src: Path, results_dir: Path, metric_names: Iterable[str]) -> str | None:
    """Copy ``src/<metric>/*_eval_results.json`` into ``results_dir/<metric>/`` (existing files kept); returns a
    skip reason when ``src`` is not a folder."""
    if not src.is_dir():
        return f"published results folder {src} does not exist"
    names = set(metric_names)
    for metric_dir in src.iterdir():
        if metric_dir.is_dir() and metric_dir.name in names:
            for f in metric_dir.glob(PUBLISHED_RESULTS_GLOB):
                dst = results_dir / metric_dir.name / f.name
                if not dst.exists():
                    atomic_write(dst, lambda p, f=f: shutil.copy2(f, p))
    return None


def describe_heldout(records: list[SAERecord], Y: torch.Tensor) -> None:
    """Add :func:`heldout_stats` on held-out activations ``Y: (n, d)`` to the description of every record that
    holds an SAE object."""
    for r in records:
        if r.sae is not None:
            r.description.update(heldout_stats(r.sae, Y))


def export_sae_lens(records: list[SAERecord], out_dir: Path) -> list[Path]:
    """Write every dictionary record in the sae-lens format, to ``out_dir/<name>/``
    (:func:`pipeline.saes.sae_lens_io.save_sae_lens`: loads in plain sae-lens as its matching_pursuit SAE,
    with ``stock_fidelity`` and a record of each difference from our encoder in the metadata; a signed
    dictionary as its ± split, whatever ``eval.signed_export``: stock sae-lens codes non-negatively)."""
    from pipeline.saes.dictionary_sae import DictionarySAE
    from pipeline.saes.sae_lens_io import save_sae_lens

    return [save_sae_lens(r.sae, out_dir / r.name) for r in records if isinstance(r.sae, DictionarySAE)]
