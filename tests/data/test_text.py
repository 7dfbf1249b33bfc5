"""Text sources and context packing."""

from __future__ import annotations

import json

import pytest

from pipeline.data import text
from pipeline.data.text import TextSource, iter_contexts, iter_documents, reflow


@pytest.mark.parametrize("key", ["txt_glob", "jsonl", "parquet"])
def test_local_files_yield_documents_in_order(text_files, key):
    docs = list(iter_documents(TextSource(kind="files", paths=[str(text_files[key])])))
    assert docs == text_files["docs"]


def test_contexts_are_fixed_length_with_bos_and_separators(tiny_tokenizer, text_files):
    docs = text_files["docs"][:5]
    bos = tiny_tokenizer.bos_token_id
    ctxs = list(iter_contexts(docs, tiny_tokenizer, 16, bos))
    assert ctxs and all(len(c) == 16 and c[0] == bos for c in ctxs)
    stream = []
    for i, d in enumerate(docs):
        stream += ([bos] if i else []) + tiny_tokenizer(d, add_special_tokens=False)["input_ids"]
    body = [t for c in ctxs for t in c[1:]]
    assert len(ctxs) == len(stream) // 15 and body == stream[: 15 * len(ctxs)]  # only the short tail dropped


def test_contexts_without_bos(tiny_tokenizer, text_files):
    docs = text_files["docs"][:3]
    ctxs = list(iter_contexts(docs, tiny_tokenizer, 16, None))
    stream = [t for d in docs for t in tiny_tokenizer(d, add_special_tokens=False)["input_ids"]]  # no separator
    assert all(len(c) == 16 for c in ctxs) and len(ctxs) == len(stream) // 16
    assert [t for c in ctxs for t in c] == stream[: 16 * len(ctxs)]


def test_special_token_text_is_not_parsed_as_special(tiny_tokenizer):
    ctxs = list(iter_contexts(["<bos> " * 40], tiny_tokenizer, 8, None))
    assert tiny_tokenizer.bos_token_id not in {t for c in ctxs for t in c}


def test_empty_text_yields_no_context(tiny_tokenizer, text_files):
    src = TextSource(kind="files", paths=[str(text_files["empty"])])
    assert list(iter_contexts(iter_documents(src), tiny_tokenizer, 16, 0)) == []


def test_bad_sources_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.paths"):
        list(iter_documents(TextSource(kind="files", paths=[str(tmp_path / "none*.txt")])))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="unsupported"):
        list(iter_documents(TextSource(kind="files", paths=[str(tmp_path / "a.csv")])))
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(ValueError, match="text_field"):
        list(iter_documents(TextSource(kind="files", paths=[str(tmp_path / "b.jsonl")])))
    with pytest.raises(ValueError, match="kind"):
        TextSource(kind="web")
    with pytest.raises(ValueError, match="data.paths"):
        TextSource(kind="files")


def test_unreachable_hub_dataset_is_clear(monkeypatch):
    monkeypatch.setattr(text, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConnectionError, match="data=local_files"):
        next(iter_documents(TextSource(kind="hub")))


def test_reflow_joins_wrapped_lines():
    assert (
        reflow(["It is a truth", "universally acknowledged.", "", "", "Next.", None])
        == "It is a truth universally acknowledged.\n\nNext."
    )


def test_missing_austen_names_setup(monkeypatch, tmp_path):
    monkeypatch.setenv("DBKSVD_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="bash setup.sh"):
        text.austen_jsonl()


def test_austen_from_debian_package():
    """The real corpus (installed by setup.sh): six novels, reflowed."""
    docs = list(iter_documents(TextSource(kind="austen")))
    assert len(docs) == 6 and sum(map(len, docs)) > 3_900_000
    assert "It is a truth universally acknowledged" in docs[1]


def test_hub_streaming_reads_the_text_field(monkeypatch):
    """``datasets.load_dataset`` is replaced by a stand-in here (the hub is unreachable in tests)."""
    import datasets

    calls = {}

    def fake_load_dataset(path, name=None, split=None, revision=None, streaming=False):
        calls.update(path=path, name=name, split=split, revision=revision, streaming=streaming)
        return iter([{"text": "first doc", "meta": {}}, {"text": ""}, {"text": "second doc"}])

    monkeypatch.setattr(text, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = list(iter_documents(TextSource(kind="hub", revision="abc123")))
    assert docs == ["first doc", "second doc"]
    assert calls == {
        "path": "monology/pile-uncopyrighted",
        "name": None,
        "split": "train",
        "revision": "abc123",
        "streaming": True,
    }
