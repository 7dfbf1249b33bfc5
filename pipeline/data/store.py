"""On-disk activation store: 2-D ``(tokens, d)`` shards + a JSON manifest.

Layout of a store directory::

    manifest.json                              MANIFEST_NAME: everything below, plus checksums
    <hook name>/train-00000.safetensors        SHARD_PATTERN; tensor SHARD_TENSOR of shape (rows, d), and
    <hook name>/heldout-00000.safetensors      for harvested stores the rows' token ids (TOKENS_TENSOR,
                                               CONTEXTS_TENSOR, POSITIONS_TENSOR: :class:`ShardTokens`)

**Token ids travel with the rows.** A harvested shard file also holds the token ids of the contexts whose rows
it stores and, for every row, where it sits among them, so what reads activations back (feature dashboards:
which text makes a latent fire) needs no second forward pass over the corpus. An imported array has none
(:meth:`ActivationStore.read_tokens` returns None).

**Why safetensors and not a raw memmap.** bf16 is a first-class storage dtype here (half the disk and I/O of
fp32, the dtype Gemma runs in) and numpy has no bf16, so a raw ``.npy``/memmap would need a side channel for
the dtype and bit-casting on every read. A safetensors file carries its own dtype and shape (a truncated or
mismatched file is caught before the checksum), its bytes are a pure function of the tensor (so sha256 and
byte-identical resume are well defined), it reads zero-copy, and it is what the ecosystem (SAELens,
sparsify) already uses. Random row access across the whole store, the one thing a memmap does better, is
not needed: the reader shuffles within groups of shards (:mod:`pipeline.data.loader`).

**Shards are aligned to contexts**: shard ``i`` holds the rows of contexts ``[i*C, (i+1)*C)`` for every hook,
train and held-out alike (a context goes wholly to one split). Shards are written whole to a temporary file
and renamed (atomic), then the manifest is rewritten (atomic). A resumed harvest restarts at the first shard
the manifest does not list and, as every shard is a pure function of its contexts, ends byte-identical to an
uninterrupted one. The manifest holds no timestamps for the same reason.

**A damaged store repairs itself.** Re-running the harvest (or
:func:`~pipeline.data.store_writer.import_array`) with the same settings into the same folder first checks
every listed shard against its sha256 (:func:`find_bad_shards`) and re-makes exactly the missing or corrupted
ones (:meth:`~pipeline.data.store_writer.StoreWriter.replace_shard`, atomic like every write);
good shards are not touched. Readers that hit a bad shard raise :class:`ChecksumError` saying so
(:data:`REPAIR_HINT`).

This module is the format (names, checksums) and the reader; :mod:`pipeline.data.store_writer` writes stores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "{split}-{index:05d}.safetensors"
SHARD_TENSOR = "activations"
TOKENS_TENSOR = "token_ids"
"""In a harvested shard file: (contexts, context_length) int32, the token ids of the shard's contexts of its split."""
CONTEXTS_TENSOR = "contexts"
"""In a harvested shard file: (contexts,) int64, the global index of each of those contexts."""
POSITIONS_TENSOR = "positions"
"""In a harvested shard file: (rows,) int64, each row's flat index into ``token_ids`` (context * L + position)."""
STORE_FORMAT = "dbksvd-activation-store"
STORE_VERSION = 1
SPLITS = ("train", "heldout")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


REPAIR_HINT = (
    "to fix it, re-run the harvest with the same settings into the same folder (`python -m pipeline "
    "stage=harvest`, or the same command / harvest() call; for an imported array the same import_array() "
    "call): it verifies every shard and re-makes just the bad ones"
)
"""How to repair a store, appended to every :class:`ChecksumError` and missing-shard error."""
_HASH_BLOCK = 1 << 24


class ChecksumError(ValueError):
    """A shard's bytes do not match the sha256 recorded in the manifest."""


@dataclass(frozen=True)
class BadShard:
    """A shard file the manifest lists that is missing or whose bytes do not match its sha256."""

    hook: str
    split: str
    index: int
    """Position in the split's shard list (= the shard index: shard ``i`` covers the i-th span of contexts)."""
    file: str
    """Path relative to the store."""
    reason: str
    """``"missing"`` or ``"sha256 mismatch"``."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def heldout_mask(index: np.ndarray, fraction: float) -> np.ndarray:
    """Which items (contexts or rows) with global ``index`` go to the held-out split: exactly
    ``floor(n * fraction)`` of the first ``n``, evenly spread."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout_fraction={fraction} must be in [0, 1)")
    index = np.asarray(index, dtype=np.int64)
    return np.floor((index + 1) * fraction) > np.floor(index * fraction)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in blocks (a shard need not fit in memory twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def find_bad_shards(
    path: str | os.PathLike, manifest: dict[str, Any] | None = None, *, hooks: list[str] | None = None
) -> list[BadShard]:
    """Every shard the store at ``path`` lists (all ``hooks`` (default all), both splits, empty shards too) whose
    file is missing or whose sha256 differs from the manifest's; ``[]`` for a sound store. Reads and hashes
    every shard, so it costs one read of the store.

    ``manifest`` defaults to the store's ``manifest.json``. This is the check a re-run harvest makes before
    it reuses or resumes a store; a caller deciding whether a store can be reused as is calls it too.
    """
    path = Path(path)
    if manifest is None:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    bad = []
    for hook, entry in manifest["hooks"].items():
        if hooks is not None and hook not in hooks:
            continue
        for split in SPLITS:
            for index, shard in enumerate(entry[split]["shards"]):
                problem = shard_problem(path, shard)
                if problem:
                    bad.append(BadShard(hook, split, index, shard["file"], problem))
    return bad


def shard_problem(path: str | os.PathLike, shard: dict[str, Any]) -> str | None:
    """What is wrong with the file a manifest entry ``shard`` lists in the store at ``path``: ``"missing"``,
    ``"sha256 mismatch"``, or None when its bytes match."""
    file = Path(path) / shard["file"]
    if not file.is_file():
        return "missing"
    return "sha256 mismatch" if sha256_file(file) != shard["sha256"] else None


def check_disk_space(path: Path, needed_bytes: int, what: str = "the activation store") -> None:
    """Refuse (``OSError``) when the filesystem holding ``path`` has less than ``needed_bytes`` (+5 %) free."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed_bytes * 1.05 > free:
        raise OSError(
            f"not enough disk for {what}: about {needed_bytes / 2**30:.2f} GiB needed at {path}, "
            f"{free / 2**30:.2f} GiB free. Lower harvest.n_tokens, store in bfloat16/float16 (harvest.dtype), "
            "or write to a larger disk (another run folder)."
        )


_ST_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I32": torch.int32,
    "I64": torch.int64,
}


@dataclass(frozen=True)
class ShardTokens:
    """The token ids of one harvested shard file's rows."""

    token_ids: torch.Tensor
    """(contexts, context_length) int32: the shard's contexts of its split, in order."""
    contexts: torch.Tensor
    """(contexts,) int64: their global context index in the harvest."""
    positions: torch.Tensor
    """(rows,) int64: row i is the token ``token_ids.view(-1)[positions[i]]`` (masked positions have no row)."""


def _safetensors_header(data: bytearray, path: Path) -> tuple[int, dict[str, Any]]:
    try:
        (n,) = struct.unpack_from("<Q", data, 0)
        return n, json.loads(bytes(data[8 : 8 + n]))
    except (struct.error, ValueError) as exc:
        raise ChecksumError(f"{path} is not a readable activation shard ({exc}); {REPAIR_HINT}") from None


def _tensor_view(data: bytearray, path: Path, name: str = SHARD_TENSOR) -> torch.Tensor:
    """Tensor ``name`` of a safetensors file's bytes, as a view (no copy)."""
    n, header = _safetensors_header(data, path)
    try:
        meta = header[name]
        dtype, shape = _ST_DTYPES[meta["dtype"]], meta["shape"]
        start, end = meta["data_offsets"]
    except (ValueError, KeyError) as exc:
        raise ChecksumError(f"{path} is not a readable activation shard ({exc}); {REPAIR_HINT}") from None
    if 8 + n + end > len(data):
        raise ChecksumError(f"{path} is truncated; {REPAIR_HINT}")
    if end == start:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + n + start).view(shape)


# --------------------------------------------------------------------------- reader
class ActivationStore:
    """Read one hook of a store: shapes ``(rows, d)``.

    >>> store = ActivationStore("outputs/x/harvest-ab12/store")
    >>> data = store.loader(batch_size=4096, seed=0)     # iterable of (b, d) float32 batches
    >>> Y = store.load_all()                             # (n_train, d) float32
    """

    def __init__(self, path: str | os.PathLike, hook: str | None = None, *, verify: bool = True) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{self.path} is not an activation store (no {MANIFEST_NAME}); "
                "run the harvest stage or import an array with import_array()"
            )
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != STORE_FORMAT:
            raise ValueError(f"{manifest_path} is not a {STORE_FORMAT} manifest")
        if not self.manifest.get("complete"):
            raise ValueError(
                f"the store at {self.path} is incomplete (interrupted harvest); re-run the harvest "
                "with the same settings to resume it"
            )
        hooks = list(self.manifest["hooks"])
        if hook is None:
            if len(hooks) != 1:
                raise ValueError(f"{self.path} holds hooks {hooks}; pass hook=<one of them>")
            hook = hooks[0]
        if hook not in self.manifest["hooks"]:
            raise ValueError(f"hook {hook!r} is not in {self.path} (it has {hooks})")
        self.hook = hook
        self.info: dict[str, Any] = self.manifest["hooks"][hook]
        self.d: int = int(self.info["d"])
        self.dtype: torch.dtype = DTYPES[self.manifest["dtype"]]
        self.verify = verify
        self._verified: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, hook={self.hook!r}, rows={self.n_rows()}, d={self.d}, "
            f"dtype={dtype_name(self.dtype)})"
        )

    def n_rows(self, split: str = "train") -> int:
        return int(self._split(split)["rows"])

    def shards(self, split: str = "train") -> list[dict[str, Any]]:
        return [s for s in self._split(split)["shards"] if s["rows"] > 0]

    def mean_norm(self, split: str = "train") -> float:
        return float(self._split(split)["mean_norm"])

    def read_shard(self, shard: dict[str, Any]) -> torch.Tensor:
        """One shard as a (rows, d) tensor in the store dtype.

        With ``verify``, the sha256 is checked the first time this object reads the shard. The tensor is a
        zero-copy view of the file's bytes (read once into memory).
        """
        return self._activations(self._read_bytes(shard), shard)

    def read_tokens(self, shard: dict[str, Any]) -> ShardTokens | None:
        """The token ids of a shard's rows (:class:`ShardTokens`), or None when the store has none (an imported
        array, or a store harvested before token ids were kept)."""
        return self._tokens(self._read_bytes(shard), shard)

    def read_with_tokens(self, shard: dict[str, Any]) -> tuple[torch.Tensor, ShardTokens | None]:
        """:meth:`read_shard` and :meth:`read_tokens` from one read of the file."""
        data = self._read_bytes(shard)
        return self._activations(data, shard), self._tokens(data, shard)

    def _activations(self, data: bytearray, shard: dict[str, Any]) -> torch.Tensor:
        x = _tensor_view(data, self.path / shard["file"])
        if tuple(x.shape) != (shard["rows"], self.d) or x.dtype != self.dtype:
            raise ChecksumError(
                f"shard {shard['file']} holds {x.dtype} {tuple(x.shape)}, the manifest says "
                f"{self.dtype} ({shard['rows']}, {self.d}); {REPAIR_HINT}"
            )
        return x

    def _tokens(self, data: bytearray, shard: dict[str, Any]) -> ShardTokens | None:
        path = self.path / shard["file"]
        _, header = _safetensors_header(data, path)
        if TOKENS_TENSOR not in header:
            return None
        out = ShardTokens(
            *(_tensor_view(data, path, name) for name in (TOKENS_TENSOR, CONTEXTS_TENSOR, POSITIONS_TENSOR))
        )
        if out.positions.shape != (shard["rows"],) or len(out.contexts) != len(out.token_ids):
            raise ChecksumError(
                f"shard {shard['file']} of {self.path} has token ids that do not match its rows; {REPAIR_HINT}"
            )
        return out

    def has_tokens(self) -> bool:
        """Whether the store's shards keep their rows' token ids (a harvest does; an imported array does not)."""
        return bool(self.manifest.get("token_ids"))

    def _read_bytes(self, shard: dict[str, Any]) -> bytearray:
        """A shard file's bytes, its sha256 checked the first time this object reads it (with ``verify``)."""
        path = self.path / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {shard['file']} of {self.path} is missing; {REPAIR_HINT}")
        data = bytearray(path.stat().st_size)
        with open(path, "rb") as fh:
            fh.readinto(data)
        if self.verify and shard["file"] not in self._verified:
            if sha256_bytes(data) != shard["sha256"]:
                raise ChecksumError(
                    f"shard {shard['file']} of {self.path} is corrupted (sha256 mismatch); {REPAIR_HINT}"
                )
            self._verified.add(shard["file"])
        return data

    def verify_all(self) -> None:
        """Check every shard of this hook (both splits) against its sha256; raises :class:`ChecksumError`
        naming the bad shards (missing or mismatched) and how to repair them."""
        bad = find_bad_shards(self.path, self.manifest, hooks=[self.hook])
        if bad:
            names = ", ".join(f"{b.file} ({b.reason})" for b in bad)
            raise ChecksumError(f"{len(bad)} shard(s) of {self.path} are corrupted: {names}; {REPAIR_HINT}")

    def load_all(
        self, split: str = "train", *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """All rows of ``split`` in store order: (n_rows, d)."""
        out = torch.empty(self.n_rows(split), self.d, dtype=dtype, device=device)
        pos = 0
        for shard in self.shards(split):
            x = self.read_shard(shard)
            out[pos : pos + len(x)] = x.to(device=device, dtype=dtype)
            pos += len(x)
        return out

    def heldout(self, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        """The held-out rows: (n_heldout, d)."""
        return self.load_all("heldout", dtype=dtype, device=device)

    def loader(self, batch_size: int, **kwargs: Any):
        """An :class:`~pipeline.data.loader.ActivationLoader` over this store (see its arguments)."""
        from pipeline.data.loader import ActivationLoader

        return ActivationLoader(self, batch_size, **kwargs)

    def _split(self, split: str) -> dict[str, Any]:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        return self.info[split]


def iter_shard_paths(path: str | os.PathLike) -> Iterator[Path]:
    """Every shard file a store's manifest lists (all hooks, both splits)."""
    manifest = json.loads((Path(path) / MANIFEST_NAME).read_text())
    for entry in manifest["hooks"].values():
        for split in SPLITS:
            for shard in entry[split]["shards"]:
                yield Path(path) / shard["file"]
