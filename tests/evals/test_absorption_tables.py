"""Absorption's per-SAE tables are never read back for an SAE whose result is to be computed
(``pipeline.evals.metrics.absorption.drop_stale_tables``): SAEBench reads a table found under the SAE's name
instead of recomputing it, so tables of earlier weights under the same name would score the old SAE."""

from __future__ import annotations

from pathlib import Path

from pipeline.evals.metrics.absorption import PER_SAE_TABLES, drop_stale_tables
from pipeline.evals.sae_records import SAERecord


def _tables(folder: Path, name: str) -> list[Path]:
    paths = []
    for sub in PER_SAE_TABLES:
        path = folder / sub / f"{name}_custom_sae"
        path.mkdir(parents=True)
        (path / "layer_3_raw_results.parquet").write_bytes(b"old weights")
        paths.append(path)
    return paths


def test_tables_of_saes_to_compute_are_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    folder, results = tmp_path / "artifacts" / "absorption", tmp_path / "eval_results"
    refit, done = SAERecord("refit", {}, sae=object()), SAERecord("done", {}, sae=object())
    stale, kept = _tables(folder, "refit"), _tables(folder, "done")
    result = done.result_path(results, "absorption")
    result.parent.mkdir(parents=True)
    result.write_text("{}")  # SAEBench skips this SAE: its tables stay

    assert sorted(drop_stale_tables(folder, [refit, done], results, "absorption", False)) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.is_dir() for p in kept)
    # force_rerun: SAEBench recomputes every SAE, so every table goes
    assert drop_stale_tables(folder, [refit, done], results, "absorption", True) == kept
    assert not any(p.exists() for p in kept)
    assert drop_stale_tables(tmp_path / "nothing", [refit], results, "absorption", False) == []
