"""Benchmark: what the evaluate stage costs on the default store: 1 to 8 SAEs in one evaluation, the first time
and again (the eval cache), a second point of the default, and a 4-point sweep evaluated together.

It runs on the default experiment's 4-point sweep of ``dictionary.coder.k`` (8, 16, 24, 32; 32 is the default),
each point up to its baselines (TopK and BatchTopK at the point's k), on one store (SmolLM2-135M layer 15 on
Austen); the evaluation is the default's (``eval=offline_small``: core on both position sets, absorption, sparse
probing, SCR). Prepare it once (about 15 minutes; the default run's folders are reused where they exist)::

    python -m pipeline -m dictionary.coder.k=8,16,24,32 until=baselines output_root=outputs/bench_sweep

Each scenario runs in a fresh process, one after another, and evaluates its SAEs in one pass with the code the
evaluate stage and ``stage=evaluate_sweep`` share (:func:`pipeline.runs.sweep_eval.evaluate_together`). The SAEs,
by point (``d`` the point's dictionary, ``b`` its two baselines):

* ``N`` SAEs in one evaluation: 1 = d32; 2 = d32, d16; 4 = d32, d16, d8, d24; 8 = those and b32, b16;
  ``uncached_N`` with ``eval.cache.enabled=false`` (the old path: every run computes the SAE-independent work,
  which core still shares within the run), ``warm_N`` on a warm cache (a later run on the hook);
* ``cold_1``: d32 on an empty cache (a first run: it computes and publishes the cache's entries), then
  ``warm_1_first`` the same again (both result sets must equal ``uncached_1``'s: ``equal_results``);
* ``point_cold``: the default's point (d32 and b32) on an empty cache of its own: the default run's evaluate;
  ``point_k16_warm`` then the k = 16 point (d16 and b16) on that cache: ``python -m pipeline
  dictionary.coder.k=16`` after the default run;
* ``sweep_4``: ``stage=evaluate_sweep`` over the 4 points (12 SAEs) on an empty cache of its own, each point's
  evaluate folder and the joint run's work folder removed first (the points' folders are then copied into the
  scenario's, as a later sweep rewrites them); its k = 16 point's results must equal
  ``point_k16_warm``'s (a cold evaluation against a warm one: ``equal_results``); ``sweep_4_warm`` the same on
  ``point_cold``'s cache (a sweep evaluated after an earlier run on the hook), whose results must equal the cold
  sweep's, point by point;
* ``sweep_iters_4``: ``stage=evaluate_sweep`` on an empty cache over a dictionary-only sweep (``--iters-run``:
  ``dictionary.max_iters`` = 12, 18, 24, 30, 24 being the default's point), whose points train the same baselines
  again, byte for byte: 4 dictionaries and 2 distinct baselines (``distinct_saes``); its max_iters = 24 point's
  results must equal ``point_cold``'s. Prepare it (about 12 minutes; copy the default's harvest, fit and baselines
  folders into ``outputs/bench_iters/default/`` first to reuse them)::

      python -m pipeline -m dictionary.max_iters=12,18,24,30 until=baselines output_root=outputs/bench_iters

Each scenario marked cold (``cold_1``, ``point_cold``, ``sweep_4``, ``sweep_iters_4``) empties its cache root
first; ``--add`` runs some scenarios again into the stored record, keeping the others (each run records its
commit).

Reported per scenario: the wall seconds (model load included), SAEBench's seconds per metric
(``eval_info.json``), the cache's hits and misses. Derived, with the issue's targets:

* one more SAE: the least-squares slope of the ``warm_N`` seconds over N, as a fraction of ``cold_1`` (<= 15%);
  the same for ``uncached_N`` over ``uncached_1``;
* a second run on the same hook with a new dictionary: ``warm_1 / cold_1`` (<= 35%);
* the default's second point: ``point_k16_warm / point_cold`` (<= 1/3);
* a 4-point sweep evaluated together: ``sweep_4 / point_cold`` (<= 1.6); after an earlier run on the hook
  (``sweep_4_warm / point_cold``: no target); a dictionary-only sweep (``sweep_iters_4 / point_cold``);
* the sweep's arithmetic: the default's point less its SAEs at one more SAE's cost (``point_fixed_seconds``, F:
  the SAE-independent part the sweep pays once), the sweep's ratio that F and that cost predict
  (``sweep_4_predicted``), and the most one more SAE may cost for the sweep to meet its target
  (``sweep_4_target_per_sae_seconds``).

Run it alone: seconds depend on the machine and on what else runs.

Usage: python benchmarks/bench_evaluate.py [--run outputs/bench_sweep/default] [--work outputs/bench_evaluate]
       [--iters-run outputs/bench_iters/default] [--scenarios uncached_1,cold_1,...] [--name NAME] [--add]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.utils.atomic import atomic_write_text  # noqa: E402

OUT = ROOT / "benchmarks" / "results_evaluate.json"
#: The sweep's points, by ``dictionary.coder.k``: the default's, the second point's, and two more.
DEFAULT_K, SECOND_K, OTHER_KS = 32, 16, (8, 24)
D, DB = ["dictionary"], ["dictionary", "baselines"]
#: The dictionary-only sweep (``--iters-run``): ``dictionary.max_iters`` (24 is the default's), whose points train
#: the same baselines again (the baselines do not depend on it), so the joint run scores them once.
DEFAULT_ITERS, OTHER_ITERS = 24, (12, 18, 30)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One prepared sweep of the default experiment."""

    key: str
    """The config key its points vary."""
    values: tuple[int, ...]
    """Its points' values of ``key``, the default's first."""
    prefix: str
    """Prefix of a scenario's folder per point (``k32``, ``i24``)."""
    run_arg: str
    """The command-line argument naming its experiment folder."""


SWEEPS = {
    "k": Sweep("dictionary.coder.k", (DEFAULT_K, SECOND_K, *OTHER_KS), "k", "run"),
    "iters": Sweep("dictionary.max_iters", (DEFAULT_ITERS, *OTHER_ITERS), "i", "iters_run"),
}
#: The SAEs of N in one evaluation (module docstring), as (point's k, its ``eval.saes``).
N_SAES: dict[int, list[tuple[int, list[str]]]] = {
    1: [(DEFAULT_K, D)],
    2: [(DEFAULT_K, D), (SECOND_K, D)],
    4: [(DEFAULT_K, D), (SECOND_K, D), *((k, D) for k in OTHER_KS)],
    8: [(DEFAULT_K, DB), (SECOND_K, DB), *((k, D) for k in OTHER_KS)],
}


@dataclasses.dataclass(frozen=True)
class Scenario:
    points: list[tuple[int, list[str]]] | None
    """(point's k, its ``eval.saes``) of each point evaluated together; None: every point (``evaluate_sweep``)."""
    cache: str | None
    """Which cache root (``<work>/cache_<name>``); None: the cache off."""
    cold: bool = False
    """Whether the cache root is emptied right before the scenario runs (a first run on the hook)."""
    sweep: str = "k"
    """Which prepared sweep it runs on (:data:`SWEEPS`): ``k`` (``--run``) or ``iters`` (``--iters-run``)."""

    def keys(self) -> list[int]:
        """The values of its sweep's key of the points it evaluates, its first point's first."""
        return [k for k, _ in self.points] if self.points is not None else list(SWEEPS[self.sweep].values)


SCENARIOS: dict[str, Scenario] = {
    "uncached_1": Scenario(N_SAES[1], None),
    "cold_1": Scenario(N_SAES[1], "main", cold=True),
    "warm_1_first": Scenario(N_SAES[1], "main"),
    "warm_1": Scenario([(SECOND_K, D)], "main"),
    "warm_2": Scenario(N_SAES[2], "main"),
    "warm_4": Scenario(N_SAES[4], "main"),
    "warm_8": Scenario(N_SAES[8], "main"),
    "point_cold": Scenario([(DEFAULT_K, DB)], "point", cold=True),
    "point_k16_warm": Scenario([(SECOND_K, DB)], "point"),
    "sweep_4": Scenario(None, "sweep", cold=True),
    "sweep_4_warm": Scenario(None, "point"),
    "uncached_8": Scenario(N_SAES[8], None),
    "uncached_2": Scenario(N_SAES[2], None),
    "uncached_4": Scenario(N_SAES[4], None),
    "sweep_iters_4": Scenario(None, "iters", cold=True, sweep="iters"),
}
#: Scenarios whose result files must be equal (the same SAEs): (scenario, its point's k, or max_iters on the
#: dictionary-only sweep) each.
EQUAL = {
    "one_sae": [("uncached_1", DEFAULT_K), ("cold_1", DEFAULT_K), ("warm_1_first", DEFAULT_K)],
    "second_point_warm_vs_cold": [("sweep_4", SECOND_K), ("point_k16_warm", SECOND_K)],
    **{f"sweep_k{k}_cold_vs_warm": [("sweep_4", k), ("sweep_4_warm", k)] for k in SWEEPS["k"].values},
    "iters_sweep_default_point_vs_point_cold": [("point_cold", DEFAULT_K), ("sweep_iters_4", DEFAULT_ITERS)],
}
#: Fields of a SAEBench result file that name the run, not the result.
VOLATILE = ("eval_id", "datetime_epoch_millis", "sae_bench_commit_hash")
"""(``sae_bench_commit_hash`` is the git commit of the folder SAEBench runs in: this repository's HEAD.)"""
#: The issue's targets.
TARGETS = {"one_more_sae": 0.15, "second_run": 0.35, "second_point": 1 / 3, "sweep_4": 1.6}


def compose(run: Path, overrides: Sequence[str] = ()) -> Any:
    """The default experiment's config, its outputs under ``run``'s parent, with ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.runs.config import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return hydra_compose("config", overrides=["experiment=default", f"output_root={run.parent}", *overrides])


def cache_overrides(work: Path, cache: str | None) -> list[str]:
    if cache is None:
        return ["eval.cache.enabled=false"]
    return ["eval.cache.enabled=true", f"eval.cache.root={work / f'cache_{cache}'}"]


def sweep_points(cfg: Any, sweep: str = "k") -> dict[int, Any]:
    """The experiment's finished points (:func:`~pipeline.runs.sweep_points.discover_points`) by the value of the
    key ``sweep`` varies (:data:`SWEEPS`)."""
    from omegaconf import OmegaConf

    from pipeline.runs.sweep_points import discover_points

    points, _ = discover_points(cfg)
    return {int(OmegaConf.select(p.cfg, SWEEPS[sweep].key)): p for p in points}


def scenario_dirs(args: argparse.Namespace, name: str) -> dict[int, Path]:
    """Each point's evaluate folder in scenario ``name`` (by k, or by max_iters on the dictionary-only sweep); a
    sweep's are copies of the points' own."""
    sc = SCENARIOS[name]
    return {k: Path(args.work) / name / f"{SWEEPS[sc.sweep].prefix}{k}" for k in sc.keys()}


def snapshot(src: Path, dst: Path) -> None:
    """Copy an evaluate folder's record files and results (not its artifacts) from ``src`` to ``dst``."""
    dst.mkdir(parents=True)
    shutil.copytree(src / "eval_results", dst / "eval_results")
    for f in ("saes.json", "failed.json", "skipped.json", "eval_info.json"):
        shutil.copy2(src / f, dst / f)


def one_scenario(args: argparse.Namespace) -> None:
    """Run one scenario in this process and print its record as JSON (the last line)."""
    from omegaconf import OmegaConf

    from pipeline.runs.evaluation import check_eval, eval_setup
    from pipeline.runs.sweep_eval import evaluate_sweep, evaluate_together

    sc = SCENARIOS[args.scenario]
    run, work = Path(getattr(args, SWEEPS[sc.sweep].run_arg)), Path(args.work)
    cfg = compose(run, [*cache_overrides(work, sc.cache), *args.override])
    points = sweep_points(cfg, sc.sweep)
    folder = work / args.scenario
    shutil.rmtree(folder, ignore_errors=True)
    dirs = scenario_dirs(args, args.scenario)
    if sc.points is None:  # the points' evaluate folders and the joint run's work folder go first
        from pipeline.runs.layout import experiment_dir
        from pipeline.runs.sweep_eval import WORK_PREFIX

        own = {k: p.evaluate_dir for k, p in points.items()}  # where each point's own evaluate stage writes
        for d in [*own.values(), *experiment_dir(cfg).glob(f"{WORK_PREFIX}*")]:
            shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        evaluate_sweep(cfg)
        wall = time.perf_counter() - t0
        for k, d in dirs.items():  # kept beside the other scenarios: a later sweep rewrites the points' folders
            snapshot(own[k], d)
    else:
        chosen = []
        for k, saes in sc.points:
            point_cfg = OmegaConf.merge(points[k].cfg, {"eval": {"saes": saes}})
            chosen.append(dataclasses.replace(points[k], cfg=point_cfg, evaluate_dir=dirs[k]))
        e = check_eval(cfg)
        t0 = time.perf_counter()
        evaluate_together(e, eval_setup(chosen[0].cfg, e), chosen, folder / "together", None)
        wall = time.perf_counter() - t0
    first = dirs[sc.keys()[0]]
    info = json.loads((first / "eval_info.json").read_text())
    cache = info.get("eval_cache") or {}
    record = {
        "points": {str(k): saes for k, saes in (sc.points or [(k, DB) for k in sorted(points)])},
        "saes": sum(len(json.loads((d / "saes.json").read_text())) for d in dirs.values()),
        "distinct_saes": (info.get("evaluated_together") or {}).get("saes"),
        "cache": sc.cache,
        "wall_seconds": round(wall, 1),
        "metric_seconds": {k: round(v, 1) for k, v in info["timings_s"].items() if v >= 0.05},
        "eval_seconds": round(info["total_eval_s"], 1),
        "cache_hits": cache.get("hits"),
        "cache_misses": cache.get("misses"),
        "cache_bytes_written": cache.get("bytes_written"),
        "core_forwards": info["sizes"].get("core", {}).get("shared_forwards"),
        "failed": sorted({f["metric"] for d in dirs.values() for f in json.loads((d / "failed.json").read_text())}),
    }
    print(json.dumps(record))


def machine() -> str:
    """The architecture, the cores and, where ``/proc/cpuinfo`` tells, the CPU's name and whether it has AVX-512
    (float kernels, and so the last bits of results, differ with the vector units)."""
    text = f"{platform.machine()}, {os.cpu_count()} cores"
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return text
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    text += f", {name.group(1).strip()}" if name else ""
    return text + (", AVX-512" if re.search(r"\bavx512f\b", info) else "")


def result_files(folder: Path) -> dict[str, Any]:
    """Every SAEBench result file of an evaluate folder, less :data:`VOLATILE` (relative path -> content)."""
    out = {}
    for f in sorted((folder / "eval_results").rglob("*.json")):
        res = json.loads(f.read_text())
        out[f.relative_to(folder).as_posix()] = {k: v for k, v in res.items() if k not in VOLATILE}
    return out


def equal_results(args: argparse.Namespace, done: set[str]) -> dict[str, Any]:
    """For each group of :data:`EQUAL` whose scenarios ran: whether they wrote the same result files."""
    out: dict[str, Any] = {}
    for group, members in EQUAL.items():
        found = [(n, k) for n, k in members if n in done]
        if len(found) < 2:
            continue
        folders = [scenario_dirs(args, n)[k] for n, k in found]
        ref = result_files(folders[0])
        entry: dict[str, Any] = {"compared": [n for n, _ in found], "files": len(ref)}
        for (n, _), f in zip(found[1:], folders[1:]):
            other = result_files(f)
            diff = sorted(x for x in ref.keys() | other.keys() if ref.get(x) != other.get(x))
            entry[n] = "equal" if not diff and ref else {"differing_files": diff}
        out[group] = entry
    return out


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of seconds over the number of SAEs."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def derived(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's ratios from the scenarios (module docstring), with their targets."""
    out: dict[str, Any] = {}
    w = {k: v["wall_seconds"] for k, v in runs.items()}
    for path, first in (("warm", "cold_1"), ("uncached", "uncached_1")):
        pts = [(n, w[f"{path}_{n}"]) for n in N_SAES if f"{path}_{n}" in w]
        if len(pts) >= 2 and first in w:
            slope = _slope(pts)
            key = "one_more_sae" if path == "warm" else "one_more_sae_uncached"
            out[f"{key}_seconds"] = round(slope, 1)
            out[key] = round(slope / w[first], 3)
    warm = {n: runs[f"warm_{n}"]["metric_seconds"] for n in N_SAES if f"warm_{n}" in runs}
    if len(warm) >= 2:  # where one more SAE's time goes
        metrics = sorted(set.intersection(*(set(m) for m in warm.values())))
        out["one_more_sae_metric_seconds"] = {
            m: round(_slope([(n, s[m]) for n, s in warm.items()]), 1) for m in metrics
        }
    if {"cold_1", "warm_1"} <= w.keys():
        out["second_run"] = round(w["warm_1"] / w["cold_1"], 3)
    if {"point_cold", "point_k16_warm"} <= w.keys():
        out["second_point"] = round(w["point_k16_warm"] / w["point_cold"], 3)
    if {"point_cold", "sweep_4"} <= w.keys():
        out["sweep_4"] = round(w["sweep_4"] / w["point_cold"], 3)
    if {"point_cold", "sweep_4"} <= w.keys() and "one_more_sae_seconds" in out:
        # the sweep pays the point's SAE-independent part F once, then each of its SAEs at s (the slope):
        # (F + n4 s) / (F + n1 s) <= T holds for s <= (T - 1) F / (n4 - n1 T)
        s, t = out["one_more_sae_seconds"], TARGETS["sweep_4"]
        n1, n4 = runs["point_cold"]["saes"], runs["sweep_4"]["saes"]
        fixed = w["point_cold"] - n1 * s
        out["point_fixed_seconds"] = round(fixed, 1)
        out["sweep_4_predicted"] = round((fixed + n4 * s) / (fixed + n1 * s), 3)
        out["sweep_4_target_per_sae_seconds"] = round((t - 1) * fixed / (n4 - n1 * t), 1)
    if {"point_cold", "sweep_iters_4"} <= w.keys():
        out["sweep_4_dictionary_only"] = round(w["sweep_iters_4"] / w["point_cold"], 3)
    if {"point_cold", "sweep_4_warm"} <= w.keys():
        out["sweep_4_after_a_run"] = round(w["sweep_4_warm"] / w["point_cold"], 3)
    for n in N_SAES:
        if {f"uncached_{n}", f"warm_{n}"} <= w.keys():
            out[f"warm_over_uncached_{n}"] = round(w[f"warm_{n}"] / w[f"uncached_{n}"], 3)
    if {"uncached_1", "cold_1"} <= w.keys():
        out["cold_over_uncached"] = round(w["cold_1"] / w["uncached_1"], 3)
    out["targets"] = {k: round(v, 3) for k, v in TARGETS.items()}
    out["met"] = {k: out[k] <= v for k, v in TARGETS.items() if k in out}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="outputs/bench_sweep/default", help="the prepared sweep's experiment folder")
    p.add_argument("--iters-run", default="outputs/bench_iters/default", help="the dictionary-only sweep's folder")
    p.add_argument("--work", default="outputs/bench_evaluate", help="where the scenarios and the caches go")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--name", default="default store")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--add", action="store_true", help="keep the stored record's other scenarios (run some again)")
    p.add_argument("--override", action="append", default=[], help="a config override for every scenario (a check)")
    p.add_argument("--scenario", help=argparse.SUPPRESS)  # internal: run one scenario in this process
    args = p.parse_args()
    if args.scenario:
        one_scenario(args)
        return
    run, work, iters_run = Path(args.run).resolve(), Path(args.work).resolve(), Path(args.iters_run).resolve()
    args.run, args.work, args.iters_run = str(run), str(work), str(iters_run)
    names = [n for n in args.scenarios.split(",") if n]  # none, with --add: the derived figures again
    for name in names:
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}: one of {', '.join(SCENARIOS)}")
    for which, sweep in SWEEPS.items():  # each prepared sweep the scenarios use has the points they evaluate
        needed = {k for n in names if SCENARIOS[n].sweep == which for k in SCENARIOS[n].keys()}
        folder = Path(getattr(args, sweep.run_arg))
        missing = sorted(needed - sweep_points(compose(folder), which).keys()) if needed else []
        if missing:
            raise SystemExit(
                f"{folder} lacks the points {sweep.key}={missing} (finished fit and baselines): run `python -m "
                f"pipeline -m experiment=default {sweep.key}={','.join(map(str, sorted(sweep.values)))} "
                f"until=baselines output_root={folder.parent}` first (the default's harvest, fit and baselines "
                "folders copied in are reused)"
            )
    out = Path(args.out)
    stored = json.loads(out.read_text()) if out.exists() else {}
    before = stored.get(args.name, {}) if args.add else {}
    kept = before.get("runs", {})  # runs kept from an earlier invocation keep its commit
    runs: dict[str, dict[str, Any]] = {k: {"commit": before.get("commit"), **v} for k, v in kept.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)

    def save() -> dict[str, Any]:
        result = {
            "machine": machine(),
            "date": datetime.date.today().isoformat(),
            "commit": commit.stdout.strip(),
            "overrides": args.override,
            "runs": runs,
            "derived": derived(runs),
            "equal_results": equal_results(args, set(runs)),
        }
        stored = json.loads(out.read_text()) if out.exists() else {}
        stored[args.name] = result
        atomic_write_text(out, json.dumps(stored, indent=1) + "\n")
        return result

    for name in names:
        if SCENARIOS[name].cold:  # cold means cold
            shutil.rmtree(work / f"cache_{SCENARIOS[name].cache}", ignore_errors=True)
        cmd = [sys.executable, __file__, "--scenario", name, "--run", str(run), "--work", str(work)]
        cmd += ["--iters-run", str(iters_run)]
        cmd += [f"--override={o}" for o in args.override]
        print(f"[bench_evaluate] {name} ...", flush=True)
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"scenario {name} failed (rc {done.returncode})")
        runs[name] = {"commit": commit.stdout.strip(), **json.loads(done.stdout.strip().splitlines()[-1])}
        print(f"[bench_evaluate] {name}: {runs[name]['wall_seconds']} s {runs[name]['metric_seconds']}", flush=True)
        save()  # after every scenario: a stopped benchmark keeps what it measured
    result = save()
    print(json.dumps({k: result[k] for k in ("derived", "equal_results")}, indent=1))


if __name__ == "__main__":
    main()
