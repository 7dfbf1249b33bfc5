"""The two forms of a signed dictionary in SAEBench (``eval.signed_export``), side by side on a real run.

A ``dictionary=reference`` dictionary (signed codes) of the offline default (SmolLM2-135M layer 15 on Austen,
K = 2048, k = 32) is evaluated by the evaluate stage at the default ``eval=offline_small`` sizes, three times:

* ``split``: ``eval.signed_export=split`` (the default): 2K non-negative latents, ``W_dec = [D; -D]``;
* ``signed``: ``eval.signed_export=signed``: K latents with signed codes, ``W_dec = D`` (the DB-KSVD authors'
  SAEBench wrapper); absorption is skipped by the stage (its SAEBench code reads only positive codes), core reads
  the codes' magnitudes for its statistics (``pipeline.evals.metrics.core.MagnitudeCodes``);
* ``signed_unguarded``: the signed form with both guards lifted, i.e. SAEBench reading the signed codes as they
  come, as the authors' wrapper hands them over: what core's L1 / feature density and absorption report then
  (not valid measurements of the signed SAE: the effect of reading them naively); core and absorption only.

Every scalar of SAEBench's ``eval_result_metrics`` (core on all positions and on the fit's positions, sparse
probing, SCR, absorption), the held-out statistics of ``saes.json`` and the stage's skip records are written per
variant, with ``signed - split`` for every number both have. Metric values, not timings, are the point (the
machine may be shared).

Usage (the harvest and fit stages of the config must exist under ``--output-root``; ``python -m pipeline
experiment=default dictionary=reference stage=fit output_root=...`` makes them):

    python benchmarks/bench_signed_export.py --output-root OUTPUT_ROOT [--out benchmarks/results_signed_export.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: The metrics measured: those that run offline at the default sizes (TPP is left out of the default too).
METRICS = ["core", "sparse_probing", "scr", "absorption"]
#: Result folders read (core writes ``core/`` and ``core_fit_positions/``).
RESULT_DIRS = ["core", "core_fit_positions", "sparse_probing", "scr", "absorption"]
#: The variants: name -> (``eval.signed_export``, guards lifted, metrics). Unguarded, sparse probing and SCR would
#: repeat the guarded run (they read signed codes as they are either way).
VARIANTS = {
    "split": ("split", False, METRICS),
    "signed": ("signed", False, METRICS),
    "signed_unguarded": ("signed", True, ["core", "absorption"]),
}
#: Held-out statistics copied from ``saes.json``.
HELDOUT = ("width", "l0", "fvu", "dead_fraction", "mean_max_abs_cos", "heldout_rows")


def compose(output_root: str, signed_export: str, n_atoms: int, metrics: list[str], extra: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.runs.config import register_configs

    register_configs()
    overrides = [
        "experiment=default",
        "dictionary=reference",
        f"dictionary.n_atoms={n_atoms}",
        f"output_root={output_root}",
        "eval.saes=[dictionary]",
        f"eval.metrics=[{','.join(metrics)}]",
        f"eval.signed_export={signed_export}",
        *extra,
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return hydra_compose("config", overrides=overrides)


@contextlib.contextmanager
def unguarded() -> Iterator[None]:
    """SAEBench reads the signed codes as they come: core without :class:`MagnitudeCodes`, absorption not
    skipped."""
    import pipeline.evals.metrics.core as core_runner
    from pipeline.evals.metrics.registry import REGISTRY

    view, reason = core_runner.MagnitudeCodes, REGISTRY["absorption"].signed_codes
    core_runner.MagnitudeCodes = lambda sae: sae  # type: ignore[assignment,misc]
    REGISTRY["absorption"].signed_codes = None
    try:
        yield
    finally:
        core_runner.MagnitudeCodes = view  # type: ignore[misc]
        REGISTRY["absorption"].signed_codes = reason


def scalars(node: Any, prefix: str = "") -> dict[str, float]:
    """Every number of a nested result dict, keyed ``a.b.c``."""
    out: dict[str, float] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out |= scalars(v, f"{prefix}{k}.")
    elif isinstance(node, int | float) and not isinstance(node, bool):
        out[prefix[:-1]] = float(node)
    return out


def read_variant(folder: Path, unguarded_run: bool = False) -> dict[str, Any]:
    saes = json.loads((folder / "saes.json").read_text())
    notes = json.loads((folder / "eval_info.json").read_text()).get("notes", [])
    if unguarded_run:  # core's note on signed codes describes the guard this run lifted
        from pipeline.evals.metrics.core import SIGNED_NOTE

        notes = [n for n in notes if not (n.get("metric") == "core" and SIGNED_NOTE[-60:] in n.get("note", ""))]
    (desc,) = [s for s in saes if s.get("kind") == "dictionary"]
    out: dict[str, Any] = {
        "sae": desc["name"],
        "export": desc.get("export"),
        "heldout": {k: desc.get(k) for k in HELDOUT},
        "skipped": json.loads((folder / "skipped.json").read_text()),
        "failed": json.loads((folder / "failed.json").read_text()),
        "notes": notes,
        "metrics": {},
    }
    for metric in RESULT_DIRS:
        files = sorted((folder / "eval_results" / metric).glob(f"{desc['name']}_*_eval_results.json"))
        if files:
            result = json.loads(files[0].read_text())
            values = scalars(result.get("eval_result_metrics") or {})
            if metric.startswith("core"):
                values["d_sae"] = float(result["sae_cfg_dict"]["d_sae"])
            out["metrics"][metric] = {k: round(v, 6) for k, v in values.items()}
    return out


def differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``b - a`` for every metric value both have."""
    out: dict[str, dict[str, float]] = {}
    for metric, values in b["metrics"].items():
        base = a["metrics"].get(metric, {})
        diff = {k: round(v - base[k], 6) for k, v in values.items() if k in base}
        if diff:
            out[metric] = diff
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-root", required=True, help="output_root holding the default harvest and fit stages")
    ap.add_argument("--n-atoms", type=int, default=2048)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results_signed_export.json"))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument(
        "--collect-only", action="store_true", help="only read the variants' existing evaluate folders into --out"
    )
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (e.g. eval.core.positions=all)")
    args = ap.parse_args()

    from pipeline.data.config import parse_harvest_config
    from pipeline.data.models import load_model
    from pipeline.runs.layout import stage_dir
    from pipeline.utils.devices import resolve_device
    from stages import evaluate

    results: dict[str, Any] = {}
    model = None
    for name in args.variants:
        signed_export, lift, metrics = VARIANTS[name]
        cfg = compose(args.output_root, signed_export, args.n_atoms, metrics, args.overrides)
        if model is None and not args.collect_only:
            model_cfg, _, _ = parse_harvest_config(cfg)
            device = str(resolve_device(model_cfg.device))
            model = load_model(
                model_cfg.name, path=model_cfg.path, device=device, dtype=model_cfg.dtype, n_ctx=model_cfg.n_ctx
            )
        folder = Path(args.output_root) / "bench_signed_export" / f"{name}-{stage_dir(cfg, 'evaluate').name}"
        if args.collect_only:  # the newest folder of the variant (the config's hash may have moved since)
            folder = max(folder.parent.glob(f"{name}-evaluate-*"), key=lambda f: f.stat().st_mtime)
        else:
            print(f"{name}: evaluating into {folder}", flush=True)
            with unguarded() if lift else contextlib.nullcontext():
                evaluate.run(cfg, run_dir=folder, model=model)
        results[name] = read_variant(folder, unguarded_run=lift)
        results[name]["stages"] = {s: stage_dir(cfg, s).name for s in ("harvest", "fit")} | {"evaluate": folder.name}
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads (shared: metric values, not timings)",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "setup": (
            f"experiment=default dictionary=reference dictionary.n_atoms={args.n_atoms} (k = 32, signed codes); "
            f"eval=offline_small sizes, eval.saes=[dictionary], eval.metrics={METRICS} (signed_unguarded: core, "
            "absorption)" + (f"; overrides {args.overrides}" if args.overrides else "")
        ),
        "variants": {
            "split": "eval.signed_export=split: 2K non-negative latents, W_dec = [D; -D]",
            "signed": "eval.signed_export=signed: K latents with signed codes, W_dec = D (the stage's guards on)",
            "signed_unguarded": (
                "the signed form with SAEBench reading the codes as they come (core without MagnitudeCodes, "
                "absorption not skipped), as the authors' wrapper hands them over: not valid measurements"
            ),
        },
        "results": results,
    }
    if "split" in results:
        out["signed_minus_split"] = {n: differences(results["split"], r) for n, r in results.items() if n != "split"}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
