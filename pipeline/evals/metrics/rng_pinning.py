"""The random state each SAE's part of a probing metric starts from, made independent of what was cached.

SAEBench's sparse probing, SCR and TPP draw from the global ``random`` / torch generators both while training
the LLM's probes (SAE-independent, cached) and while scoring each SAE (negative samples, probe init and
shuffles). A run that loads cached activations skips the first draws, so without care its SAE scores differ
from a cold run's. Here, per dataset (module attributes SAEBench looks up at call time, undone afterwards):

- the generators are seeded with ``config.random_seed`` when the dataset starts (SAEBench seeds once per SAE,
  so its first dataset starts exactly so; later ones no longer inherit draws that depend on the previous SAE);
- the state at the split (the first SAE-dependent call) is saved beside the activations when they are computed
  (``<activations stem>_rng.pt``) and restored when they are loaded.

Every SAE, cold or cached, first in the run or not, then starts its scoring from the same state. Absorption:
torch is seeded with ``eval.absorption.seed`` before its probe is trained and before each SAE's k-sparse
probes (SAEBench seeds neither; the probe and the SAE scores followed whatever the process had drawn), and
``random`` and torch before each SAE's k-sparse probing and feature absorption experiments (their prompts
followed the SAEs run before it, and whether the probe was trained in the run or came from the cache).
"""

from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.evals.saebench_patches import patched_attr

RNG_SUFFIX = "_rng.pt"
"""What replaces ``.pt`` in an activations file's name to name its saved random state."""


def rng_state() -> dict[str, Any]:
    """The state of Python's ``random``, torch's CPU generator and (when initialised) every CUDA generator."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the CUDA part only where CUDA is available)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed ``random`` and torch (every device) as SAEBench's ``run_eval_single_sae`` does."""
    random.seed(seed)
    torch.manual_seed(seed)


def rng_path(activations_path: Path) -> Path:
    """Where the random state at the split of ``activations_path``'s dataset is kept."""
    return activations_path.with_name(activations_path.name.removesuffix(".pt") + RNG_SUFFIX)


def probing_activations_name(dataset_name: str, perform_scr: bool | None, column1_vals: Any) -> str:
    """SAEBench 0.6.0's name of a dataset's activations file: sparse probing and TPP
    ``<dataset>_activations.pt``, SCR ``<dataset>_<class a>_<class b>_activations.pt`` ('/' -> '_')."""
    if perform_scr:
        return f"{dataset_name}_{column1_vals[0]}_{column1_vals[1]}_activations.pt".replace("/", "_")
    return f"{dataset_name}_activations.pt".replace("/", "_")


class _Split:
    """The pending split of the dataset being run: where its state goes and whether it was computed."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.cached = False

    def at_split(self) -> None:
        """Called at the first SAE-dependent call of a dataset: save (computed) or restore (loaded)."""
        if self.path is None:
            return
        path, self.path = self.path, None
        if self.cached and path.is_file():
            set_rng_state(torch.load(path, weights_only=False))
        else:
            torch.save(rng_state(), path)


@contextlib.contextmanager
def pinned_probing_rng(main: Any, split_owner: Any, split_name: str, scr_tpp: bool) -> Iterator[None]:
    """Pin the random state of SAEBench's ``main.run_eval_single_dataset`` (sparse probing's or SCR/TPP's module
    ``main``) as the module docstring says; ``split_owner.split_name`` is the first SAE-dependent call of a
    dataset (sparse probing: ``activation_collection.get_sae_meaned_activations``; SCR/TPP:
    ``main.get_all_node_effects_for_one_sae``)."""
    split = _Split()
    original_dataset: Callable[..., Any] = main.run_eval_single_dataset
    original_split: Callable[..., Any] = getattr(split_owner, split_name)
    signature = inspect.signature(original_dataset)

    def run_dataset(*a: Any, **k: Any) -> Any:
        args = signature.bind(*a, **k)
        args.apply_defaults()
        p = args.arguments
        config = p["config"]
        scr = bool(config.perform_scr) if scr_tpp else None
        name = probing_activations_name(p["dataset_name"], scr, p.get("column1_vals"))
        path = Path(p["artifacts_folder"]) / name
        split.path, split.cached = rng_path(path), path.exists()
        seed_all(config.random_seed)
        try:
            return original_dataset(*a, **k)
        finally:
            split.path = None

    def at_split(*a: Any, **k: Any) -> Any:
        split.at_split()
        return original_split(*a, **k)

    with patched_attr(main, "run_eval_single_dataset", run_dataset), patched_attr(split_owner, split_name, at_split):
        yield


@contextlib.contextmanager
def pinned_absorption_rng(common: Any, k_sparse: Any, main: Any, seed: int) -> Iterator[None]:
    """Seed torch with ``seed`` before SAEBench's absorption probe is trained (``common.train_and_save_probes``)
    and before each SAE's k-sparse probes (``k_sparse.train_k_sparse_probes``); seed ``random`` and torch with
    ``seed`` before each SAE's k-sparse probing and feature absorption experiments (``main``'s
    ``run_k_sparse_probing_experiment`` / ``run_feature_absortion_experiment``: their prompts draw from
    ``random``), so an SAE's result depends neither on the SAEs run before it, nor on whether their results were
    kept, nor on whether the probe was trained in this run or came from the cache."""

    def seeded(fn: Callable[..., Any], also_random: bool = False) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            if also_random:
                random.seed(seed)
            torch.manual_seed(seed)
            return fn(*a, **k)

        return run

    with (
        patched_attr(common, "train_and_save_probes", seeded(common.train_and_save_probes)),
        patched_attr(k_sparse, "train_k_sparse_probes", seeded(k_sparse.train_k_sparse_probes)),
        patched_attr(main, "run_k_sparse_probing_experiment", seeded(main.run_k_sparse_probing_experiment, True)),
        patched_attr(main, "run_feature_absortion_experiment", seeded(main.run_feature_absortion_experiment, True)),
    ):
        yield


@contextlib.contextmanager
def pinned_ravel_rng(main: Any, seed: int) -> Iterator[None]:
    """Seed ``random`` and torch with ``seed`` each time SAEBench's RAVEL has its filtered dataset in hand
    (``main.RAVELFilteredDataset.load``, once per SAE and entity type), so the MDBM of every SAE starts from the
    same state whether the dataset was just filtered (drawing from ``random``: the first SAE of a cold run) or
    read back (every later SAE, and every SAE of a cached run)."""
    loaded_class = main.RAVELFilteredDataset

    class SeededAfterLoad(loaded_class):  # type: ignore[misc,valid-type]
        @classmethod
        def load(cls, load_path: str) -> Any:
            dataset = loaded_class.load(load_path)
            random.seed(seed)
            torch.manual_seed(seed)
            return dataset

    with patched_attr(main, "RAVELFilteredDataset", SeededAfterLoad):
        yield
