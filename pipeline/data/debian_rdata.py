"""Read data shipped in Debian packages of R libraries, with the standard library only.

:func:`deb_members` extracts files from a ``.deb`` (an ``ar`` archive holding ``data.tar.*``);
:func:`load_r_lazydata` reads an R lazy-load database (``Rdata.rdx`` gzip'd index + ``Rdata.rdb`` zlib
entries, each an XDR-serialized R object) into Python values (strings, lists, dicts). Used for the Austen
corpus of ``r-cran-janeaustenr`` (the format: ``docs/offline-models-and-text.md``).
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any


def deb_members(deb: Path, wanted: tuple[str, ...]) -> dict[str, bytes]:
    """Extract ``wanted`` files from a Debian package (an ``ar`` archive holding ``data.tar.*``)."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        name = raw[pos : pos + 16].decode().strip().rstrip("/")
        size = int(raw[pos + 48 : pos + 58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                out = {}
                for m in tar.getmembers():
                    key = m.name.lstrip("./")
                    if key in wanted:
                        out[key] = tar.extractfile(m).read()
                if set(out) != set(wanted):
                    raise ValueError(f"{deb} lacks {sorted(set(wanted) - set(out))}")
                return out
    raise ValueError(f"{deb} has no data.tar member")


def load_r_lazydata(rdx: bytes, rdb: bytes) -> dict[str, Any]:
    """Read an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` zlib entries) into Python values."""
    index = _r_unserialize(gzip.decompress(rdx))
    out = {}
    for name, (offset, length) in index["variables"].items():
        offset, length = int(offset), int(length)
        out[name] = _r_unserialize(zlib.decompress(rdb[offset + 4 : offset + length]))
    return out


def _r_unserialize(b: bytes) -> Any:
    """Minimal reader of R's XDR serialization (strings, vectors, lists, pairlists, attributes)."""
    if b[:2] != b"X\n":
        raise ValueError("not an R XDR stream")
    pos = 2
    refs: list[Any] = []

    def i32() -> int:
        nonlocal pos
        v = struct.unpack_from(">i", b, pos)[0]
        pos += 4
        return v

    version = i32()
    i32(), i32()
    if version == 3:
        n_enc = i32()  # native encoding name
        pos += n_enc

    def item() -> Any:
        nonlocal pos
        flags = i32()
        kind = flags & 0xFF
        if kind == 254:  # NILVALUE
            return None
        if kind == 9:  # CHARSXP
            n = i32()
            if n == -1:
                return None
            s = b[pos : pos + n].decode("utf-8", "replace")
            pos += n
            return s
        if kind == 1:  # SYMSXP
            s = item()
            refs.append(s)
            return s
        if kind == 255:  # REFSXP
            return refs[(flags >> 8) - 1] if flags >> 8 else refs[i32() - 1]
        if kind == 2:  # LISTSXP (pairlist)
            _attr = item() if flags & 512 else None
            tag = item() if flags & 1024 else None
            car, cdr = item(), item()
            return [(tag, car)] + (cdr or [])
        if kind in (16, 19):  # STRSXP, VECSXP
            v: Any = [item() for _ in range(i32())]
        elif kind in (13, 10):  # INTSXP, LGLSXP
            n = i32()
            v = list(struct.unpack_from(f">{n}i", b, pos))
            pos += 4 * n
        elif kind == 14:  # REALSXP
            n = i32()
            v = list(struct.unpack_from(f">{n}d", b, pos))
            pos += 8 * n
        else:
            raise ValueError(f"unsupported R SEXP type {kind}")
        if flags & 512:
            names = dict(item()).get("names")
            if names and kind == 19:
                return dict(zip(names, v))
        return v

    return item()
