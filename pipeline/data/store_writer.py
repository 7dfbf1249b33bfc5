"""Writing an activation store (the format and the reader: :mod:`pipeline.data.store`): shards appended in
order by a harvest, re-made in place by a repair, or imported from an existing array."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

from pipeline.data.store import (DTYPES, MANIFEST_NAME, SHARD_PATTERN, SHARD_TENSOR, SPLITS,
                                 STORE_FORMAT, STORE_VERSION, check_disk_space, dtype_name,
                                 find_bad_shards, heldout_mask, sha256_bytes)
from pipeline.utils.atomic import atomic_write_bytes

log = logging.getLogger(__name__)


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
                new = self._write_file(hook, split, index, per_split[split], span)
                entry[split]["shards"].append(new)
                entry[split]["rows"] += new["rows"]
            for key, value in (counts or {}).get(hook, {}).items():
                entry.setdefault("counts", {})
                entry["counts"][key] = entry["counts"].get(key, 0) + int(value)
        self._write_manifest()

    def bad_shards(self) -> dict[int, dict[str, list[str]]]:
        """The missing or corrupted shards (:func:`find_bad_shards`) as ``{index: {hook: [split, ...]}}``."""
        out: dict[int, dict[str, list[str]]] = {}
        for bad in find_bad_shards(self.path, self.manifest):
            log.warning("shard %s of %s is %s; re-making it", bad.file, self.path, bad.reason)
            out.setdefault(bad.index, {}).setdefault(bad.hook, []).append(bad.split)
        return dict(sorted(out.items()))

    def span(self, index: int) -> tuple[int, int]:
        """The [start, end) of contexts (or rows) that listed shard ``index`` covers."""
        lo, hi = next(iter(self.manifest["hooks"].values()))["train"]["shards"][index]["span"]
        return int(lo), int(hi)

    def replace_shard(self, index: int, rows: dict[str, dict[str, torch.Tensor]],
                      counts: dict[str, dict[str, int]] | None = None) -> None:
        """Re-write the files of already-listed shard ``index`` given in ``rows[hook][split]`` (only those:
        other files are left untouched), update their manifest entries (sha256, rows, norm sum), add ``counts``
        and rewrite the manifest (every write atomic). Used to repair shards :meth:`bad_shards` reported.
        """
        for hook, per_split in rows.items():
            entry = self.manifest["hooks"][hook]
            for split, x in per_split.items():
                old = entry[split]["shards"][index]
                new = self._write_file(hook, split, index, x, old["span"])
                if new["sha256"] != old["sha256"]:
                    log.warning("re-made shard %s differs from the one the manifest recorded (the forward pass is "
                                "not bit-reproducible here); the manifest now records the new one", old["file"])
                entry[split]["rows"] += new["rows"] - old["rows"]
                entry[split]["shards"][index] = new
            for key, value in (counts or {}).get(hook, {}).items():
                entry.setdefault("counts", {})
                entry["counts"][key] = entry["counts"].get(key, 0) + int(value)
        if self.complete:
            self._mean_norms()
        self._write_manifest()

    def finish(self, **extra: Any) -> Path:
        """Mark the store complete, adding ``extra`` top-level entries and per-split mean norms."""
        self._mean_norms()
        self.manifest.update(extra)
        self.manifest["complete"] = True
        self._write_manifest()
        return self.path

    def _write_file(self, hook: str, split: str, index: int, x: torch.Tensor, span: Any) -> dict[str, Any]:
        """Write one shard file atomically; returns its manifest entry."""
        d = self.manifest["hooks"][hook]["d"]
        x = x.to(self.dtype).contiguous()
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"shard for {hook} has shape {tuple(x.shape)}, expected (rows, {d})")
        data = st_save({SHARD_TENSOR: x})
        rel = f"{hook}/{SHARD_PATTERN.format(split=split, index=index)}"
        atomic_write_bytes(self.path / rel, data)
        norm_sum = float(x.float().norm(dim=1).double().sum()) if len(x) else 0.0
        return {"file": rel, "rows": int(x.shape[0]), "sha256": sha256_bytes(data), "norm_sum": norm_sum,
                "span": list(span)}

    def _mean_norms(self) -> None:
        for entry in self.manifest["hooks"].values():
            for split in SPLITS:
                rows = entry[split]["rows"]
                entry[split]["mean_norm"] = sum(s["norm_sum"] for s in entry[split]["shards"]) / max(rows, 1)

    def _write_manifest(self) -> None:
        atomic_write_bytes(self.path / MANIFEST_NAME,
                           (json.dumps(self.manifest, indent=1, sort_keys=True) + "\n").encode())


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.') or 'identity'}: {a!r} != {b!r}"


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

    def split_rows(lo: int, hi: int) -> dict[str, torch.Tensor]:
        block = _read_rows(array, lo, hi)
        held = torch.from_numpy(heldout_mask(np.arange(lo, hi), heldout_fraction))
        return {"train": block[~held], "heldout": block[held]}

    for index, bad in writer.bad_shards().items():  # repair what an earlier run wrote
        parts = split_rows(*writer.span(index))
        writer.replace_shard(index, {hook: {split: parts[split] for split in bad[hook]}})
    if writer.complete:
        return dest
    for index in range(writer.done_shards, math.ceil(n / shard_rows)):
        lo, hi = index * shard_rows, min(n, (index + 1) * shard_rows)
        writer.add_shard(index, {hook: split_rows(lo, hi)}, (lo, hi))
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
