"""Writing an activation store (the format and the reader: :mod:`pipeline.data.store`): shards appended in
order by a harvest, re-made in place by a repair, or imported from an existing array.

Several processes can harvest one store (``part=(rank, world)``): rank r makes the shard indices ``i ≡ r
(mod world)`` and lists them in its own ledger ``part-<r>-of-<world>.json`` beside the manifest (each write
atomic, so a killed rank resumes after its last listed shard); once every ledger says done, rank 0 folds them
into the one manifest (:meth:`StoreWriter.merge_parts`), which then lists exactly what a one-process harvest
lists, and removes the ledgers."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

from pipeline.data.store import (
    DTYPES,
    MANIFEST_NAME,
    SHARD_PATTERN,
    SHARD_TENSOR,
    SPLITS,
    STORE_FORMAT,
    STORE_VERSION,
    check_disk_space,
    dtype_name,
    find_bad_shards,
    heldout_mask,
    sha256_bytes,
    shard_problem,
)
from pipeline.utils.atomic import atomic_write_bytes

log = logging.getLogger(__name__)


#: A rank's ledger of the shards it made, when several processes harvest one store.
PART_PATTERN = "part-{rank}-of-{world}.json"

ShardRows = torch.Tensor | dict[str, torch.Tensor]
"""One hook's rows of one split of a shard: the (rows, d) activations, or a dict of the tensors its file holds
(:data:`~pipeline.data.store.SHARD_TENSOR` and, from a harvest, the token ids:
:class:`~pipeline.data.store.ShardTokens`)."""


def shard_rows_count(rows: ShardRows) -> int:
    """Number of activation rows in ``rows``."""
    return len(rows[SHARD_TENSOR] if isinstance(rows, dict) else rows)


# --------------------------------------------------------------------------- writer
class StoreWriter:
    """Writes shards of one or more hooks and keeps the manifest current (resumable).

    ``header`` is written into the manifest as is; its ``identity`` entry decides whether an existing
    partial store in ``path`` may be resumed (equal identity) or must be refused (different identity).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        header: dict[str, Any],
        hooks: dict[str, dict[str, Any]],
        dtype: torch.dtype,
        part: tuple[int, int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.dtype = dtype
        self.part = part if part is not None and part[1] > 1 else None
        header = json.loads(json.dumps(header))  # the form it takes in the manifest (lists, str keys)
        manifest_path = self.path / MANIFEST_NAME
        if manifest_path.is_file():
            old = json.loads(manifest_path.read_text())
            if old.get("identity") != header.get("identity"):
                raise ValueError(
                    f"{self.path} already holds a different activation store (identity differs: "
                    f"{_first_difference(old.get('identity'), header.get('identity'))}); "
                    "use another output folder or delete this one"
                )
            self.manifest = old
            log.info("resuming %s after %d complete shard(s)", self.path, self.done_shards)
        else:
            self.manifest = {
                "format": STORE_FORMAT,
                "version": STORE_VERSION,
                "complete": False,
                **header,
                "dtype": dtype_name(dtype),
                "hooks": {},
            }
            for hook, info in hooks.items():
                self.manifest["hooks"][hook] = {**info, **{s: {"rows": 0, "shards": []} for s in SPLITS}}
        for hook in self.manifest["hooks"]:
            (self.path / hook).mkdir(parents=True, exist_ok=True)
        if self.part is None:  # with other writers at work, their temporary files are not stale
            self._remove_stale()
        self.ledger = self._read_ledger() if self.part is not None else None

    def _remove_stale(self) -> None:
        """Delete temporary files left by killed writes."""
        for hook in self.manifest["hooks"]:
            for stale in (self.path / hook).glob(".*.tmp-*"):
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

    def add_shard(
        self,
        index: int,
        rows: dict[str, dict[str, ShardRows]],
        span: tuple[int, int],
        counts: dict[str, dict[str, int]] | None = None,
    ) -> None:
        """Write shard ``index``: ``rows[hook][split]`` is a (rows, d) tensor; ``span`` the covered
        [start, end) of contexts (or rows, for imported arrays); ``counts[hook]`` extra tallies to add."""
        if index != self.done_shards:
            raise ValueError(f"shard {index} written out of order (next is {self.done_shards})")
        self._list_shard(self._write_files(index, rows, span), counts)
        self._write_manifest()

    def _write_files(
        self, index: int, rows: dict[str, dict[str, ShardRows]], span: tuple[int, int]
    ) -> dict[str, dict[str, dict[str, Any]]]:
        """Write shard ``index``'s files (every hook and split); their manifest entries, ``[hook][split]``."""
        return {
            hook: {split: self._write_file(hook, split, index, per_split[split], span) for split in SPLITS}
            for hook, per_split in rows.items()
        }

    def _list_shard(
        self, files: dict[str, dict[str, dict[str, Any]]], counts: dict[str, dict[str, int]] | None
    ) -> None:
        """Append one shard's file entries (``[hook][split]``) to the manifest and add its tallies."""
        for hook, per_split in files.items():
            entry = self.manifest["hooks"][hook]
            for split in SPLITS:
                entry[split]["shards"].append(per_split[split])
                entry[split]["rows"] += per_split[split]["rows"]
        self._add_counts(counts)

    def _add_counts(self, counts: dict[str, dict[str, int]] | None) -> None:
        """Add ``counts[hook][key]`` to the manifest's per-hook tallies."""
        for hook, tallies in (counts or {}).items():
            entry = self.manifest["hooks"][hook].setdefault("counts", {})
            for key, value in tallies.items():
                entry[key] = entry.get(key, 0) + int(value)

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

    def replace_shard(
        self, index: int, rows: dict[str, dict[str, ShardRows]], counts: dict[str, dict[str, int]] | None = None
    ) -> None:
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
                    log.warning(
                        "re-made shard %s differs from the one the manifest recorded (the forward pass is "
                        "not bit-reproducible here); the manifest now records the new one",
                        old["file"],
                    )
                entry[split]["rows"] += new["rows"] - old["rows"]
                entry[split]["shards"][index] = new
        self._add_counts(counts)
        if self.complete:
            self._mean_norms()
        self._write_manifest()

    # ---- several writers -----------------------------------------------------------------------------
    def _ledger_path(self, rank: int, world: int) -> Path:
        return self.path / PART_PATTERN.format(rank=rank, world=world)

    def _read_ledger(self) -> dict[str, Any]:
        """This rank's ledger (shards it made, by index), keeping only shards whose files still match."""
        rank, world = self.part
        path = self._ledger_path(rank, world)
        fresh = {"identity": self.manifest.get("identity"), "done": False, "shards": {}}
        if not path.is_file():
            return fresh
        ledger = json.loads(path.read_text())
        if ledger.get("identity") != self.manifest.get("identity"):
            log.warning("%s is a ledger of another harvest; starting this rank's part afresh", path)
            return fresh
        for index, entry in list(ledger["shards"].items()):
            files = [e for per in entry["hooks"].values() for e in per.values()]
            if any(shard_problem(self.path, e) for e in files):
                log.warning("shard %s of rank %d's part is missing or damaged; re-making it", index, rank)
                del ledger["shards"][index]
                ledger["done"] = False
        return ledger

    def part_has(self, index: int) -> bool:
        return str(index) in self.ledger["shards"]

    def add_part_shard(
        self,
        index: int,
        rows: dict[str, dict[str, ShardRows]],
        span: tuple[int, int],
        counts: dict[str, dict[str, int]] | None = None,
    ) -> None:
        """Write shard ``index`` of this rank's part and list it in its ledger (not yet in the manifest)."""
        self.ledger["shards"][str(index)] = {"hooks": self._write_files(index, rows, span), "counts": counts or {}}
        self._write_ledger()

    def finish_part(self) -> None:
        """Mark this rank's part done (the last shard it had to make is listed)."""
        self.ledger["done"] = True
        self._write_ledger()

    def _write_ledger(self) -> None:
        atomic_write_bytes(self._ledger_path(*self.part), json.dumps(self.ledger, indent=1).encode())

    def merge_parts(self, world: int, *, context_length: int, wait_s: float, poll_s: float = 2.0) -> Path:
        """Rank 0: wait until every rank's ledger is done, append their shards to the manifest in index order
        (stopping at the first index nobody made: the text ran out there), finish the store with the harvested
        contexts and tokens (as a one-process harvest records them), and remove the ledgers."""
        t = time.monotonic()
        ledgers: list[dict[str, Any]] = []
        while True:
            paths = [self._ledger_path(r, world) for r in range(world)]
            ledgers = [json.loads(p.read_text()) if p.is_file() else {} for p in paths]
            if all(led.get("done") for led in ledgers):
                break
            if time.monotonic() - t > wait_s:
                late = [r for r, led in enumerate(ledgers) if not led.get("done")]
                raise TimeoutError(
                    f"ranks {late} did not finish their part of the harvest of {self.path} within "
                    f"{wait_s:.0f} s; check their logs (relaunching resumes every part)"
                )
            time.sleep(poll_s)
        made = {int(i): e for led in ledgers for i, e in led["shards"].items()}
        index = self.done_shards
        while index in made:
            entry = made.pop(index)
            self._list_shard(entry["hooks"], entry["counts"])
            index += 1
        if made:
            log.warning("shards %s were made past the end of the text and are left out", sorted(made))
        self._write_manifest()
        n_contexts = self.span(self.done_shards - 1)[1] if self.done_shards else 0
        path = self.finish(n_contexts=n_contexts, n_tokens_harvested=n_contexts * context_length)
        for p in self.path.glob(PART_PATTERN.format(rank="*", world="*")):
            p.unlink()
        self._remove_stale()
        return path

    def finish(self, **extra: Any) -> Path:
        """Mark the store complete, adding ``extra`` top-level entries and per-split mean norms."""
        self._mean_norms()
        self.manifest.update(extra)
        self.manifest["complete"] = True
        self._write_manifest()
        return self.path

    def _write_file(self, hook: str, split: str, index: int, rows: ShardRows, span: Any) -> dict[str, Any]:
        """Write one shard file atomically; returns its manifest entry."""
        d = self.manifest["hooks"][hook]["d"]
        tensors = dict(rows) if isinstance(rows, dict) else {SHARD_TENSOR: rows}
        x = tensors[SHARD_TENSOR] = tensors[SHARD_TENSOR].to(self.dtype).contiguous()
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"shard for {hook} has shape {tuple(x.shape)}, expected (rows, {d})")
        data = st_save({k: v.contiguous() for k, v in tensors.items()})
        rel = f"{hook}/{SHARD_PATTERN.format(split=split, index=index)}"
        atomic_write_bytes(self.path / rel, data)
        norm_sum = float(x.float().norm(dim=1).double().sum()) if len(x) else 0.0
        return {
            "file": rel,
            "rows": int(x.shape[0]),
            "sha256": sha256_bytes(data),
            "norm_sum": norm_sum,
            "span": list(span),
        }

    def _mean_norms(self) -> None:
        for entry in self.manifest["hooks"].values():
            for split in SPLITS:
                rows = entry[split]["rows"]
                entry[split]["mean_norm"] = sum(s["norm_sum"] for s in entry[split]["shards"]) / max(rows, 1)

    def _write_manifest(self) -> None:
        atomic_write_bytes(
            self.path / MANIFEST_NAME, (json.dumps(self.manifest, indent=1, sort_keys=True) + "\n").encode()
        )


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.') or 'identity'}: {a!r} != {b!r}"


# --------------------------------------------------------------------------- import
def import_array(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    key: str | None = None,
    shard_rows: int = 65536,
    heldout_fraction: float = 0.0,
    dtype: str | None = None,
    name: str | None = None,
) -> Path:
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
    identity = {
        "source": str(src.resolve()),
        "key": key,
        "rows": n,
        "d": d,
        "size": src.stat().st_size,
        "shard_rows": shard_rows,
        "heldout_fraction": heldout_fraction,
        "dtype": dtype_name(store_dtype),
    }
    header = {
        "identity": identity,
        "model": None,
        "text": {"kind": "imported", "file": str(src)},
        "masking": None,
        "context_length": None,
    }
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
        return _SafetensorsRows(sl), DTYPES.get(
            sl.get_dtype().lower().replace("f32", "float32").replace("bf16", "bfloat16").replace("f16", "float16")
        )
    raise ValueError(f"unsupported array file {src}: use .npy or .safetensors")


class _SafetensorsRows:
    def __init__(self, sl: Any) -> None:
        self.sl, self.shape = sl, tuple(sl.get_shape())

    def __getitem__(self, item: slice) -> torch.Tensor:
        return self.sl[item]


def _read_rows(array: Any, lo: int, hi: int) -> torch.Tensor:
    block = array[lo:hi]
    return block if isinstance(block, torch.Tensor) else torch.from_numpy(np.array(block))
