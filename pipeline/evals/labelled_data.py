"""Labelled passages for SAEBench's sparse probing, SCR and TPP, built from local text.

Paragraphs of some documents (by default Jane Austen's six novels) with two real attributes: which document
(column1, SAEBench's "profession" slot) and whether the paragraph holds dialogue, i.e. a quotation mark
(column2, SAEBench's "gender" slot). They are written in SAEBench's ``LabHC/bias_in_bios`` layout
(``hard_text``, ``profession``, ``gender``; train and test parquet files) and named ``..._bias_in_bios...``
because SAEBench picks its loader for two-attribute data by that substring. :func:`registered_labelled_dataset`
registers them in SAEBench's dataset tables for the duration of a run; in a metric's ``config:`` block the
placeholder :data:`LABELLED_TOKEN` stands for their name (:func:`swap_labelled`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.evals.saebench_patches import patched_dict_item
from pipeline.utils.atomic import atomic_write, atomic_write_text

LABELLED_TOKEN = "austen_labelled"
"""Placeholder in a metric's ``dataset_names`` / ``column1_vals_lookup`` for the labelled passages."""
LABELLED_NAME = "dbksvd-local/austen_novel_dialogue_bias_in_bios"
"""Base name of the labelled data (SAEBench's two-attribute loader is chosen by 'bias_in_bios')."""
LABELLED_SET = LABELLED_NAME + "_class_set1"
"""Dataset name passed to SAEBench (its loaders strip '_class_set...' to find the data)."""
DIALOGUE, NARRATION = "dialogue", "narration"
"""The two values of column2."""
SPEC_FILE = "spec.json"
"""The spec of a built folder (kept: a folder built with the same settings is reused)."""
SPLIT_FILE = "{split}.parquet"
"""One parquet file per split (train, test)."""


@dataclass
class LabelledSpec:
    """What SAEBench's tables and the metric configs need to know about a built folder of labelled passages."""

    base_name: str
    """Name SAEBench loads the data by (a ``local_datasets`` key)."""
    name: str
    """Dataset name in SAEBench configs (``base_name`` + ``_class_set1``)."""
    path: str
    """Folder of ``train.parquet`` / ``test.parquet``."""
    column1_mapping: dict[str, int]
    """Document title -> class id."""
    column2_mapping: dict[str, int]
    """dialogue -> 1, narration -> 0."""
    classes: list[str]
    """Class ids (as strings) of column1."""
    titles: list[str]
    """Document titles, in class-id order."""
    min_words: int
    """Paragraphs shorter than this were left out."""
    test_every: int
    """Every ``test_every``-th kept paragraph of a document went to the test split."""
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Title -> ``"<split>/<dialogue|narration>"`` -> paragraphs."""

    def summary(self) -> dict[str, Any]:
        """What ``eval_info.json`` records about the data."""
        return {k: getattr(self, k) for k in ("name", "titles", "counts", "min_words", "test_every")}


def labelled_documents(jsonl: str | Path | None) -> list[tuple[str, str]]:
    """(title, text) documents: one per line of ``jsonl`` (``{"title", "text"}``) or, when None, Jane Austen's
    six novels (installed by setup.sh, whatever the harvest text was)."""
    if jsonl is not None:
        lines = Path(jsonl).read_text(encoding="utf-8").splitlines()
        return [(r["title"], r["text"]) for r in map(json.loads, lines)]
    from pipeline.data.text import AUSTEN_BOOKS, austen_jsonl

    rows = [json.loads(x) for x in austen_jsonl().read_text(encoding="utf-8").splitlines() if x.strip()]
    return [(r["title"], r["text"]) for r in rows if r["title"] in AUSTEN_BOOKS]


def build_labelled_text(
    out_dir: Path, documents: list[tuple[str, str]], *, min_words: int, test_every: int
) -> LabelledSpec:
    """Write paragraphs of ``documents`` ((title, text) pairs) as SAEBench-layout train/test parquet files.

    column1 (``profession``) = which document a paragraph comes from; column2 (``gender``) = 1 when the
    paragraph contains dialogue (a double quotation mark), else 0. Paragraphs shorter than ``min_words`` words
    and headings are left out; every ``test_every``-th kept paragraph of a document goes to the test split.
    A folder already built with the same settings is reused.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    spec_path = out_dir / SPEC_FILE
    titles = [t for t, _ in documents]
    spec = LabelledSpec(
        base_name=LABELLED_NAME,
        name=LABELLED_SET,
        path=str(out_dir),
        column1_mapping={t: i for i, t in enumerate(titles)},
        column2_mapping={DIALOGUE: 1, NARRATION: 0},
        classes=[str(i) for i in range(len(titles))],
        titles=titles,
        min_words=min_words,
        test_every=test_every,
    )
    if spec_path.exists():
        old = json.loads(spec_path.read_text())
        if _settings(old) == _settings(dataclasses.asdict(spec)):
            return LabelledSpec(**old)
    rows = {split: {"hard_text": [], "profession": [], "gender": []} for split in ("train", "test")}
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
            key = f"{split}/{DIALOGUE if dialogue else NARRATION}"
            spec.counts.setdefault(title, {}).setdefault(key, 0)
            spec.counts[title][key] += 1
    for split, cols in rows.items():
        atomic_write(out_dir / SPLIT_FILE.format(split=split), functools.partial(pq.write_table, pa.table(cols)))
    atomic_write_text(spec_path, json.dumps(dataclasses.asdict(spec), indent=2))
    return spec


def _settings(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "counts"}


def check_labelled_sizes(
    spec: LabelledSpec, train_size: int, test_size: int, classes: list[str], what: str, scr: bool = False
) -> None:
    """Fail early, naming the config keys, when a class has too few paragraphs for SAEBench's balanced draw
    (``size // 4`` per class and attribute; SCR also asserts more than ``2 (size // 4)`` in its biased
    quadrants). ``classes`` are class ids or titles."""
    for c in classes:
        title = spec.titles[int(c)] if str(c).isdigit() else c
        have = spec.counts[title]
        for split, size in (("train", train_size), ("test", test_size)):
            need = size // 4 * (2 if scr else 1) + (1 if scr else 0)
            for attr in (DIALOGUE, NARRATION):
                if have.get(f"{split}/{attr}", 0) < need:
                    raise ValueError(
                        f"{what}: {title} has {have.get(f'{split}/{attr}', 0)} {attr} paragraphs in its {split} "
                        f"split but SAEBench needs {need} (from {split}_set_size={size}); lower the eval's "
                        f"{split} set size or drop that class"
                    )


def swap_labelled(value: Any, name: str) -> Any:
    """``value`` (a metric's ``config:`` block) with every :data:`LABELLED_TOKEN` (list item or dict key)
    replaced by ``name``."""
    if isinstance(value, list):
        return [name if v == LABELLED_TOKEN else swap_labelled(v, name) for v in value]
    if isinstance(value, dict):
        return {(name if k == LABELLED_TOKEN else k): swap_labelled(v, name) for k, v in value.items()}
    return value


@contextlib.contextmanager
def registered_labelled_dataset(spec: LabelledSpec) -> Iterator[None]:
    """Register the labelled passages in SAEBench's dataset tables (``dataset_info``, SCR's
    ``COLUMN2_VALS_LOOKUP``) for the duration."""
    import sae_bench.evals.scr_and_tpp.main as scr_main
    import sae_bench.sae_bench_utils.dataset_info as dataset_info

    meta = {
        "text_column_name": "hard_text",
        "column1_name": "profession",
        "column2_name": "gender",
        "column2_autointerp_name": "dialogue",
        "column1_mapping": spec.column1_mapping,
        "column2_mapping": spec.column2_mapping,
    }
    with (
        patched_dict_item(dataset_info.dataset_metadata, spec.base_name, meta),
        patched_dict_item(dataset_info.chosen_classes_per_dataset, spec.name, spec.classes),
        patched_dict_item(scr_main.COLUMN2_VALS_LOOKUP, spec.name, (DIALOGUE, NARRATION)),
    ):
        yield
