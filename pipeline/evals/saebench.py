"""Glue between the pipeline and SAEBench 0.6.0: run SAEBench's own eval code on an already-loaded model, with
local data, writing SAEBench's result JSONs into a run folder.

Nothing here computes a metric. Each runner calls SAEBench's ``run_eval`` (sparse probing, SCR, TPP,
absorption, autointerp, RAVEL, unlearning) or, for core, SAEBench's ``run_evals`` + ``save_single_eval_result``
(the body of ``core.multiple_evals`` minus its hub dataset and its swallowed exceptions). What is adapted, all
through module attributes SAEBench looks up at call time, and undone afterwards:

* the model: ``HookedTransformer.from_pretrained_no_processing`` returns the model we already loaded;
* datasets: ``load_dataset`` in SAEBench's dataset modules is pointed at local copies (``local_datasets``:
  hub name -> local folder/files) and at the labelled text built here; a local dataset is registered in
  SAEBench's tables (``dataset_info``, SCR's ``COLUMN2_VALS_LOOKUP``) for the duration of the run;
* absorption: the vocabulary is subsampled (every first letter kept in the train split, as SAEBench needs), its
  probe / result folders and its cwd-relative writes go into the run folder.

Labelled data from the shipped text (:func:`build_labelled_text`): paragraphs of Jane Austen's six novels, with
two real attributes: which novel (column1, SAEBench's "profession" slot) and whether the paragraph holds
dialogue, i.e. a quotation mark (column2, SAEBench's "gender" slot). It is written in SAEBench's
``LabHC/bias_in_bios`` layout (``hard_text``, ``profession``, ``gender``; train and test splits) and named
``<prefix>_bias_in_bios...`` because SAEBench picks its loader for two-attribute data by that substring.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

#: Evals this module can run, in the order they run.
METRICS = ("core", "absorption", "sparse_probing", "scr", "tpp", "autointerp", "ravel", "unlearning")
#: SAEBench's result-folder name of each metric.
RESULT_DIRS = {m: m for m in METRICS}
#: Headline metric of each eval (SAEBench's graphing_utils convention): (category, key pattern).
HEADLINE = {
    "core": ("model_performance_preservation", "ce_loss_score"),
    "absorption": ("mean", "mean_absorption_fraction_score"),
    "sparse_probing": ("sae", "sae_top_{k}_test_accuracy"),
    "scr": ("scr_metrics", "scr_metric_threshold_{k}"),
    "tpp": ("tpp_metrics", "tpp_threshold_{k}_total_metric"),
    "autointerp": ("autointerp", "autointerp_score"),
    "unlearning": ("unlearning", "unlearning_score"),
    "ravel": ("ravel", "disentanglement_score"),
}

LABELLED_NAME = "dbksvd-local/austen_novel_dialogue_bias_in_bios"
"""Base name of the labelled Austen data (SAEBench's two-attribute loader is chosen by 'bias_in_bios')."""
LABELLED_SET = LABELLED_NAME + "_class_set1"
"""Dataset name passed to SAEBench (its loaders strip '_class_set...' to find the data)."""
DIALOGUE, NARRATION = "dialogue", "narration"


# ============================================================================================= results
def result_path(out_dir: Path, metric: str, sae_name: str, sae: Any = None) -> Path:
    """Where SAEBench writes the result of ``(sae_name, sae)`` for ``metric``: SAE objects get the id
    'custom_sae'; a sae-lens ``(release, sae_id)`` pair keeps its id."""
    from sae_bench.sae_bench_utils.general_utils import get_results_filepath

    sae_id = sae if isinstance(sae, str) else "custom_sae"
    return Path(get_results_filepath(str(Path(out_dir) / RESULT_DIRS[metric]), sae_name, sae_id))


def read_json_with_infinity(path: Path) -> Any:
    """Read a result file; ``Infinity``/``-Infinity``/``NaN`` literals (pydantic/json write them) become floats."""
    return json.loads(Path(path).read_text())


# ============================================================================================= patches
@contextlib.contextmanager
def patched_attr(obj: Any, name: str, value: Any) -> Iterator[None]:
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
def use_loaded_model(model: Any) -> Iterator[None]:
    """Make SAEBench's ``HookedTransformer.from_pretrained_no_processing(...)`` return ``model``."""
    from transformer_lens import HookedTransformer

    def _loaded(*_a, **_k):
        return model

    with patched_attr(HookedTransformer, "from_pretrained_no_processing", staticmethod(_loaded)):
        yield


@contextlib.contextmanager
def pushd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    Path(path).mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


_DATA_KINDS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def _local_loader(local: dict[str, str]) -> Callable[..., Any]:
    """A ``datasets.load_dataset`` that resolves names in ``local`` to local files (parquet/json/csv or a
    ``save_to_disk`` folder) and passes every other name on unchanged."""
    import datasets

    original = datasets.load_dataset

    def load(name, *args, **kwargs):
        target = local.get(name)
        if target is None:
            return original(name, *args, **kwargs)
        p = Path(target)
        if p.is_dir() and (p / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(p))
            split = kwargs.get("split")
            return ds[split] if split else ds
        if p.is_dir():
            files: dict[str, list[str]] = {}
            kinds = set()
            for f in sorted(p.iterdir()):
                split = f.name.split(".")[0].split("-")[0]
                if split in ("train", "test", "validation") and f.suffix in _DATA_KINDS:
                    files.setdefault(split, []).append(str(f))
                    kinds.add(_DATA_KINDS[f.suffix])
            if not files or len(kinds) != 1:
                raise FileNotFoundError(f"local copy of {name!r} at {p} needs train/test files of one kind "
                                        f"(train.parquet, test-00000.parquet, train.jsonl, ...); found {kinds or 'none'}")
            kwargs.pop("streaming", None)
            return original(kinds.pop(), data_files=files, **{k: v for k, v in kwargs.items() if k == "split"})
        return original(str(p), *args, **kwargs)

    return load


@contextlib.contextmanager
def local_datasets(local: dict[str, str]) -> Iterator[None]:
    """Point SAEBench's dataset loading (``load_dataset`` in its dataset modules) at local copies."""
    import sae_bench.evals.scr_and_tpp.dataset_creation as dataset_creation
    import sae_bench.sae_bench_utils.dataset_utils as dataset_utils

    loader = _local_loader(dict(local))
    with patched_attr(dataset_utils, "load_dataset", loader), \
            patched_attr(dataset_creation, "load_dataset", loader):
        yield


@contextlib.contextmanager
def registered_labelled_dataset(spec: dict[str, Any]) -> Iterator[None]:
    """Register the labelled text (:func:`build_labelled_text`) in SAEBench's dataset tables."""
    import sae_bench.evals.scr_and_tpp.main as scr_main
    import sae_bench.sae_bench_utils.dataset_info as dataset_info

    base, name = spec["base_name"], spec["name"]
    meta = {"text_column_name": "hard_text", "column1_name": "profession", "column2_name": "gender",
            "column2_autointerp_name": "dialogue", "column1_mapping": spec["column1_mapping"],
            "column2_mapping": spec["column2_mapping"]}
    with patched_dict_item(dataset_info.dataset_metadata, base, meta), \
            patched_dict_item(dataset_info.chosen_classes_per_dataset, name, spec["classes"]), \
            patched_dict_item(scr_main.COLUMN2_VALS_LOOKUP, name, (DIALOGUE, NARRATION)):
        yield


@contextlib.contextmanager
def patched_dict_item(d: dict, key: Any, value: Any) -> Iterator[None]:
    had, old = key in d, d.get(key)
    d[key] = value
    try:
        yield
    finally:
        if had:
            d[key] = old
        else:
            d.pop(key, None)


# ============================================================================================= labelled text
def build_labelled_text(out_dir: Path, documents: list[tuple[str, str]], *, min_words: int = 12,
                        test_every: int = 5) -> dict[str, Any]:
    """Write paragraphs of ``documents`` ((title, text) pairs) as SAEBench-layout train/test parquet files.

    column1 (``profession``) = which document (novel) a paragraph comes from; column2 (``gender``) = 1 when the
    paragraph contains dialogue (a double quotation mark), else 0. Paragraphs shorter than ``min_words`` words
    and headings are left out; every ``test_every``-th kept paragraph of a document goes to the test split.
    Returns the spec :func:`registered_labelled_dataset` and the configs need.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    spec_path = out_dir / "spec.json"
    titles = [t for t, _ in documents]
    spec = {"base_name": LABELLED_NAME, "name": LABELLED_SET, "path": str(out_dir),
            "column1_mapping": {t: i for i, t in enumerate(titles)},
            "column2_mapping": {DIALOGUE: 1, NARRATION: 0},
            "classes": [str(i) for i in range(len(titles))], "titles": titles,
            "min_words": min_words, "test_every": test_every}
    if spec_path.exists():
        old = json.loads(spec_path.read_text())
        if {k: v for k, v in old.items() if k != "counts"} == spec:
            return old
    rows = {"train": {"hard_text": [], "profession": [], "gender": []},
            "test": {"hard_text": [], "profession": [], "gender": []}}
    counts: dict[str, dict[str, int]] = {}
    for i, (title, text) in enumerate(documents):
        kept = 0
        for para in text.split("\n\n"):
            para = para.strip()
            if len(para.split()) < min_words or para.isupper() or para.upper().startswith("CHAPTER"):
                continue
            split = "test" if kept % test_every == test_every - 1 else "train"
            kept += 1
            dialogue = int('"' in para or "\u201c" in para)
            rows[split]["hard_text"].append(para)
            rows[split]["profession"].append(i)
            rows[split]["gender"].append(dialogue)
            key = f"{title}/{split}/{DIALOGUE if dialogue else NARRATION}"
            counts.setdefault(title, {}).setdefault(key.split("/", 1)[1], 0)
            counts[title][key.split("/", 1)[1]] += 1
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, cols in rows.items():
        pq.write_table(pa.table(cols), out_dir / f"{split}.parquet")
    spec["counts"] = counts
    spec_path.write_text(json.dumps(spec, indent=2))
    return spec


def check_labelled_sizes(spec: dict[str, Any], train_size: int, test_size: int, classes: list[str],
                         what: str, scr: bool = False) -> None:
    """Fail early, naming the config keys, when a class has too few paragraphs for SAEBench's balanced draw
    (``size // 4`` per class and attribute; SCR also asserts more than ``2 (size // 4)`` in its biased quadrants)."""
    titles = spec["titles"]
    for c in classes:
        title = titles[int(c)] if str(c).isdigit() else c
        have = spec["counts"][title]
        for split, size in (("train", train_size), ("test", test_size)):
            need = size // 4 * (2 if scr else 1) + (1 if scr else 0)
            for attr in (DIALOGUE, NARRATION):
                if have.get(f"{split}/{attr}", 0) < need:
                    raise ValueError(
                        f"{what}: {title} has {have.get(f'{split}/{attr}', 0)} {attr} paragraphs in its {split} "
                        f"split but SAEBench needs {need} (from {split}_set_size={size}); lower the eval's "
                        f"{split} set size or drop that class")


# ============================================================================================= core
def text_after(documents: Iterator[str], tokenizer: Any, context_length: int, bos: int | None, skip: int,
               n: int) -> list[list[int]]:
    """``n`` token contexts of the text that follow the first ``skip`` ones (text the harvest never saw)."""
    from pipeline.data.text import iter_contexts

    out = []
    for i, ctx in enumerate(iter_contexts(documents, tokenizer, context_length, bos)):
        if i < skip:
            continue
        out.append(ctx)
        if len(out) >= n:
            break
    if len(out) < n:
        raise ValueError(f"the text holds only {len(out)} contexts of {context_length} tokens after the {skip} "
                         f"harvested ones, core needs {n}; lower eval.core.n_eval_reconstruction_batches / "
                         "n_eval_sparsity_variance_batches / batch_size_prompts, or point eval.core.dataset at "
                         "more text")
    return out


def run_core(saes: list[tuple[str, Any]], model: Any, out_dir: Path, *, dataset: Any, context_size: int,
             batch_size_prompts: int, n_eval_reconstruction_batches: int, n_eval_sparsity_variance_batches: int,
             llm_dtype: str, device: str, force_rerun: bool = False,
             exclude_special_tokens_from_reconstruction: bool = False, dataset_label: str = "") -> list[Path]:
    """SAEBench core metrics for each SAE (SAEBench's ``run_evals`` on ``dataset``, a ``datasets.Dataset`` with
    a ``tokens`` column or a dataset name/path sae-lens can load), one JSON per SAE."""
    import sae_bench.evals.core.main as core
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.sae_bench_utils import general_utils
    from sae_lens.training.activations_store import ActivationsStore

    out = Path(out_dir) / RESULT_DIRS["core"]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    cfg_all = core.get_multiple_evals_everything_config(batch_size_prompts, n_eval_reconstruction_batches,
                                                        n_eval_sparsity_variance_batches)
    tok = model.tokenizer
    for name, sae_obj in saes:
        path = result_path(out_dir, "core", name, sae_obj)
        if path.exists() and not force_rerun:
            written.append(path)
            continue
        sae_id, sae, _ = general_utils.load_and_format_sae(name, sae_obj, device)
        sae = sae.to(device=device, dtype=general_utils.str_to_dtype(llm_dtype))
        eval_cfg = CoreEvalConfig(
            model_name=sae.cfg.model_name, batch_size_prompts=batch_size_prompts,
            n_eval_reconstruction_batches=n_eval_reconstruction_batches,
            n_eval_sparsity_variance_batches=n_eval_sparsity_variance_batches,
            exclude_special_tokens_from_reconstruction=exclude_special_tokens_from_reconstruction,
            dataset=dataset_label or str(dataset if isinstance(dataset, str) else "local tokens"),
            context_size=context_size, compute_kl=cfg_all.compute_kl, compute_ce_loss=cfg_all.compute_ce_loss,
            compute_l2_norms=cfg_all.compute_l2_norms, compute_sparsity_metrics=cfg_all.compute_sparsity_metrics,
            compute_variance_metrics=cfg_all.compute_variance_metrics,
            compute_featurewise_density_statistics=True, compute_featurewise_weight_based_metrics=True,
            llm_dtype=llm_dtype)
        store = ActivationsStore.from_sae(model, sae, dataset=dataset, context_size=context_size,
                                          streaming=False, dataset_trust_remote_code=False, device=device)
        store.shuffle_input_dataset(seed=42)
        metrics, feature_metrics = core.run_evals(
            sae=sae, activation_store=store, model=model, eval_config=eval_cfg,
            ignore_tokens={tok.pad_token_id, tok.eos_token_id, tok.bos_token_id})
        metrics["misc_metrics"] = core.calculate_misc_metrics(feature_metrics)
        result = core.replace_nans_with_negative_one({
            "unique_id": f"{name}_{sae_id}", "sae_set": name, "sae_id": sae_id, "eval_cfg": eval_cfg,
            "metrics": metrics, "feature_metrics": feature_metrics})
        core.save_single_eval_result(result, core.get_eval_uuid(), core.get_sae_lens_version(),
                                     core.get_sae_bench_version(), str(path), sae)
        written.append(path)
    return written


# ============================================================================================= probing evals
def run_sparse_probing(saes, model, out_dir: Path, artifacts: Path, config: Any, device: str,
                       force_rerun: bool = False) -> list[Path]:
    import sae_bench.evals.sparse_probing.main as sp

    with use_loaded_model(model):
        sp.run_eval(config, saes, device, str(Path(out_dir) / "sparse_probing"), force_rerun=force_rerun,
                    save_activations=True, artifacts_path=str(artifacts))
    return [result_path(out_dir, "sparse_probing", n, o) for n, o in saes]


def run_scr_or_tpp(saes, model, out_dir: Path, artifacts: Path, config: Any, device: str,
                   force_rerun: bool = False) -> list[Path]:
    import sae_bench.evals.scr_and_tpp.main as st

    metric = "scr" if config.perform_scr else "tpp"
    with use_loaded_model(model):
        # SAEBench's SCR/TPP run_eval appends the eval type to output_path itself
        st.run_eval(config, saes, device, str(Path(out_dir)), force_rerun=force_rerun,
                    save_activations=True, artifacts_path=str(artifacts))
    return [result_path(out_dir, metric, n, o) for n, o in saes]


# ============================================================================================= absorption
def subsample_alpha_vocab(vocab: list[str], size: int | None, min_per_letter: int, seed: int = 0) -> list[str]:
    """A reproducible subsample of SAEBench's alphabetic vocabulary that keeps at least ``min_per_letter`` words
    of every first letter present (SAEBench crashes when a letter is missing from its train split). The sample
    is drawn from the sorted words, so it does not depend on the order SAEBench listed them in (which follows
    string hashing and changes between processes)."""
    if size is None or size >= len(vocab):
        return list(vocab)
    vocab = sorted(vocab)
    rng = random.Random(seed)
    by_letter: dict[str, list[str]] = {}
    for w in vocab:
        by_letter.setdefault(w.strip()[0].lower(), []).append(w)
    chosen: list[str] = []
    for letter in sorted(by_letter):
        words = by_letter[letter]
        chosen.extend(rng.sample(words, min(len(words), min_per_letter)))
    rest = [w for w in vocab if w not in set(chosen)]
    extra = max(0, size - len(chosen))
    chosen.extend(rng.sample(rest, min(extra, len(rest))))
    chosen_set = set(chosen)
    return [w for w in vocab if w in chosen_set]


@contextlib.contextmanager
def absorption_setup(run_dir: Path, vocab_size: int | None, min_per_letter: int, seed: int) -> Iterator[dict]:
    """Subsample the vocabulary and send every absorption write (probes, experiment parquet files, its
    cwd-relative ``artifacts/absorption``) into ``run_dir``."""
    import sae_bench.evals.absorption.common as ab_common
    import sae_bench.evals.absorption.feature_absorption as ab_fa
    import sae_bench.evals.absorption.main as ab_main
    import sae_bench.evals.absorption.vocab as ab_vocab

    run_dir = Path(run_dir).resolve()
    info: dict[str, Any] = {}
    original = ab_vocab.get_alpha_tokens

    def get_alpha_tokens(tokenizer, *a, **k):
        full = original(tokenizer, *a, **k)
        # sorted: with `random` seeded below, SAEBench's train/test split is then the same in every process
        sub = sorted(subsample_alpha_vocab(full, vocab_size, min_per_letter, seed))
        info.update(full_vocab=len(full), subsampled_vocab=len(sub),
                    letters=len({w.strip()[0].lower() for w in sub}))
        return sub

    k_sparse, fa = ab_main.run_k_sparse_probing_experiment, ab_main.run_feature_absortion_experiment
    dirs = {"experiment_dir": run_dir / "k_sparse_probing", "probes_dir": run_dir / "probes"}

    def k_sparse_here(*a, **k):
        return k_sparse(*a, **{**k, **dirs})

    def fa_here(*a, **k):
        return fa(*a, **{**k, "experiment_dir": run_dir / "feature_absorption",
                         "sparse_probing_experiment_dir": dirs["experiment_dir"], "probes_dir": dirs["probes_dir"]})

    # SAEBench splits the vocabulary into train/test with Python's global `random` (probing.py), unseeded: seed
    # it, so the split (and whether every first letter reaches the train split) is the same in every process
    random_state = random.getstate()
    random.seed(seed)
    try:
        with patched_attr(ab_common, "get_alpha_tokens", get_alpha_tokens), \
                patched_attr(ab_fa, "get_alpha_tokens", get_alpha_tokens), \
                patched_attr(ab_main, "run_k_sparse_probing_experiment", k_sparse_here), \
                patched_attr(ab_main, "run_feature_absortion_experiment", fa_here), \
                pushd(run_dir):
            yield info
    finally:
        random.setstate(random_state)


def run_absorption(saes, model, out_dir: Path, artifacts: Path, config: Any, device: str, *,
                   vocab_size: int | None, min_words_per_letter: int, seed: int = 0,
                   force_rerun: bool = False) -> tuple[list[Path], dict[str, Any]]:
    import sae_bench.evals.absorption.main as ab_main

    out = (Path(out_dir) / "absorption").resolve()
    out.mkdir(parents=True, exist_ok=True)
    with absorption_setup(Path(artifacts), vocab_size, min_words_per_letter, seed) as info, \
            use_loaded_model(model):
        ab_main.run_eval(config, saes, device, str(out), force_rerun=force_rerun)
    return [result_path(out_dir, "absorption", n, o) for n, o in saes], info


# ============================================================================================= autointerp etc.
def run_autointerp(saes, model, out_dir: Path, artifacts: Path, config: Any, device: str, api_key: str,
                   tokens: torch.Tensor | None = None, force_rerun: bool = False) -> list[Path]:
    """SAEBench autointerp with ``api_key`` for its judge. ``tokens`` ((N, ctx) LongTensor) replaces its hub
    text when given."""
    import sae_bench.evals.autointerp.main as ai
    import sae_bench.sae_bench_utils.dataset_utils as dataset_utils

    ctx = contextlib.nullcontext()
    if tokens is not None:
        def load_and_tokenize_dataset(*_a, **_k):
            return tokens
        ctx = patched_attr(dataset_utils, "load_and_tokenize_dataset", load_and_tokenize_dataset)
    with ctx, use_loaded_model(model):
        ai.run_eval(config, saes, device, api_key, str(Path(out_dir) / "autointerp"), force_rerun=force_rerun,
                    save_logs_path=str(Path(out_dir) / "autointerp" / "logs.txt"), artifacts_path=str(artifacts))
    return [result_path(out_dir, "autointerp", n, o) for n, o in saes]


def run_ravel(saes, out_dir: Path, artifacts: Path, config: Any, device: str, force_rerun: bool = False):
    import sae_bench.evals.ravel.main as ravel

    ravel.run_eval(config, saes, device, str(Path(out_dir) / "ravel"), force_rerun=force_rerun,
                   artifacts_path=str(artifacts))
    return [result_path(out_dir, "ravel", n, o) for n, o in saes]


def run_unlearning(saes, model, out_dir: Path, artifacts: Path, config: Any, device: str,
                   force_rerun: bool = False):
    import sae_bench.evals.unlearning.main as un

    with use_loaded_model(model):
        un.run_eval(config, saes, device, str(Path(out_dir) / "unlearning"), force_rerun=force_rerun,
                    artifacts_path=str(artifacts))
    return [result_path(out_dir, "unlearning", n, o) for n, o in saes]


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def tokens_per_second(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else math.inf
