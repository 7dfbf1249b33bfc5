"""Context managers that point SAEBench 0.6.0 at what this pipeline already has, undone on exit.

Nothing here computes a metric. SAEBench looks these module attributes up at call time, so swapping them for
the duration of a run is enough:

* the model: ``HookedTransformer.from_pretrained_no_processing`` returns the model already loaded
  (:func:`use_loaded_model`);
* datasets: ``load_dataset`` in SAEBench's dataset modules resolves names given in ``eval.local_datasets`` (and
  the labelled passages built here) to local files (:func:`local_datasets`);
* cwd-relative writes go into the run folder (:func:`pushd`);
* RAVEL's HF model: its ``get_module`` finds the blocks of any decoder-only HF model (:func:`any_decoder_layers`),
  and its ``from_pretrained`` calls load a local ``save_pretrained`` folder (:func:`local_hf_model`);
* result files: every metric's ``BaseEvalOutput.to_json_file`` writes through a temporary file and a rename
  (:func:`atomic_result_writes`), so a kill mid-write leaves the old file or none, never a torn one; so does
  every ``torch.save`` to a path meanwhile: the LLM activations and probes SAEBench keeps in its artifacts folder
  and loads whenever the file exists (sparse probing, SCR/TPP, absorption, autointerp's tokens).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def atomic_to_json_file(self: Any, file_path: str, indent: int = 2) -> None:
    """SAEBench's ``BaseEvalOutput.to_json_file`` (the same JSON: ``json.dump(asdict(self), indent=indent,
    default=str)``), written to a temporary file beside ``file_path``, flushed, then renamed over it."""
    import json
    from dataclasses import asdict

    from pipeline.utils.atomic import atomic_write_text

    atomic_write_text(file_path, json.dumps(asdict(self), indent=indent, default=str))


def atomic_torch_save(save: Callable[..., Any]) -> Callable[..., Any]:
    """``save`` (``torch.save``) writing a path target through a temporary file, flushed, then renamed over it (a
    file object as before). torch names the archive inside the file after the file, so the temporary file keeps
    the target's name, in a temporary folder beside it (``.<name>.tmp-<pid>/<name>``, as
    :mod:`pipeline.utils.atomic` names its temporary files): the bytes are those of a direct save."""

    def atomic_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(f, (str, os.PathLike)):
            return save(obj, f, *args, **kwargs)
        target = Path(f)
        folder = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            tmp = folder / target.name
            save(obj, tmp, *args, **kwargs)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return None

    return atomic_save


@contextlib.contextmanager
def atomic_result_writes() -> Iterator[None]:
    """Make every SAEBench metric's result write (``BaseEvalOutput.to_json_file``, which all of SAEBench 0.6.0's
    ``run_eval`` functions and core's ``save_single_eval_result`` call) atomic (:func:`atomic_to_json_file`), and
    every ``torch.save`` to a path (:func:`atomic_torch_save`): SAEBench loads a cached artifact whenever its file
    exists, so one torn by a kill would fail the metric on every re-run."""
    import torch
    from sae_bench.evals.base_eval_output import BaseEvalOutput

    with (
        patched_attr(BaseEvalOutput, "to_json_file", atomic_to_json_file),
        patched_attr(torch, "save", atomic_torch_save(torch.save)),
    ):
        yield


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
                raise FileNotFoundError(
                    f"local copy of {name!r} at {p} needs train/test files of one kind "
                    f"(train.parquet, test-00000.parquet, train.jsonl, ...); found {kinds or 'none'}"
                )
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
    with patched_attr(dataset_utils, "load_dataset", loader), patched_attr(dataset_creation, "load_dataset", loader):
        yield


# ------------------------------------------------------------------------------------------- HF models (RAVEL)
#: Where a decoder-only HF causal LM keeps its blocks: ``model.model.layers`` (Llama, Gemma 2/3, Qwen, Mistral,
#: ...) or ``model.gpt_neox.layers`` (GPT-NeoX / Pythia). SAEBench 0.6.0's ``get_module`` knows only
#: Gemma2ForCausalLM and GPTNeoXForCausalLM.
DECODER_LAYER_PATHS = ("model.layers", "gpt_neox.layers")


def decoder_layers(model: Any) -> Any:
    """The ``ModuleList`` of ``model``'s blocks (:data:`DECODER_LAYER_PATHS`); ``ValueError`` naming the
    architecture when it has none of them."""
    for path in DECODER_LAYER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "__getitem__"):
            return obj
    arch = (getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__])[0]
    raise ValueError(
        f"RAVEL cannot find the decoder blocks of {arch}: supported are HF causal LMs with "
        f"{' or '.join('model.' + p for p in DECODER_LAYER_PATHS)} (Llama, Gemma, Qwen, Mistral, "
        "GPT-NeoX, ...)"
    )


class TupleOutputLayer:
    """One block, as SAEBench's RAVEL hooks expect it: forward hooks see the block's output as a tuple whose
    first item is the residual stream (transformers >= 4.5x Llama-style blocks return a bare tensor; SAEBench
    reads ``outputs[0]`` and rejects non-tuples). A hook's tuple result is unwrapped again for such blocks."""

    def __init__(self, layer: Any):
        self.layer = layer

    def register_forward_hook(self, hook: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import torch

        def as_tuple(module: Any, inputs: Any, outputs: Any) -> Any:
            if not isinstance(outputs, torch.Tensor):
                return hook(module, inputs, outputs)
            result = hook(module, inputs, (outputs,))
            return result[0] if isinstance(result, tuple) else result

        return self.layer.register_forward_hook(as_tuple, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.layer, name)


def hf_layer_module(model: Any, layer_num: int) -> TupleOutputLayer:
    """SAEBench's ``activation_collection.get_module`` for any decoder-only HF model (:func:`decoder_layers`):
    block ``layer_num``, whose output is the residual stream after it (``blocks.<layer_num>.hook_resid_post``)."""
    layers = decoder_layers(model)
    if not 0 <= layer_num < len(layers):
        raise ValueError(f"layer {layer_num} is out of range: the model has {len(layers)} blocks")
    return TupleOutputLayer(layers[layer_num])


@contextlib.contextmanager
def any_decoder_layers() -> Iterator[None]:
    """Make SAEBench's ``get_module`` (RAVEL's hooks) find the blocks of any :func:`decoder_layers` model."""
    import sae_bench.sae_bench_utils.activation_collection as activation_collection

    with patched_attr(activation_collection, "get_module", hf_layer_module):
        yield


class LocalPretrained:
    """Stands in for a transformers ``Auto*`` class: ``from_pretrained(name)`` loads ``local[name]`` (a
    ``save_pretrained`` folder, ``local_files_only``) when ``name`` is listed, anything else as before. With
    ``freeze``, a loaded model's weights get ``requires_grad=False`` (RAVEL trains only its mask; the gradients
    of the LLM's weights would be computed, kept and never used)."""

    def __init__(self, auto: Any, local: dict[str, str], freeze: bool = False):
        self.auto, self.local, self.freeze = auto, dict(local), freeze

    def from_pretrained(self, name: Any, *args: Any, **kwargs: Any) -> Any:
        target = self.local.get(str(name))
        if target is not None:
            name, kwargs = target, {**kwargs, "local_files_only": True}
        obj = self.auto.from_pretrained(name, *args, **kwargs)
        if self.freeze and hasattr(obj, "requires_grad_"):
            obj.requires_grad_(False)
        return obj


@contextlib.contextmanager
def local_hf_model(module: Any, local: dict[str, str], freeze: bool = True) -> Iterator[None]:
    """Make ``module``'s ``AutoModelForCausalLM`` / ``AutoTokenizer`` load the names in ``local`` (name ->
    ``save_pretrained`` folder) from disk (:class:`LocalPretrained`), the model frozen with ``freeze``."""
    with (
        patched_attr(module, "AutoModelForCausalLM", LocalPretrained(module.AutoModelForCausalLM, local, freeze)),
        patched_attr(module, "AutoTokenizer", LocalPretrained(module.AutoTokenizer, local)),
    ):
        yield
