"""Fault injection: ``python -m pipeline experiment=smoke`` killed with SIGKILL inside each stage, then re-run.

Each case (:data:`KILLS`) arms one kill point of the child ``python -m tests.stages.fault_child`` (a wrapper of
``python -m pipeline`` that patches one function, counts its calls and SIGKILLs itself on the chosen one: see
there), starting from copies of an uninterrupted run's finished earlier stages. After the kill the test checks that
the process died of that SIGKILL, in that stage, then re-runs the plain pipeline to completion and checks

* that every file under the output root opens as its type (:func:`unreadable_files`) and that no leftover of an
  interrupted write could be taken for a result (:func:`mistakable_leftovers`);
* that the re-run resumed where the stage promises to: its log (the harvest after its listed shards, the fit
  from its checkpoint, results without a record re-run), and what the killed run finished (the listed shards, a
  saved baseline, a finished metric's results) not written again (:attr:`Kill.kept`);
* that every file equals the uninterrupted run's, byte for byte, except the records of wall time of the stages
  that ran again (:data:`CLOCKED`; SAEBench's result files are compared without their run stamps,
  :data:`RUN_STAMPS`).

Every run writes under the same absolute path (``<tmp>/run``): stage folders record absolute paths (the store in
the dictionary's metadata and in ``metrics.json``, the SAE folders in ``saes.json``), so a run elsewhere would
differ in those bytes alone. The uninterrupted reference is made there first and moved aside.

One case takes 0.5 to 2 minutes on 2 cores (the re-run runs the killed stage and every stage after it);
``-k harvest`` (or any stage's name) runs one stage's kills.

One module (~610 lines) because the kill table, the file checker that knows every output type and the byte
comparison with its list of clocked files are read together: each case's expectations name the others' parts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import html.parser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.runs.layout import DONE_MARKER, LOCK_FILE, STAGES
from tests.conftest import REPO
from tests.stages.fault_child import MARK

pytestmark = pytest.mark.slow

EXPERIMENT = "smoke"
#: Seconds one pipeline run may take before the test gives up on it.
RUN_TIMEOUT_S = 900


# ----------------------------------------------------------------------------------------------------------
# the kills
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kill:
    """One armed SIGKILL (:mod:`tests.stages.fault_child`) and what the re-run must show."""

    name: str
    stage: str
    """The stage it kills (earlier stages are copied from the uninterrupted run, finished)."""
    kind: str
    """``call``, ``write`` or ``torch_save`` (see :mod:`tests.stages.fault_child`)."""
    target: str
    """``module:qualname`` for ``call``, a glob of the written path otherwise."""
    call: int | Callable[[Path], int]
    """Which matching call dies (1-based), or a function of the uninterrupted run's experiment folder giving it."""
    expect: tuple[str, ...] = ()
    """Regular expressions the re-run's log must match: where it resumed."""
    forbid: tuple[str, ...] = ()
    """Regular expressions the re-run's log must not match: work it must not redo."""
    kept: tuple[str, ...] = ()
    """Globs (relative to the experiment folder) of files the killed run finished that the re-run must reuse,
    not write again (same bytes, same modification time); at least one file must match each."""
    leave_out: tuple[str, ...] = ()
    """Names (globs) left out of the copies of the earlier stages."""
    overrides: tuple[str, ...] = ()
    """Config overrides of the killed run and the re-run, among those no stage folder's hash covers."""
    why: str = ""
    """Where the kill lands, in words."""


def topk_steps_plus(extra: int) -> Callable[[Path], int]:
    """The optimiser step ``extra`` steps into the second baseline (batchtopk): the first (topk) trains
    ``steps`` steps, recorded in the uninterrupted run."""

    def call(reference: Path) -> int:
        (folder,) = reference.glob("baselines-*")
        return int(json.loads((folder / "topk" / "record.json").read_text())["steps"]) + extra

    return call


# The smoke preset: 96 contexts of 64 tokens in 3 shards of 32 contexts (4 forward batches of 8 each; one hook,
# so one _check_finite call per batch); 4 fit iterations with a checkpoint after each; topk then batchtopk
# (plateau budget, up to 128 steps each); core then sparse probing over 3 SAEs (the other metrics are skipped
# offline); one dashboards page per SAE; the report's markdown, plots and pages.
KILLS: tuple[Kill, ...] = (
    Kill(
        "harvest-forward-mid-shard-1",
        "harvest",
        "call",
        "pipeline.data.harvest:_check_finite",
        6,
        expect=(r"resuming \S+/store after 1 complete shard\(s\)",),
        kept=("harvest-*/store/*/*-00000.safetensors",),
        why="the 2nd forward batch of shard 1: shard 0 is listed in the manifest",
    ),
    Kill(
        "harvest-torn-shard-2",
        "harvest",
        "write",
        "*/store/*/train-00002.safetensors",
        1,
        expect=(r"resuming \S+/store after 2 complete shard\(s\)",),
        kept=("harvest-*/store/*/*-00000.safetensors", "harvest-*/store/*/*-00001.safetensors"),
        why="the last shard's file torn before its rename",
    ),
    Kill(
        "harvest-torn-manifest",
        "harvest",
        "write",
        "*/store/manifest.json",
        2,
        expect=(r"resuming \S+/store after 1 complete shard\(s\)",),
        kept=("harvest-*/store/*/*-00000.safetensors",),
        why="the manifest listing shard 1 torn: shard 1's files are on disk but not listed",
    ),
    Kill(
        "fit-update-iteration-3",
        "fit",
        "call",
        "pipeline.core.atom_update:update_atoms",
        3,
        expect=(r"resuming from \S+/fit\.ckpt at iteration 2",),
        why="iteration 3's atom update, after its coding",
    ),
    Kill(
        "fit-torn-last-checkpoint",
        "fit",
        "write",
        "*/fit.ckpt",
        7,
        expect=(r"resuming from \S+/fit\.ckpt at iteration 3",),
        # an epoch of this store is one batch (5,467 training rows, batches of 4,096) and the end of an epoch
        # writes a checkpoint too: writes 1 to 7 follow iterations 1, 1, 2, 2, 3, 3, 4
        why="the checkpoint after the last iteration torn",
    ),
    Kill(
        "fit-torn-dictionary-json",
        "fit",
        "write",
        "*/dictionary/dictionary.json",
        1,
        expect=(r"resuming from \S+/fit\.ckpt at iteration 4",),
        why="the dictionary's weights saved, its metadata (what marks it saved) torn",
    ),
    Kill(
        "baselines-topk-step-5",
        "baselines",
        "call",
        "pipeline.baselines.train:_BudgetedTrainer.step",
        5,
        why="the first baseline's 5th optimiser step",
    ),
    Kill(
        "baselines-batchtopk-step-5",
        "baselines",
        "call",
        "pipeline.baselines.train:_BudgetedTrainer.step",
        topk_steps_plus(5),
        forbid=(r"baseline topk: topk, width",),
        kept=("baselines-*/topk/*",),
        why="the second baseline's 5th step: topk is saved and must be reused",
    ),
    Kill(
        "baselines-torn-batchtopk-record",
        "baselines",
        "write",
        "*/baselines-*/.batchtopk.tmp-*/record.json",
        1,
        forbid=(r"baseline topk: topk, width",),
        kept=("baselines-*/topk/*",),
        why="batchtopk trained, its folder being written beside its final place",
    ),
    Kill(
        "evaluate-torn-core-result-2",
        "evaluate",
        "write",
        "*/eval_results/core/*.json",
        2,
        # a result is kept once recorded with its SAE's weights, which happens when its metric finishes
        expect=(r"re-running \S+/eval_results/core/\S+: no record of the weights",),
        why="core mid-metric: the first SAE's result written, the second's torn",
    ),
    Kill(
        "evaluate-torn-probing-activations",
        "evaluate",
        "torch_save",
        "*/artifacts/sparse_probing/*_activations.pt*",
        1,
        # the evaluate stage's shared cache of SAE-independent artifacts lives in the harvest folder
        # (pipeline/evals/metrics/artifact_reuse.py): left out, so that sparse probing computes its activations
        leave_out=("eval_cache",),
        why="sparse probing's LLM activations (SAEBench writes them with a plain torch.save) torn",
    ),
    Kill(
        "evaluate-torn-probing-activations-cache-off",
        "evaluate",
        "torch_save",
        "*/artifacts/sparse_probing/*_activations.pt*",
        1,
        # off, the stage reads SAEBench's artifacts folder as a killed run left it (eval.cache is not hashed)
        overrides=("eval.cache.enabled=false",),
        why="the same with the shared cache off",
    ),
    Kill(
        "evaluate-torn-probing-result-2",
        "evaluate",
        "write",
        "*/eval_results/sparse_probing/*.json",
        2,
        expect=(r"re-running \S+/eval_results/sparse_probing/\S+: no record of the weights",),
        kept=("evaluate-*/eval_results/core/*.json", "evaluate-*/eval_results/core_fit_positions/*.json"),
        why="sparse probing mid-metric: core finished, one probing result written",
    ),
    Kill(
        "dashboards-torn-first-page",
        "dashboards",
        "write",
        "*/dashboards-*/*_K256_k8.html",
        1,
        why="the first SAE's page torn",
    ),
    Kill(
        "dashboards-torn-summary",
        "dashboards",
        "write",
        "*/dashboards-*/dashboards.json",
        1,
        why="every page written, the summary torn",
    ),
    Kill(
        "report-torn-report-md",
        "report",
        "write",
        "*/report-*/report.md",
        1,
        why="report.md torn (its plots and summary.json written)",
    ),
    Kill(
        "report-torn-index-html",
        "report",
        "write",
        "*/report-*/index.html",
        1,
        why="report.md and report.html written, the index page torn",
    ),
)


# ----------------------------------------------------------------------------------------------------------
# what is compared with the uninterrupted run
# ----------------------------------------------------------------------------------------------------------
#: Files that record wall-clock time (durations, dates), by stage folder, with the stages whose clocks they carry.
#: Such a file is compared only when none of those stages ran again after the kill: then it is the uninterrupted
#: run's own copy, or was made again from inputs that are (report.md after a kill in the dashboards or report
#: stage, saes.json after one in evaluate). Everything else is deterministic on CPU and compared byte for byte
#: whatever ran again: the store's shards and manifest, the dictionary's weights (a resumed fit reaches the
#: uninterrupted fit's atoms exactly: tests/stages/test_orchestrator.py), the baselines' weights and cfg.json
#: (plateau budgets count samples, not seconds), the exported SAEs, result_weights.json, skipped.json,
#: failed.json, the labelled data and SAEBench's cached activations, the dashboards, the report's index page and
#: its plots against L0 and iteration, and each stage's config.yaml.
CLOCKED: dict[str, dict[str, tuple[str, ...]]] = {
    "harvest": {DONE_MARKER: ("harvest",)},  # finished_at
    "fit": {
        DONE_MARKER: ("fit",),
        "dictionary/dictionary.json": ("fit",),  # history: learner seconds per iteration; metadata: the spend
        "fit.ckpt": ("fit",),  # the same history
        "metrics.json": ("fit",),  # fit_seconds, spend
    },
    "baselines": {
        DONE_MARKER: ("fit", "baselines"),  # the dictionary's spend
        "baselines.json": ("fit", "baselines"),  # each record, and its budget matched to the fit's spend
        "*/record.json": ("baselines",),  # seconds, training and held-out curves against seconds
    },
    "evaluate": {
        DONE_MARKER: ("evaluate",),  # total eval seconds
        "saes.json": ("fit", "baselines"),  # each SAE's training seconds and curves
        "eval_info.json": ("evaluate",),  # per-metric seconds
    },
    "dashboards": {DONE_MARKER: ("dashboards",)},
    "report": {
        DONE_MARKER: ("report",),
        "report.md": ("fit", "baselines", "evaluate"),  # time to quality, wall s, the evals' seconds
        "report.html": ("fit", "baselines", "evaluate"),  # report.md as HTML
        "summary.json": ("fit", "baselines"),  # the table's wall s
        "fvu_vs_time.png": ("fit", "baselines"),  # held-out FVU against wall time
    },
}
#: SAEBench's result files (``eval_results/<metric>/*.json``) stamp each run: a random id, the time, and the
#: commit of the repository the process ran in. They are compared as JSON without these keys.
RUN_STAMPS = ("eval_id", "datetime_epoch_millis", "sae_bench_commit_hash")
#: Names of what an interrupted write leaves: pipeline.utils.atomic's temporary files, the temporary folders of a
#: baseline being saved and of SAEBench's torch.save, a replaced baseline folder kept aside, SAEBench core's
#: unfinished positions file.
LEFTOVER_GLOBS = (".*.tmp-*", ".*.old-*", ".*.partial")
#: A leftover no stage can take for a result: hidden, and named with a temporary suffix after the result's own,
#: so that no glob of results (``*.json``, ``*.png``, ``evaluate-*``, ...) matches it.
HARMLESS_NAME = re.compile(r"^\..+\.(tmp|old)-\d+$|^\..+\.partial$")
#: Folders whose every file a stage reads (evaluate drops the unreadable results under eval_results/ and the
#: report reads every metric folder there): no leftover may stay inside them, whatever its name.
SCANNED = ("evaluate-*/eval_results",)


# ----------------------------------------------------------------------------------------------------------
# checking a tree
# ----------------------------------------------------------------------------------------------------------
class _Html(html.parser.HTMLParser):
    """Collects the closing tags of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.closed: list[str] = []

    def handle_endtag(self, tag: str) -> None:
        self.closed.append(tag)


def _open_json(path: Path) -> None:
    """Parses as JSON."""
    json.loads(path.read_text(encoding="utf-8"))


def _open_yaml(path: Path) -> None:
    """Parses as YAML."""
    import yaml

    yaml.safe_load(path.read_text(encoding="utf-8"))


def _open_safetensors(path: Path) -> None:
    """Every tensor loads (a cut file fails its header or its offsets)."""
    from safetensors.torch import load_file

    load_file(str(path))


def _open_torch(path: Path) -> None:
    """Loads with torch's restricted unpickler (a cut zip archive lacks its central directory)."""
    import torch

    torch.load(path, map_location="cpu", weights_only=True)


def _open_png(path: Path) -> None:
    """Decodes as an image."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()  # decodes every row: a truncated file raises


def _open_html(path: Path) -> None:
    """Parses as HTML and closes its ``<html>`` element."""
    parser = _Html()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    if "html" not in parser.closed:
        raise ValueError("no closing </html>: the page is cut short")


def _open_text(path: Path) -> None:
    """UTF-8 and not empty (all that a cut markdown file or log can be checked for)."""
    if not path.read_text(encoding="utf-8").strip():
        raise ValueError("empty")


def _open_parquet(path: Path) -> None:
    """Reads as a parquet table."""
    import pyarrow.parquet as pq

    pq.read_table(path)


def _open_lock(path: Path) -> None:
    """Empty."""
    if path.stat().st_size:
        raise ValueError("not empty: a lock file (flock) holds nothing")


#: How each kind of file under an output root is opened (by suffix; stage folders' lock files by name); a file of
#: another kind is reported.
OPENERS: dict[str, Callable[[Path], None]] = {
    LOCK_FILE: _open_lock,
    ".json": _open_json,
    ".yaml": _open_yaml,
    ".safetensors": _open_safetensors,
    ".pt": _open_torch,
    ".ckpt": _open_torch,
    ".png": _open_png,
    ".html": _open_html,
    ".md": _open_text,
    ".log": _open_text,
    ".parquet": _open_parquet,
}


def files_under(root: Path) -> Iterator[Path]:
    """Every file under ``root``, sorted."""
    return (p for p in sorted(root.rglob("*")) if p.is_file())


def leftovers(root: Path) -> list[Path]:
    """Files and folders under ``root`` whose names say an interrupted write left them (:data:`LEFTOVER_GLOBS`)."""
    return sorted(p for p in root.rglob("*") if any(fnmatch.fnmatch(p.name, g) for g in LEFTOVER_GLOBS))


def mistakable_leftovers(root: Path) -> list[str]:
    """``path: why`` for every leftover (:func:`leftovers`) that a later stage could take for a result: one not
    named as :data:`HARMLESS_NAME` says, or one inside a folder of :data:`SCANNED`. Other leftovers of a killed
    atomic write (a hidden temporary file beside its target) are read by nothing."""
    out = []
    for path in leftovers(root):
        rel = path.relative_to(root).as_posix()
        if not HARMLESS_NAME.match(path.name):
            out.append(f"{rel}: a leftover named like a result")
        if any(fnmatch.fnmatch(rel, f"*/{folder}/*") for folder in SCANNED):
            out.append(f"{rel}: a leftover in a folder a stage reads whole")
    return out


def unreadable_files(root: Path) -> list[str]:
    """``path: why`` for every file under ``root`` that does not open as its suffix says (:data:`OPENERS`); the
    files inside leftovers (:func:`leftovers`, reported on their own) are not opened."""
    problems = []
    for path in files_under(root):
        if is_leftover(path, root):
            continue
        opener = OPENERS.get(path.name) or OPENERS.get(path.suffix)
        if opener is None:
            problems.append(f"{path.relative_to(root)}: no checker for {path.suffix or 'files without a suffix'}")
            continue
        try:
            opener(path)
        except Exception as exc:  # noqa: BLE001 - reported with the file
            problems.append(f"{path.relative_to(root)}: {type(exc).__name__}: {exc}")
    return problems


# ----------------------------------------------------------------------------------------------------------
# comparing with the uninterrupted run
# ----------------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    """sha256 of the file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def without_run_stamps(path: Path) -> Any:
    """A SAEBench result file's JSON without :data:`RUN_STAMPS`."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if k not in RUN_STAMPS}


def clocks_of(stage: str, inner: str) -> tuple[str, ...]:
    """The stages whose wall clocks file ``inner`` (relative to its ``stage`` folder) records (:data:`CLOCKED`)."""
    for pattern, clocks in CLOCKED[stage].items():
        if fnmatch.fnmatch(inner, pattern):
            return clocks
    return ()


def is_leftover(path: Path, root: Path) -> bool:
    """Whether ``path`` is, or lies in, a leftover of an interrupted write (:data:`LEFTOVER_GLOBS`)."""
    return any(fnmatch.fnmatch(part, g) for part in path.relative_to(root).parts for g in LEFTOVER_GLOBS)


def stage_files(experiment: Path) -> dict[str, Path]:
    """``<stage>-<hash>/<path>`` -> file, for every file of every stage folder of ``experiment`` (not Hydra's
    per-run logs, not leftovers: :func:`mistakable_leftovers` judges those)."""
    return {
        p.relative_to(experiment).as_posix(): p
        for folder in sorted(experiment.iterdir())
        if folder.is_dir() and folder.name.split("-")[0] in STAGES
        for p in files_under(folder)
        if not is_leftover(p, experiment)
    }


CACHE_ONLY = ("evaluate-*/artifacts/core/forwards/*", "evaluate-*/artifacts/absorption/probes/prompt_activations/*")
"""Files the evaluate stage writes only to publish them in the shared eval cache (core's kept forwards,
absorption's prompt activations): a run with ``eval.cache.enabled=false`` has none."""
CACHE_OFF_ONLY = ("evaluate-*/artifacts/*/.finished.json",)
"""Files only a run with the eval cache off writes: the mark of a metric's artifacts folder that a finished run
left (``pipeline/evals/metrics/artifact_reuse.py``, ``FINISHED_FILE``)."""


def differences(run: Path, reference: Path, ran_again: set[str], cache_off: bool = False) -> list[str]:
    """How ``run``'s stage files differ from ``reference``'s (experiment folders), wall-clock records of the
    stages in ``ran_again`` aside (:data:`CLOCKED`); SAEBench's results are compared without run stamps.
    ``cache_off``: ``run`` ran with the eval cache off (the reference with it on), so :data:`CACHE_ONLY` files
    are not expected and :data:`CACHE_OFF_ONLY` files not compared."""
    mine, theirs = stage_files(run), stage_files(reference)
    if cache_off:
        theirs = {rel: p for rel, p in theirs.items() if not any(fnmatch.fnmatch(rel, c) for c in CACHE_ONLY)}
        mine = {rel: p for rel, p in mine.items() if not any(fnmatch.fnmatch(rel, c) for c in CACHE_OFF_ONLY)}
    out = [f"{rel}: missing" for rel in sorted(set(theirs) - set(mine))]
    out += [f"{rel}: not in the uninterrupted run" for rel in sorted(set(mine) - set(theirs))]
    for rel in sorted(set(mine) & set(theirs)):
        folder, inner = rel.split("/", 1)
        stage = folder.split("-")[0]
        if set(clocks_of(stage, inner)) & ran_again:
            continue
        if stage == "evaluate" and fnmatch.fnmatch(inner, "eval_results/*/*.json"):
            if without_run_stamps(mine[rel]) != without_run_stamps(theirs[rel]):
                out.append(f"{rel}: other results than the uninterrupted run's")
        elif sha256(mine[rel]) != sha256(theirs[rel]):
            out.append(f"{rel}: other bytes than the uninterrupted run's")
    return out


# ----------------------------------------------------------------------------------------------------------
# running the pipeline
# ----------------------------------------------------------------------------------------------------------
def run_pipeline(
    root: Path, kill: Kill | None = None, reference: Path | None = None, overrides: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """``python -m pipeline experiment=smoke output_root=root [overrides]``, or with ``kill`` armed
    (``python -m tests.stages.fault_child``; ``reference``: the uninterrupted experiment folder, for a kill whose
    call is computed from it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULT_")}
    module = "pipeline"
    if kill is not None:
        call = kill.call if isinstance(kill.call, int) else kill.call(reference)
        env.update(FAULT_KIND=kill.kind, FAULT_TARGET=kill.target, FAULT_CALL=str(call))
        module = "tests.stages.fault_child"
    cmd = [sys.executable, "-m", module, f"experiment={EXPERIMENT}", f"output_root={root}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def tail(done: subprocess.CompletedProcess, n: int = 4000) -> str:
    """The ends of a run's stdout and stderr, for an assertion's message."""
    return f"--- stdout ---\n{done.stdout[-n:]}\n--- stderr ---\n{done.stderr[-n:]}"


def stage_folder(experiment: Path, stage: str) -> Path | None:
    """``experiment``'s folder of ``stage`` (None when there is none)."""
    found = sorted(experiment.glob(f"{stage}-*"))
    assert len(found) <= 1, found
    return found[0] if found else None


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's folder: the reference, each case's run, failed cases' runs."""
    return tmp_path_factory.mktemp("fault_injection")


@pytest.fixture(scope="module")
def reference(work: Path) -> Path:
    """The uninterrupted smoke run's experiment folder (made at ``work/run``, then moved to ``work/reference``)."""
    done = run_pipeline(work / "run")
    assert done.returncode == 0, tail(done)
    (work / "run").rename(work / "reference")
    experiment = work / "reference" / EXPERIMENT
    assert all(is_finished(stage_folder(experiment, s)) for s in STAGES)
    assert unreadable_files(work / "reference") == [] and leftovers(work / "reference") == []
    return experiment


def file_states(experiment: Path, pattern: str) -> dict[str, tuple[int, str]]:
    """Each file matching ``pattern`` under ``experiment``: its modification time (ns) and sha256."""
    return {p.relative_to(experiment).as_posix(): (p.stat().st_mtime_ns, sha256(p)) for p in experiment.glob(pattern)}


def is_finished(folder: Path | None) -> bool:
    """Whether ``folder`` exists and holds its completion marker."""
    return folder is not None and (folder / DONE_MARKER).is_file()


@pytest.mark.parametrize("kill", KILLS, ids=[k.name for k in KILLS])
def test_a_killed_stage_reruns_to_the_uninterrupted_result(kill: Kill, work: Path, reference: Path) -> None:
    """Killed at ``kill``'s point, the plain re-run finishes with every file whole, resumes where the stage promises,
    and gives the uninterrupted run's bytes wherever they do not record wall time."""
    root = work / "run"
    shutil.rmtree(root, ignore_errors=True)
    experiment = root / EXPERIMENT
    before = STAGES[: STAGES.index(kill.stage)]
    for stage in before:  # the finished earlier stages, as the uninterrupted run left them
        folder = stage_folder(reference, stage)
        shutil.copytree(folder, experiment / folder.name, ignore=shutil.ignore_patterns(*kill.leave_out))
    try:
        killed = run_pipeline(root, kill, reference, kill.overrides)
        # died of the armed SIGKILL, in the armed stage: earlier stages finished, the stage unfinished, none later
        assert killed.returncode == -signal.SIGKILL, tail(killed)
        assert killed.stderr.count(MARK) == 1, tail(killed)
        assert all(is_finished(stage_folder(experiment, s)) for s in before)
        assert not is_finished(stage_folder(experiment, kill.stage))
        assert all(stage_folder(experiment, s) is None for s in STAGES[STAGES.index(kill.stage) + 1 :])
        finished = {pattern: file_states(experiment, pattern) for pattern in kill.kept}
        assert all(finished.values()), finished

        rerun = run_pipeline(root, overrides=kill.overrides)
        assert rerun.returncode == 0, tail(rerun)
        log = rerun.stdout + rerun.stderr
        assert all(re.search(p, log) for p in kill.expect), (kill.expect, tail(rerun))
        assert not any(re.search(p, log) for p in kill.forbid), (kill.forbid, tail(rerun))
        assert all(is_finished(stage_folder(experiment, s)) for s in STAGES)
        assert {pattern: file_states(experiment, pattern) for pattern in kill.kept} == finished  # reused
        assert unreadable_files(root) == []
        assert mistakable_leftovers(root) == []
        cache_off = "eval.cache.enabled=false" in kill.overrides
        assert differences(experiment, reference, set(STAGES[STAGES.index(kill.stage) :]), cache_off) == []
    except BaseException:
        if root.exists():  # kept for a look
            shutil.rmtree(work / f"failed-{kill.name}", ignore_errors=True)
            root.rename(work / f"failed-{kill.name}")
        raise
    shutil.rmtree(root)


def test_the_matrix_kills_every_stage_at_least_twice() -> None:
    """At least two kill points in every stage."""
    per_stage = {s: sum(k.stage == s for k in KILLS) for s in STAGES}
    assert min(per_stage.values()) >= 2, per_stage
