"""On-disk activation store: 2-D ``(tokens, d)`` shards + a JSON manifest.

Layout of a store directory::

    manifest.json                              MANIFEST_NAME: everything below, plus checksums
    <hook name>/train-00000.safetensors        SHARD_PATTERN; one tensor SHARD_TENSOR of shape (rows, d)
    <hook name>/heldout-00000.safetensors

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

from pipeline.utils.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "{split}-{index:05d}.safetensors"
SHARD_TENSOR = "activations"
STORE_FORMAT = "dbksvd-activation-store"
STORE_VERSION = 1
SPLITS = ("train", "heldout")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ChecksumError(ValueError):
    """A shard's bytes do not match the sha256 recorded in the manifest."""


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
            "or write to a larger disk (another run folder).")


# --------------------------------------------------------------------------- writer
class StoreWriter:
    """Writes shards of one or more hooks and keeps the manifest current (resumable).

    ``header`` is written into the manifest as is; its ``identity`` entry decides whether an existing
    partial store in ``path`` may be resumed (equal identity) or must be refused (different identity).
    """

    def __init__(self, path: str | os.PathLike, *, header: dict[str, Any], hooks: dict[str, dict[str, Any]],
                 dtype: torch.dtype) -> None:
        self.path = Path(path)
        self.dtype = dtype
        header = json.loads(json.dumps(header))  # the form it takes in the manifest (lists, str keys)
        manifest_path = self.path / MANIFEST_NAME
        if manifest_path.is_file():
            old = json.loads(manifest_path.read_text())
            if old.get("identity") != header.get("identity"):
                raise ValueError(
                    f"{self.path} already holds a different activation store (identity differs: "
                    f"{_first_difference(old.get('identity'), header.get('identity'))}); "
                    "use another output folder or delete this one")
            self.manifest = old
            log.info("resuming %s after %d complete shard(s)", self.path, self.done_shards)
        else:
            self.manifest = {"format": STORE_FORMAT, "version": STORE_VERSION, "complete": False, **header,
                             "dtype": dtype_name(dtype), "hooks": {}}
            for hook, info in hooks.items():
                self.manifest["hooks"][hook] = {**info, **{s: {"rows": 0, "shards": []} for s in SPLITS}}
        for hook in self.manifest["hooks"]:
            (self.path / hook).mkdir(parents=True, exist_ok=True)
            for stale in (self.path / hook).glob(".*.tmp-*"):  # left by a killed write
                stale.unlink()
        for stale in self.path.glob(".*.tmp-*"):
            stale.unlink()

    @property
    def done_shards(self) -> int:
        """Number of shard indices complete for every hook (the resume point)."""
        return min(len(h["train"]["shards"]) for h in self.manifest["hooks"].values())

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def add_shard(self, index: int, rows: dict[str, dict[str, torch.Tensor]], span: tuple[int, int],
                  counts: dict[str, dict[str, int]] | None = None) -> None:
        """Write shard ``index``: ``rows[hook][split]`` is a (rows, d) tensor; ``span`` the covered
        [start, end) of contexts (or rows, for imported arrays); ``counts[hook]`` extra tallies to add."""
        if index != self.done_shards:
            raise ValueError(f"shard {index} written out of order (next is {self.done_shards})")
        for hook, per_split in rows.items():
            entry = self.manifest["hooks"][hook]
            for split in SPLITS:
                x = per_split[split].to(self.dtype).contiguous()
                if x.ndim != 2 or x.shape[1] != entry["d"]:
                    raise ValueError(f"shard for {hook} has shape {tuple(x.shape)}, expected (rows, {entry['d']})")
                data = st_save({SHARD_TENSOR: x})
                rel = f"{hook}/{SHARD_PATTERN.format(split=split, index=index)}"
                atomic_write_bytes(self.path / rel, data)
                norm_sum = float(x.float().norm(dim=1).double().sum()) if len(x) else 0.0
                entry[split]["shards"].append({"file": rel, "rows": int(x.shape[0]), "sha256": sha256_bytes(data),
                                               "norm_sum": norm_sum, "span": list(span)})
                entry[split]["rows"] += int(x.shape[0])
            for key, value in (counts or {}).get(hook, {}).items():
                entry.setdefault("counts", {})
                entry["counts"][key] = entry["counts"].get(key, 0) + int(value)
        self._write_manifest()

    def finish(self, **extra: Any) -> Path:
        """Mark the store complete, adding ``extra`` top-level entries and per-split mean norms."""
        for entry in self.manifest["hooks"].values():
            for split in SPLITS:
                rows = entry[split]["rows"]
                entry[split]["mean_norm"] = sum(s["norm_sum"] for s in entry[split]["shards"]) / max(rows, 1)
        self.manifest.update(extra)
        self.manifest["complete"] = True
        self._write_manifest()
        return self.path

    def _write_manifest(self) -> None:
        atomic_write_bytes(self.path / MANIFEST_NAME,
                           (json.dumps(self.manifest, indent=1, sort_keys=True) + "\n").encode())


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _tensor_view(data: bytearray, path: Path) -> torch.Tensor:
    """The :data:`SHARD_TENSOR` of a safetensors file's bytes, as a view (no copy)."""
    try:
        (n,) = struct.unpack_from("<Q", data, 0)
        header = json.loads(bytes(data[8:8 + n]))
        meta = header[SHARD_TENSOR]
        dtype, shape = _ST_DTYPES[meta["dtype"]], meta["shape"]
        start, end = meta["data_offsets"]
    except (struct.error, ValueError, KeyError) as exc:
        raise ChecksumError(f"{path} is not a readable activation shard ({exc})") from None
    if 8 + n + end > len(data):
        raise ChecksumError(f"{path} is truncated")
    if end == start:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, count=(end - start) // (torch.finfo(dtype).bits // 8),
                            offset=8 + n + start).view(shape)


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.') or 'identity'}: {a!r} != {b!r}"


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
            raise FileNotFoundError(f"{self.path} is not an activation store (no {MANIFEST_NAME}); "
                                    "run the harvest stage or import an array with import_array()")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != STORE_FORMAT:
            raise ValueError(f"{manifest_path} is not a {STORE_FORMAT} manifest")
        if not self.manifest.get("complete"):
            raise ValueError(f"the store at {self.path} is incomplete (interrupted harvest); re-run the harvest "
                             "with the same settings to resume it")
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
        return (f"ActivationStore({str(self.path)!r}, hook={self.hook!r}, rows={self.n_rows()}, d={self.d}, "
                f"dtype={dtype_name(self.dtype)})")

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
        path = self.path / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {shard['file']} of {self.path} is missing; re-run the harvest")
        data = bytearray(path.stat().st_size)
        with open(path, "rb") as fh:
            fh.readinto(data)
        if self.verify and shard["file"] not in self._verified:
            if sha256_bytes(data) != shard["sha256"]:
                raise ChecksumError(f"shard {shard['file']} of {self.path} is corrupted (sha256 mismatch); "
                                    "delete it and its manifest entry, or re-run the harvest into a fresh folder")
            self._verified.add(shard["file"])
        x = _tensor_view(data, path)
        if tuple(x.shape) != (shard["rows"], self.d) or x.dtype != self.dtype:
            raise ChecksumError(f"shard {shard['file']} holds {x.dtype} {tuple(x.shape)}, the manifest says "
                                f"{self.dtype} ({shard['rows']}, {self.d})")
        return x

    def verify_all(self) -> None:
        """Check every shard of this hook (both splits) against its sha256; raises :class:`ChecksumError`."""
        for split in SPLITS:
            for shard in self.shards(split):
                hashed = sha256_bytes((self.path / shard["file"]).read_bytes())
                if hashed != shard["sha256"]:
                    raise ChecksumError(f"shard {shard['file']} of {self.path} is corrupted (sha256 mismatch)")

    def load_all(self, split: str = "train", *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> torch.Tensor:
        """All rows of ``split`` in store order: (n_rows, d)."""
        out = torch.empty(self.n_rows(split), self.d, dtype=dtype, device=device)
        pos = 0
        for shard in self.shards(split):
            x = self.read_shard(shard)
            out[pos:pos + len(x)] = x.to(device=device, dtype=dtype)
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


# --------------------------------------------------------------------------- import
def import_array(src: str | os.PathLike, dest: str | os.PathLike, *, key: str | None = None,
                 shard_rows: int = 65536, heldout_fraction: float = 0.0, dtype: str | None = None,
                 name: str | None = None) -> Path:
    """Import an (n, d) ``.npy`` or ``.safetensors`` array (e.g. embeddings) as a one-hook store at ``dest``.

    ``key`` picks the tensor of a multi-tensor safetensors file; ``dtype`` (``float32|bfloat16|float16``)
    defaults to the source's float type; ``name`` labels the hook (default: the file stem).
    """
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"array file {src} does not exist")
    array, src_dtype = _open_array(src, key)
    if len(array.shape) != 2 or array.shape[0] == 0:
        raise ValueError(f"{src} holds shape {tuple(array.shape)}; an (n, d) array with n > 0 is needed")
    n, d = int(array.shape[0]), int(array.shape[1])
    store_dtype = DTYPES[dtype] if dtype else (src_dtype if src_dtype in DTYPES.values() else torch.float32)
    hook = name or src.stem
    dest = Path(dest)
    check_disk_space(dest, n * d * torch.finfo(store_dtype).bits // 8)
    identity = {"source": str(src.resolve()), "key": key, "rows": n, "d": d, "size": src.stat().st_size,
                "shard_rows": shard_rows, "heldout_fraction": heldout_fraction, "dtype": dtype_name(store_dtype)}
    header = {"identity": identity, "model": None, "text": {"kind": "imported", "file": str(src)},
              "masking": None, "context_length": None}
    writer = StoreWriter(dest, header=header, hooks={hook: {"layer": None, "d": d}}, dtype=store_dtype)
    if writer.complete:
        return dest
    for index in range(writer.done_shards, math.ceil(n / shard_rows)):
        lo, hi = index * shard_rows, min(n, (index + 1) * shard_rows)
        block = _read_rows(array, lo, hi)
        held = torch.from_numpy(heldout_mask(np.arange(lo, hi), heldout_fraction))
        writer.add_shard(index, {hook: {"train": block[~held], "heldout": block[held]}}, (lo, hi))
    return writer.finish(n_rows_imported=n)


def _open_array(src: Path, key: str | None) -> tuple[Any, torch.dtype | None]:
    if src.suffix == ".npy":
        arr = np.load(src, mmap_mode="r")
        return arr, torch.from_numpy(np.zeros(0, dtype=arr.dtype)).dtype
    if src.suffix == ".safetensors":
        from safetensors import safe_open

        handle = safe_open(str(src), framework="pt")
        keys = list(handle.keys())
        if key is None:
            if len(keys) != 1:
                raise ValueError(f"{src} holds tensors {keys}; pass key=<one of them>")
            key = keys[0]
        if key not in keys:
            raise ValueError(f"{src} has no tensor {key!r} (it has {keys})")
        sl = handle.get_slice(key)
        return _SafetensorsRows(sl), DTYPES.get(sl.get_dtype().lower().replace("f32", "float32")
                                                .replace("bf16", "bfloat16").replace("f16", "float16"))
    raise ValueError(f"unsupported array file {src}: use .npy or .safetensors")


class _SafetensorsRows:
    def __init__(self, sl: Any) -> None:
        self.sl, self.shape = sl, tuple(sl.get_shape())

    def __getitem__(self, item: slice) -> torch.Tensor:
        return self.sl[item]


def _read_rows(array: Any, lo: int, hi: int) -> torch.Tensor:
    block = array[lo:hi]
    return block if isinstance(block, torch.Tensor) else torch.from_numpy(np.array(block))


def iter_shard_paths(path: str | os.PathLike) -> Iterator[Path]:
    """Every shard file a store's manifest lists (all hooks, both splits)."""
    manifest = json.loads((Path(path) / MANIFEST_NAME).read_text())
    for entry in manifest["hooks"].values():
        for split in SPLITS:
            for shard in entry[split]["shards"]:
                yield Path(path) / shard["file"]
