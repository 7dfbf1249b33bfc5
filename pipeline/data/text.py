"""Text sources and fixed-length token contexts for harvesting.

Sources (:class:`TextSource`):

* ``hub``: a Hugging Face dataset streamed with ``datasets`` (default ``monology/pile-uncopyrighted``, the
  corpus of the DB-KSVD paper and SAEBench);
* ``files``: local ``.txt`` (one document per file), ``.jsonl`` (one document per line, field ``text_field``)
  or ``.parquet`` (column ``text_field``) files, given as paths or glob patterns;
* ``austen``: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` package, which ``setup.sh``
  downloads (``apt-get download``); extracted once into ``<cache root>/text/austen/`` (:data:`AUSTEN_JSONL`).

:func:`iter_contexts` packs documents into contexts of exactly ``context_length`` tokens: BOS first (when the
model expects one), then document tokens, documents separated by the BOS token (the document-start marker
these models were trained with). The tail shorter than a context is dropped, so there is never padding.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.cache import SETUP_HINT, cache_root
from pipeline.data.debian_rdata import deb_members, load_r_lazydata
from pipeline.data.hub import hub_reachable
from pipeline.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_HUB_DATASET = "monology/pile-uncopyrighted"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_SUBDIR = "text/austen"
AUSTEN_DEB_GLOB = "r-cran-janeaustenr_*.deb"
AUSTEN_JSONL = "austen.jsonl"
"""One JSON object per novel: ``{"title": ..., "text": ...}``, paragraphs separated by blank lines."""
AUSTEN_RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


@dataclass
class TextSource:
    """Where harvest text comes from."""

    kind: str = "austen"
    """``austen`` | ``hub`` | ``files``."""
    dataset: str = DEFAULT_HUB_DATASET
    """``hub``: dataset repo id."""
    config_name: str | None = None
    """``hub``: dataset configuration (``name=`` of ``load_dataset``)."""
    split: str = "train"
    revision: str | None = None
    """``hub``: git revision; ``None`` = the default branch (the resolved commit is recorded when reachable)."""
    paths: list[str] = field(default_factory=list)
    """``files``: file paths or glob patterns (txt, jsonl, parquet)."""
    text_field: str = "text"
    """Field / column holding the text (jsonl, parquet, hub)."""

    def __post_init__(self) -> None:
        if self.kind not in ("austen", "hub", "files"):
            raise ValueError(f"data.kind={self.kind!r} is not one of austen, hub, files")
        if self.kind == "files" and not self.paths:
            raise ValueError("data.kind=files needs data.paths=[file or glob, ...]")


def iter_documents(source: TextSource) -> Iterator[str]:
    """Yield documents (strings) from ``source`` in a fixed, reproducible order."""
    if source.kind == "austen":
        yield from _iter_jsonl(austen_jsonl(), "text")
    elif source.kind == "files":
        for path in resolve_files(source.paths):
            yield from _iter_file(path, source.text_field)
    else:
        yield from _iter_hub(source)


def describe_source(source: TextSource) -> dict[str, Any]:
    """JSON-able identity of a text source (with content hashes / resolved revision), for manifests."""
    out: dict[str, Any] = {"kind": source.kind}
    if source.kind == "austen":
        path = austen_jsonl()
        debs = sorted(path.parent.glob(AUSTEN_DEB_GLOB))
        out.update(package=AUSTEN_PACKAGE, deb=debs[-1].name if debs else None, sha256=_sha256(path))
    elif source.kind == "files":
        out.update(
            files=[{"path": str(p), "sha256": _sha256(p)} for p in resolve_files(source.paths)],
            text_field=source.text_field,
        )
    else:
        out.update(
            dataset=source.dataset,
            config_name=source.config_name,
            split=source.split,
            text_field=source.text_field,
            revision=source.revision,
            resolved_revision=None,
        )
        if hub_reachable():
            try:
                from huggingface_hub import HfApi

                out["resolved_revision"] = HfApi().dataset_info(source.dataset, revision=source.revision).sha
            except Exception as exc:  # noqa: BLE001 - recording the commit is best effort
                log.warning("could not resolve the revision of %s: %s", source.dataset, exc)
    return out


# --------------------------------------------------------------------------- contexts
def iter_contexts(
    documents: Iterable[str], tokenizer: Any, context_length: int, bos_token_id: int | None
) -> Iterator[list[int]]:
    """Pack documents into token contexts of exactly ``context_length`` ids.

    Each context is ``[bos] + body`` when ``bos_token_id`` is given (``body`` has ``context_length - 1``
    ids), else ``body`` of ``context_length`` ids. Documents are joined with ``bos_token_id`` between them
    (nothing when ``None``). Special-token strings inside the text are not parsed as special tokens.
    """
    if context_length < 2:
        raise ValueError(f"context_length={context_length} must be at least 2")
    body = context_length - (bos_token_id is not None)
    buf: list[int] = []
    start = 0
    first = True
    for doc in documents:
        if not doc:
            continue
        ids = tokenizer(doc, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
        if not first and bos_token_id is not None:
            buf.append(bos_token_id)
        first = False
        buf.extend(ids)
        while len(buf) - start >= body:
            chunk = buf[start : start + body]
            start += body
            yield [bos_token_id, *chunk] if bos_token_id is not None else chunk
        if start > 1 << 16:  # drop consumed ids now and then
            del buf[:start]
            start = 0


# --------------------------------------------------------------------------- local files
def resolve_files(patterns: Iterable[str]) -> list[Path]:
    """Expand paths / globs (sorted per pattern); a pattern matching nothing is a FileNotFoundError."""
    out: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(str(pat)), recursive=True))
        if not hits:
            raise FileNotFoundError(f"text file or pattern {pat!r} matches no file; fix data.paths")
        out.extend(Path(h) for h in hits if Path(h).is_file())
    return out


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    name = path.name.lower()
    if name.endswith((".txt", ".txt.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            yield fh.read()
    elif name.endswith((".jsonl", ".jsonl.gz")):
        yield from _iter_jsonl(path, text_field)
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(
                f"{path} has no column {text_field!r} (columns: {pf.schema_arrow.names}); set data.text_field"
            )
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if t)
    else:
        raise ValueError(f"unsupported text file {path}: use .txt, .jsonl or .parquet")


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if text_field not in row:
                raise ValueError(f"{path}:{n} has no field {text_field!r}; set data.text_field")
            yield row[text_field]


# --------------------------------------------------------------------------- hub
def _iter_hub(source: TextSource) -> Iterator[str]:
    import datasets

    if not hub_reachable():
        raise ConnectionError(
            f"cannot stream {source.dataset!r}: the Hugging Face hub is unreachable (or HF_HUB_OFFLINE=1). "
            "Use local text instead: data=local_files data.paths=[/path/*.jsonl] (txt, jsonl, parquet), "
            "or data=austen for the offline corpus."
        )
    ds = datasets.load_dataset(
        source.dataset, name=source.config_name, split=source.split, revision=source.revision, streaming=True
    )
    for row in ds:
        text = row.get(source.text_field)
        if text:
            yield text


# --------------------------------------------------------------------------- Austen (Debian package)
def austen_dir() -> Path:
    return cache_root() / AUSTEN_SUBDIR


def austen_jsonl() -> Path:
    """Path of the extracted Austen corpus, extracting it from the downloaded .deb on first use."""
    out = austen_dir() / AUSTEN_JSONL
    if out.is_file():
        return out
    debs = sorted(austen_dir().glob(AUSTEN_DEB_GLOB))
    if not debs:
        raise FileNotFoundError(
            f"the Austen text is not installed: no {AUSTEN_DEB_GLOB} in {austen_dir()}; {SETUP_HINT} "
            f"(it runs `apt-get download {AUSTEN_PACKAGE}` there)"
        )
    books = read_austen_deb(debs[-1])
    atomic_write_text(
        out,
        "".join(
            json.dumps({"title": title, "text": books[title]}, ensure_ascii=False) + "\n" for title in AUSTEN_BOOKS
        ),
    )
    log.info("extracted %d Austen novels into %s", len(AUSTEN_BOOKS), out)
    return out


def read_austen_deb(deb: Path) -> dict[str, str]:
    """Read the six novels (reflowed: one paragraph a line-block, blank line between) from the .deb."""
    files = deb_members(deb, (AUSTEN_RDATA + ".rdx", AUSTEN_RDATA + ".rdb"))
    objects = load_r_lazydata(files[AUSTEN_RDATA + ".rdx"], files[AUSTEN_RDATA + ".rdb"])
    missing = [b for b in AUSTEN_BOOKS if b not in objects]
    if missing:
        raise ValueError(f"{deb} lacks the novels {missing}; is it {AUSTEN_PACKAGE}?")
    return {b: reflow(objects[b]) for b in AUSTEN_BOOKS}


def reflow(lines: list[str | None]) -> str:
    """Join hard-wrapped lines within a paragraph with spaces; paragraphs separated by a blank line."""
    paras, cur = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
