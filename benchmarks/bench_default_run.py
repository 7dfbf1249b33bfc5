"""Benchmark: the default run end to end (``python -m pipeline``), its stage times and its headline figures.

Runs ``python -m pipeline`` into a fresh output folder (or, with ``--log``, records a run already made from its
console log and output folder) and adds it under ``--name`` to ``results_default_run.json``: the wall seconds of
each stage (the orchestrator's ``<stage> finished in <s> s`` lines) and of the whole command, the dictionary's fit
(seconds, updates, held-out FVU and L0) and each SAE baseline's training (budget, steps, samples, seconds, why it
stopped, whether its held-out curve had flattened, held-out FVU and L0). Stage times depend on the machine and on
what else runs: run it alone. Samples, steps, FVU and L0 do not.

Usage: python benchmarks/bench_default_run.py --name NAME [--output-root DIR] [--override KEY=VALUE ...]
       python benchmarks/bench_default_run.py --name NAME --log LOG --run outputs/default [--wall-seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_folders import latest_finished  # noqa: E402

from pipeline.utils.atomic import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: The orchestrator's log line for a finished stage (stages/orchestrator.py).
STAGE_LINE = re.compile(r"\] - (\w+)\s+finished in ([0-9.]+) s")
#: What each baseline's record keeps here (pipeline/baselines: ``BaselineRecord``).
BASELINE_KEYS = (
    "architecture",
    "budget",
    "steps",
    "samples",
    "seconds",
    "stop_reason",
    "flattened",
    "improvement_per_doubling",
    "heldout_fvu",
    "heldout_l0",
    "heldout_dead_fraction",
)


def stage_seconds(log: str) -> dict[str, float]:
    """``{stage: seconds}`` from the orchestrator's console log."""
    return {m.group(1): float(m.group(2)) for m in STAGE_LINE.finditer(log)}


def record(log: str, run: Path, wall: float | None, overrides: list[str]) -> dict:
    """The results of one finished default run (``run``: its experiment folder, e.g. ``outputs/default``)."""
    fit = json.loads((latest_finished(run, "fit-*") / "metrics.json").read_text())
    dictionary = fit["dictionary"]
    baselines = json.loads((latest_finished(run, "baselines-*") / "baselines.json").read_text())
    stages = stage_seconds(log)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.stdout.strip(),
        "command": " ".join(["python -m pipeline", *overrides]),
        "stage_seconds": stages,
        "stages_total_seconds": sum(stages.values()),
        "wall_seconds": wall,
        "dictionary": {
            "fit_seconds": dictionary.get("fit_seconds"),
            "updates": dictionary.get("spend", {}).get("updates"),
            "samples": dictionary.get("spend", {}).get("samples"),
            "heldout_fvu": dictionary.get("heldout_fvu"),
            "heldout_l0": dictionary.get("heldout_l0"),
        },
        "baselines": {name: {key: rec.get(key) for key in BASELINE_KEYS} for name, rec in baselines.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True, help="the run's key in the results file")
    ap.add_argument("--output-root", default="/tmp/bench_default_run", help="a fresh output_root for the run")
    ap.add_argument("--override", action="append", default=[], help="a Hydra override for the run (repeatable)")
    ap.add_argument("--log", help="record a run already made: its console log ...")
    ap.add_argument("--run", help="... and its experiment folder (output_root/default)")
    ap.add_argument("--wall-seconds", type=float, help="with --log: the whole command's wall time, if measured")
    ap.add_argument("--out", default="benchmarks/results_default_run.json")
    args = ap.parse_args()
    if args.log:
        if not args.run:
            raise SystemExit("--log needs --run: the experiment folder that run wrote (e.g. outputs/default)")
        res = record(Path(args.log).read_text(errors="replace"), Path(args.run), args.wall_seconds, args.override)
    else:
        root = Path(args.output_root)
        if root.exists() and any(root.iterdir()):
            raise SystemExit(f"{root} is not empty: the benchmark times a run from nothing; remove it or pick another")
        t = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", f"output_root={root}", *args.override],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t
        log = done.stdout + done.stderr
        (root / "console.log").write_text(log)
        if done.returncode:
            raise SystemExit(f"the default run failed (exit {done.returncode}); its log: {root / 'console.log'}")
        res = record(log, root / "default", wall, args.override)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    results["runs"][args.name] = res
    atomic_write_text(out, json.dumps(results, indent=1))
    print(json.dumps({k: res[k] for k in ("stage_seconds", "wall_seconds")}, indent=1))


if __name__ == "__main__":
    main()
