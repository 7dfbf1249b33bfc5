"""The SAEs an evaluation runs: the fitted dictionary, the TopK baseline, SAEBench's published suites.

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
from pipeline.evals.heldout import heldout_stats
from pipeline.evals.results import result_path
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


def dictionary_record(path: Path, *, model_name: str, hook: str, layer: int, device: str, cache_mb: int,
                      context_size: int) -> SAERecord:
    """The dictionary of ``path`` (``Dictionary.save``) as a :class:`DictionarySAE` record."""
    from pipeline.core.dictionary import Dictionary
    from pipeline.evals.dictionary_sae import DictionarySAE

    if not (path / DICTIONARY_META).exists():
        raise FileNotFoundError(f"no dictionary at {path}; run the fit stage first (`python -m pipeline "
                                "stage=fit`) or point the config at the right experiment")
    d = Dictionary.load(path)
    sae = DictionarySAE(d, model_name, layer, hook, device=device, cache_bytes=cache_mb << 20)
    sae.cfg.context_size = context_size
    groups = "matryoshka" if d.groups is not None else "plain"
    name = f"dbksvd_{groups}_K{d.n_atoms}_k{d.coder.k}"
    return SAERecord(name, {
        "name": name, "kind": "dictionary", "architecture": sae.cfg.architecture, "n_atoms": d.n_atoms,
        "width": sae.cfg.d_sae, "k": d.coder.k, "signed": sae.signed, "coder": sae.coder_metadata(),
        "matryoshka": d.groups is not None,
        "width_note": ("signed dictionary compared at width 2K (W_dec = [D; -D])" if sae.signed
                       else "non-negative dictionary compared at width K"),
        "history": d.history}, sae=sae)


def topk_record(path: Path, *, model_name: str, hook: str, layer: int, device: str,
                context_size: int) -> SAERecord:
    """The TopK baseline of ``path`` (``TopKSAE.save``) as SAEBench's own ``TopKSAE``."""
    from sae_bench.custom_saes.topk_sae import TopKSAE as BenchTopKSAE

    from pipeline.evals.topk_sae import TopKSAE

    t = TopKSAE.load(path)
    b = BenchTopKSAE(t.W_dec.shape[1], t.n_latents, int(t.k), model_name, layer, torch.device(device),
                     torch.float32, hook_name=hook)
    with torch.no_grad():
        for p in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(b, p).copy_(getattr(t, p).detach().float())
    b.cfg.architecture = "topk"
    b.cfg.context_size = context_size
    name = f"topk_K{t.n_latents}_k{t.k}"
    return SAERecord(name, {"name": name, "kind": "topk", "architecture": "topk", "n_atoms": t.n_latents,
                            "width": t.n_latents, "k": int(t.k), "signed": False,
                            "history": t.history[-1:] if t.history else []}, sae=b)


def fit_records(which: list[str], dictionary_dir: Path, topk_dir: Path, *, model_name: str, hook: str,
                layer: int, device: str, cache_mb: int, context_size: int) -> tuple[list[SAERecord], list[dict]]:
    """The fit stage's SAEs named in ``which`` (dictionary, topk), and skip records for the missing ones."""
    records, skipped = [], []
    where = dict(model_name=model_name, hook=hook, layer=layer, device=device, context_size=context_size)
    if "dictionary" in which:
        records.append(dictionary_record(dictionary_dir, cache_mb=cache_mb, **where))
    if "topk" in which:
        if topk_dir.exists():
            records.append(topk_record(topk_dir, **where))
        else:
            skipped.append({"what": "sae:topk", "reason": f"no TopK baseline at {topk_dir} (baseline.topk=false or "
                                                          "the fit stage has not trained it)"})
    return records, skipped


def hub_records(baselines: list[HubBaseline], hub_ok: bool, results_dir: Path,
                metric_names: Iterable[str]) -> tuple[list[SAERecord], list[dict]]:
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
            reason = ("SAEBench's published SAE suites load through sae-lens from the Hugging Face hub, which is "
                      "unreachable; with hub access they are evaluated like the dictionary (or point "
                      "results_dir at a local copy of their result files)")
        else:
            name = f"{b.release}_{b.sae_id}"
            records.append(SAERecord(name, {"name": name, "kind": "hub_baseline", "architecture": b.architecture,
                                            "release": b.release, "sae_id": b.sae_id}, hub=(b.release, b.sae_id)))
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
    (:func:`pipeline.evals.sae_lens_io.save_sae_lens`: loads in plain sae-lens as an approximate topk)."""
    from pipeline.evals.dictionary_sae import DictionarySAE
    from pipeline.evals.sae_lens_io import save_sae_lens

    return [save_sae_lens(r.sae, out_dir / r.name) for r in records if isinstance(r.sae, DictionarySAE)]
