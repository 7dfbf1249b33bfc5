"""A persistent, size-capped store of SAE-independent eval artifacts, shared by every run on one model and hook.

An entry is a folder of files (what one metric computed without the SAE: LLM activations, trained probes) filed
under the sha256 of its key (a JSON-safe mapping of everything that determines those files). Layout::

    <root>/<metric>/<key hash>/key.json        the key's fields, compared field by field on every read
    <root>/<metric>/<key hash>/manifest.json   relative path -> bytes and sha256 of every file (written last)
    <root>/<metric>/<key hash>/files/...       the files, as the metric's code laid them out

Writes are atomic: an entry is built in ``<root>/.tmp-*`` and renamed into place, so a reader sees a whole
entry or none. A read re-hashes every file; an entry whose key, manifest or checksums do not match is removed
and counts as a miss. Entries never change once published; the least recently used go first when the total
exceeds the cap (:meth:`ArtifactCache.evict`), under a lock file so that concurrent runs do not race.

    cache = ArtifactCache(root, max_bytes=20 * 2**30)
    entry = cache.lookup("sparse_probing", key)          # verified folder of files, or None
    cache.publish("sparse_probing", key, src_dir, files)  # after a cold run: copy in, verify, rename
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.utils.atomic import atomic_write_text

KEY_FILE = "key.json"
"""The key's fields, beside each entry."""
MANIFEST_FILE = "manifest.json"
"""Relative path -> ``{"bytes", "sha256"}`` of each file of an entry; its presence marks the entry complete."""
FILES_DIR = "files"
"""The entry's files, under their paths relative to the metric's artifacts folder."""
LOCK_NAME = ".lock"
"""Lock file of the cache root (held while publishing and evicting)."""
TMP_PREFIX = ".tmp-"
"""Prefix of an entry being built (or being removed); left behind only by a killed process."""
FORMAT_VERSION = 1
"""Layout version of an entry (part of every key)."""

_CHUNK = 1 << 20


def key_hash(key: dict[str, Any]) -> str:
    """sha256 (hex, 64 characters) of ``key`` as canonical JSON (sorted keys, no whitespace)."""
    blob = json.dumps({"format": FORMAT_VERSION, **key}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def canonical(key: dict[str, Any]) -> Any:
    """``key`` as it reads back from ``key.json`` (tuples become lists, non-JSON values strings)."""
    return json.loads(json.dumps({"format": FORMAT_VERSION, **key}, sort_keys=True, default=str))


def file_sha256(path: Path) -> str:
    """sha256 (hex) of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Entry:
    """A verified entry: its folder of files and their total size."""

    files_dir: Path
    """``<entry>/files``: the files under their relative paths."""
    files: list[str]
    """Relative paths of the files (POSIX separators)."""
    n_bytes: int
    """Total bytes of the files."""


class ArtifactCache:
    """Entries under ``root`` (created on first write), at most ``max_bytes`` in total."""

    def __init__(self, root: str | os.PathLike, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    def entry_dir(self, metric: str, key: dict[str, Any]) -> Path:
        """The folder an entry of ``metric`` with ``key`` has (whether or not it exists)."""
        return self.root / metric / key_hash(key)

    # ---- reading ----------------------------------------------------------------------------------------
    def lookup(self, metric: str, key: dict[str, Any]) -> tuple[Entry | None, str | None]:
        """The verified entry of ``key`` and None, or None and why there is none (``"absent"``, or what failed to
        verify: the entry is then removed). A hit marks the entry as recently used."""
        folder = self.entry_dir(metric, key)
        if not (folder / MANIFEST_FILE).is_file():
            return None, "absent"
        reason = self._verify(folder, key)
        if reason is not None:
            self._remove(folder)
            return None, reason
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        with contextlib.suppress(OSError):
            os.utime(folder / KEY_FILE)  # least-recently-used order for eviction
        return Entry(folder / FILES_DIR, sorted(manifest), sum(f["bytes"] for f in manifest.values())), None

    def _verify(self, folder: Path, key: dict[str, Any]) -> str | None:
        """None when ``folder``'s key equals ``key`` and every file matches the manifest, else what does not."""
        try:
            stored = json.loads((folder / KEY_FILE).read_text())
            manifest = json.loads((folder / MANIFEST_FILE).read_text())
        except (OSError, ValueError) as exc:
            return f"unreadable key or manifest ({exc.__class__.__name__})"
        if stored != canonical(key):
            return "key fields differ from the requested key (hash collision or a hand-edited entry)"
        for rel, meta in manifest.items():
            path = folder / FILES_DIR / rel
            try:
                if path.stat().st_size != meta["bytes"] or file_sha256(path) != meta["sha256"]:
                    return f"{rel}: size or sha256 differs from the manifest"
            except OSError:
                return f"{rel}: missing"
        return None

    # ---- writing ----------------------------------------------------------------------------------------
    def publish(self, metric: str, key: dict[str, Any], src: Path, files: list[str]) -> int:
        """Copy ``files`` (relative to ``src``) into a new entry of ``key``; returns the bytes written, 0 when
        the entry already exists (another run published it first) or would exceed the cap on its own. The
        entry is built in a temporary folder, verified, and renamed into place; then :meth:`evict` runs."""
        final = self.entry_dir(metric, key)
        if (final / MANIFEST_FILE).is_file() or not files:
            return 0
        sizes = {rel: (src / rel).stat().st_size for rel in files}
        if sum(sizes.values()) > self.max_bytes:
            return 0
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            manifest = {}
            for rel in sorted(files):
                dst = tmp / FILES_DIR / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, dst)
                with open(dst, "rb+") as fh:
                    os.fsync(fh.fileno())
                manifest[rel] = {"bytes": dst.stat().st_size, "sha256": file_sha256(dst)}
            atomic_write_text(tmp / KEY_FILE, json.dumps(canonical(key), indent=1, sort_keys=True))
            atomic_write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))
            with self._locked():
                if (final / MANIFEST_FILE).is_file():
                    return 0
                if final.exists():  # a torn entry (no manifest): replace it
                    self._remove(final)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, final)
                self._evict_locked(keep=final)
            return sum(m["bytes"] for m in manifest.values())
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # ---- size cap ---------------------------------------------------------------------------------------
    def entries(self) -> list[tuple[Path, int, float]]:
        """Every complete entry: (folder, bytes, last use as a timestamp)."""
        out = []
        if not self.root.is_dir():
            return out
        for manifest in self.root.glob(f"*/*/{MANIFEST_FILE}"):
            folder = manifest.parent
            try:
                n = sum(m["bytes"] for m in json.loads(manifest.read_text()).values())
                used = (folder / KEY_FILE).stat().st_mtime
            except (OSError, ValueError):
                n, used = 0, 0.0
            out.append((folder, n, used))
        return out

    def total_bytes(self) -> int:
        """Bytes of all complete entries."""
        return sum(n for _, n, _ in self.entries())

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used entries (never ``keep``) until the total is within the cap; returns the
        removed folders."""
        with self._locked():
            return self._evict_locked(keep)

    def _evict_locked(self, keep: Path | None) -> list[Path]:
        entries = sorted(self.entries(), key=lambda e: e[2])
        total = sum(n for _, n, _ in entries)
        removed = []
        for folder, n, _ in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and folder == keep:
                continue
            self._remove(folder)
            removed.append(folder)
            total -= n
        return removed

    def _remove(self, folder: Path) -> None:
        """Take ``folder`` out of view with one rename, then delete it (a reader holding links keeps its files)."""
        trash = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            os.rename(folder, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_NAME, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy across filesystems); an existing ``dst`` is replaced."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
