"""Context managers that point SAEBench 0.6.0 at what this pipeline already has, undone on exit.

Nothing here computes a metric. SAEBench looks these module attributes up at call time, so swapping them for
the duration of a run is enough:

* the model: ``HookedTransformer.from_pretrained_no_processing`` returns the model already loaded
  (:func:`use_loaded_model`);
* datasets: ``load_dataset`` in SAEBench's dataset modules resolves names given in ``eval.local_datasets`` (and
  the labelled passages built here) to local files (:func:`local_datasets`);
* cwd-relative writes go into the run folder (:func:`pushd`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

#: File suffix -> ``datasets`` builder of a local data file.
DATA_KINDS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
#: Split names recognised in local data file names (``train.parquet``, ``test-00000.parquet``, ...).
SPLITS = ("train", "test", "validation")
#: Marker file of a ``datasets`` ``save_to_disk`` folder.
SAVED_DATASET_MARKER = "dataset_dict.json"


@contextlib.contextmanager
def patched_attr(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name = value`` for the duration; restore (or delete) it afterwards."""
    had = hasattr(obj, name)
    old = getattr(obj, name, None)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def patched_dict_item(d: dict, key: Any, value: Any) -> Iterator[None]:
    """Set ``d[key] = value`` for the duration; restore (or remove) it afterwards."""
    had, old = key in d, d.get(key)
    d[key] = value
    try:
        yield
    finally:
        if had:
            d[key] = old
        else:
            d.pop(key, None)


@contextlib.contextmanager
def pushd(path: Path) -> Iterator[None]:
    """Run with ``path`` (created if needed) as the working directory."""
    old = os.getcwd()
    Path(path).mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def use_loaded_model(model: Any) -> Iterator[None]:
    """Make SAEBench's ``HookedTransformer.from_pretrained_no_processing(...)`` return ``model``."""
    from transformer_lens import HookedTransformer

    def _loaded(*_a: Any, **_k: Any) -> Any:
        return model

    with patched_attr(HookedTransformer, "from_pretrained_no_processing", staticmethod(_loaded)):
        yield


def local_loader(local: dict[str, str]) -> Callable[..., Any]:
    """A ``datasets.load_dataset`` that resolves names in ``local`` to local files (parquet/json/csv train/test
    files in a folder, or a ``save_to_disk`` folder) and passes every other name on unchanged."""
    import datasets

    original = datasets.load_dataset

    def load(name: str, *args: Any, **kwargs: Any) -> Any:
        target = local.get(name)
        if target is None:
            return original(name, *args, **kwargs)
        p = Path(target)
        if p.is_dir() and (p / SAVED_DATASET_MARKER).exists():
            ds = datasets.load_from_disk(str(p))
            split = kwargs.get("split")
            return ds[split] if split else ds
        if p.is_dir():
            files: dict[str, list[str]] = {}
            kinds = set()
            for f in sorted(p.iterdir()):
                split = f.name.split(".")[0].split("-")[0]
                if split in SPLITS and f.suffix in DATA_KINDS:
                    files.setdefault(split, []).append(str(f))
                    kinds.add(DATA_KINDS[f.suffix])
            if not files or len(kinds) != 1:
                raise FileNotFoundError(f"local copy of {name!r} at {p} needs train/test files of one kind "
                                        f"(train.parquet, test-00000.parquet, train.jsonl, ...); found {kinds or 'none'}")
            kwargs.pop("streaming", None)
            return original(kinds.pop(), data_files=files, **{k: v for k, v in kwargs.items() if k == "split"})
        return original(str(p), *args, **kwargs)

    return load


@contextlib.contextmanager
def local_datasets(local: dict[str, str]) -> Iterator[None]:
    """Point SAEBench's dataset loading (``load_dataset`` in its dataset modules) at the local copies in
    ``local`` (hub name -> local folder or file)."""
    import sae_bench.evals.scr_and_tpp.dataset_creation as dataset_creation
    import sae_bench.sae_bench_utils.dataset_utils as dataset_utils

    loader = local_loader(dict(local))
    with patched_attr(dataset_utils, "load_dataset", loader), \
            patched_attr(dataset_creation, "load_dataset", loader):
        yield
