"""A learned :class:`~pipeline.core.dictionary.Dictionary` as an SAEBench SAE, and its sae-lens export.

:class:`DictionarySAE` is a ``sae_bench.custom_saes.base_sae.BaseSAE``:

* ``W_dec`` = the atoms (unit-norm rows), ``W_enc = W_decᵀ`` (SAEBench reads it for weight diagnostics only;
  no eval computes activations from it), ``b_dec`` = the dictionary's centre (zero when fitted uncentred),
  ``b_enc`` = 0;
* ``encode`` runs the project's batched sparse coder (:func:`pipeline.core.coders.encode`, or the Matryoshka
  cascade) with the dictionary's own coder settings, in fp32 whatever the module dtype, on ``(B, d)`` or
  ``(B, L, d)`` input, and returns dense non-negative ``(…, d_sae)`` codes; ``decode`` is linear;
* the atoms and the Gram matrix ``D Dᵀ`` are fp32 buffers: ``.to(device=…)`` moves them, ``.to(dtype=…)``
  leaves them fp32;
* the last few encoded batches are remembered (exact comparison), so SAEBench's repeated encodes of the same
  activations are not recomputed;
* a *signed* dictionary (``coder.nonnegative = False``) is exposed exactly as a non-negative SAE of width
  ``2K``: ``W_dec = [D; −D]`` and the signed code ``x`` becomes ``[relu(x), relu(−x)]``, so
  ``decode(encode(y))`` is the signed reconstruction and L0 is unchanged.

sae-lens export (:func:`save_sae_lens`) writes the sae-lens 6.x folder format: ``cfg.json`` (6.x layout with
``metadata.sae_lens_version``, ``k`` always written) and ``sae_weights.safetensors`` (``W_enc``, ``b_enc``,
``W_dec``, ``b_dec``). **A plain sae-lens load is an approximation:** by default the folder declares
``architecture = "topk"`` so any sae-lens 6.x can open it, and sae-lens then encodes with the top-k of the
correlations ``relu((x − b_dec) W_enc)`` rather than with matching pursuit. The real coder's settings are kept
in ``metadata.dbksvd_coder``; :func:`load_sae_lens` (or ``SAE.load_from_disk(path, converter=
dbksvd_disk_loader)``) loads the folder as the registered ``"dbksvd"`` sae-lens architecture, whose ``encode``
runs the project's coder exactly. Importing this module registers that architecture with sae-lens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from pipeline.utils.atomic import atomic_write, atomic_write_text
from pipeline.core.codes import Codes
from pipeline.core.dictionary import CoderSettings, Dictionary
from pipeline.core.dictionary import apply_coder as run_coder  # the coder Dictionary.encode runs
from pipeline.core.matryoshka import groups_from_list, groups_to_list
from pipeline.core.coders import gram

from sae_bench.custom_saes.base_sae import BaseSAE  # noqa: E402  (third-party, after ours for clarity)

#: SAEBench / sae-lens architecture name of a dictionary (SAEBench's plots key markers on it).
ARCHITECTURE = "dbksvd"
#: Metadata key of the exported coder settings.
CODER_KEY = "dbksvd_coder"
ENCODER_NOTE = ("DB-KSVD dictionary. Its real encoder is sparse coding (matching pursuit / OMP, settings in "
                "metadata.dbksvd_coder). Loaded as architecture 'topk' by plain sae-lens, encode is only the "
                "top-k of the correlations relu((x - b_dec) @ W_enc) with W_enc = W_dec^T, an approximation; "
                "load with pipeline.evals.dictionary_sae.load_sae_lens (registered architecture 'dbksvd') for the "
                "exact coder.")


# ---------------------------------------------------------------------------------------------- coder
def split_signed(dense: Tensor) -> Tensor:
    """``(…, K)`` signed codes -> ``(…, 2K)`` non-negative ``[relu(x), relu(−x)]``."""
    return torch.cat([dense.clamp(min=0), (-dense).clamp(min=0)], dim=-1)


class _EncodeCache:
    """Codes of recently encoded inputs, keyed by a BLAKE2b digest of the input's bytes (shape and dtype
    included), least recently used dropped first once the stored codes exceed ``max_bytes``.

    SAEBench re-encodes the same activation batches many times (SCR/TPP encode every test batch once per
    ablated class and ablation size); the codes are small (``n × k`` indices and values), so keeping them is
    cheap while re-running the coder is not.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, Codes] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(x: Tensor) -> bytes:
        h = hashlib.blake2b(digest_size=20)
        h.update(repr((tuple(x.shape), str(x.dtype))).encode())
        h.update(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.digest()

    @staticmethod
    def _size(codes: Codes) -> int:
        return codes.indices.numel() * codes.indices.element_size() + codes.values.numel() * codes.values.element_size()

    def get(self, key: bytes) -> Codes | None:
        hit = self.entries.get(key)
        if hit is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return hit

    def put(self, key: bytes, codes: Codes) -> None:
        size = self._size(codes)
        if size > self.max_bytes:
            return
        if key in self.entries:
            self.bytes -= self._size(self.entries.pop(key))
        self.entries[key] = codes
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= self._size(old)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


# ---------------------------------------------------------------------------------------------- SAEBench SAE
class DictionarySAE(BaseSAE):
    """SAEBench ``BaseSAE`` over a :class:`Dictionary`; see the module docstring for the contract."""

    atoms: Tensor
    gram_matrix: Tensor
    centre32: Tensor

    def __init__(self, dictionary: Dictionary, model_name: str, hook_layer: int, hook_name: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, cache_bytes: int = 256 << 20,
                 coder_overrides: dict[str, Any] | None = None):
        D = dictionary.atoms.detach().float().cpu()
        K, d = D.shape
        self.coder = CoderSettings(**(asdict(dictionary.coder) | dict(coder_overrides or {})))
        self.groups = dictionary.groups
        self.signed = not self.coder.nonnegative
        self.n_atoms = K
        W = torch.cat([D, -D]) if self.signed else D
        super().__init__(d, W.shape[0], model_name, hook_layer, torch.device(device), dtype, hook_name)
        centre = torch.zeros(d) if dictionary.centre is None else dictionary.centre.detach().float().cpu()
        with torch.no_grad():
            self.W_dec.copy_(W.to(self.W_dec.dtype))
            self.W_enc.copy_(W.T.to(self.W_enc.dtype))
            self.b_dec.copy_(centre.to(self.b_dec.dtype))
        self.register_buffer("atoms", D.to(device))
        self.register_buffer("gram_matrix", gram(D).to(device))
        self.register_buffer("centre32", centre.to(device))
        self.has_centre = dictionary.centre is not None
        self.cfg.architecture = ARCHITECTURE
        self.cfg.activation_fn_str = f"{self.coder.method}-k{self.coder.k}"
        self.cfg.activation_fn_kwargs = {"k": self.coder.k}
        self.cfg.apply_b_dec_to_input = True
        self.k = self.coder.k
        self.fit_history = list(dictionary.history)
        self.dictionary_metadata = dict(dictionary.metadata)
        self._cache = _EncodeCache(cache_bytes)

    # fp32 buffers follow device moves only (SAEBench casts the SAE to the LLM dtype)
    _FP32_BUFFERS = ("atoms", "gram_matrix", "centre32")

    def _apply(self, fn, recurse: bool = True):
        keep = {name: self._buffers.pop(name) for name in self._FP32_BUFFERS if name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in keep.items():
                moved = fn(buf)
                self._buffers[name] = buf.to(moved.device)
        if hasattr(self, "_cache"):
            self._cache.clear()
        return self

    @property
    def width(self) -> int:
        """``d_sae``: K for a non-negative dictionary, 2K for a signed one."""
        return self.cfg.d_sae

    @torch.no_grad()
    def encode_sparse(self, x: Tensor) -> Codes:
        """Sparse codes ``(n, k)`` over the K atoms (signed for a signed dictionary) of ``x: (n, d)``."""
        key = self._cache.key(x) if self._cache.max_bytes > 0 else None
        if key is not None:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
        Y = x.to(self.atoms.device, torch.float32) - self.centre32
        if self.has_centre:
            codes = run_coder(Y, self.atoms, self.gram_matrix, self.coder, self.groups)
        else:
            # all-zero rows (SAEBench zeroes padding) code to zero exactly; skip them
            nz = (Y != 0).any(dim=1)
            if bool(nz.all()):
                codes = run_coder(Y, self.atoms, self.gram_matrix, self.coder, self.groups)
            else:
                part = run_coder(Y[nz], self.atoms, self.gram_matrix, self.coder, self.groups)
                width = part.k if part.n else self.coder.k if self.groups is None else sum(g.budget for g in self.groups)
                idx = torch.zeros(Y.shape[0], width, dtype=torch.long, device=Y.device)
                val = torch.zeros(Y.shape[0], width, dtype=torch.float32, device=Y.device)
                if part.n:
                    idx[nz], val[nz] = part.indices, part.values.float()
                codes = Codes(idx, val)
        if key is not None:
            self._cache.put(key, codes)
        return codes

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Dense non-negative ``(…, d_sae)`` codes of ``x: (…, d)``, in ``x``'s dtype."""
        shape = x.shape
        codes = self.encode_sparse(x.reshape(-1, shape[-1]))
        dense = codes.to_dense(self.n_atoms)
        if self.signed:
            dense = split_signed(dense)
        return dense.reshape(*shape[:-1], self.cfg.d_sae).to(x.dtype)

    def decode(self, feature_acts: Tensor) -> Tensor:
        return feature_acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def load(cls, path: str | os.PathLike, model_name: str, hook_layer: int, hook_name: str | None = None,
             device: str = "cpu", **kwargs) -> "DictionarySAE":
        """Build from a folder written by :meth:`Dictionary.save`."""
        return cls(Dictionary.load(path, device="cpu"), model_name, hook_layer, hook_name, device=device,
                   **kwargs)

    def coder_metadata(self) -> dict[str, Any]:
        """The coder settings as exported (the ``metadata.dbksvd_coder`` block)."""
        return {**asdict(self.coder), "signed": self.signed, "n_atoms": self.n_atoms,
                "groups": groups_to_list(self.groups)}


# ---------------------------------------------------------------------------------------------- sae-lens
def save_sae_lens(sae: DictionarySAE, path: str | os.PathLike, *, architecture: str = "topk",
                  extra_metadata: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` as a sae-lens 6.x folder: ``cfg.json`` + ``sae_weights.safetensors``.

    ``architecture="topk"`` (default) loads in any sae-lens 6.x, with an *approximate* encoder (top-k of the
    correlations, see the module docstring); ``"dbksvd"`` needs this module imported (registered class) and
    encodes exactly. Either way :func:`load_sae_lens` gives the exact coder.
    """
    import sae_lens

    if architecture not in ("topk", ARCHITECTURE):
        raise ValueError(f"architecture must be 'topk' or {ARCHITECTURE!r}, got {architecture!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = sae.cfg
    metadata = {
        "sae_lens_version": sae_lens.__version__,
        "sae_lens_training_version": None,
        "model_name": c.model_name,
        "hook_name": c.hook_name,
        "hook_head_index": c.hook_head_index,
        "prepend_bos": c.prepend_bos,
        "context_size": c.context_size,
        "dataset_path": c.dataset_path,
        "model_from_pretrained_kwargs": c.model_from_pretrained_kwargs or {},
        "seqpos_slice": list(c.seqpos_slice) if c.seqpos_slice is not None else None,
        "neuronpedia_id": None,
        CODER_KEY: sae.coder_metadata(),
        "encoder_note": ENCODER_NOTE,
        **(extra_metadata or {}),
    }
    cfg = {
        "architecture": architecture,
        "d_in": int(c.d_in),
        "d_sae": int(c.d_sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "k": int(sae.coder.k),
        "rescale_acts_by_decoder_norm": False,
        "metadata": metadata,
    }
    tensors = {name: getattr(sae, name).detach().float().cpu().contiguous()
               for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    atomic_write(path / "sae_weights.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write_text(path / "cfg.json", json.dumps(cfg, indent=2))
    return path


def dbksvd_disk_loader(path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None):
    """sae-lens disk converter: a folder exported by :func:`save_sae_lens` as the exact ``"dbksvd"`` class."""
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

    cfg_dict, state = sae_lens_disk_loader(path, device, cfg_overrides)
    if CODER_KEY in (cfg_dict.get("metadata") or {}):
        cfg_dict["architecture"] = ARCHITECTURE
    return cfg_dict, state


def load_sae_lens(path: str | os.PathLike, device: str = "cpu"):
    """Load an exported folder with sae-lens, encoding with the real coder (registered ``"dbksvd"`` class)."""
    from sae_lens import SAE

    return SAE.load_from_disk(str(path), device=device, converter=dbksvd_disk_loader)


def _register_sae_lens() -> None:
    """Register the ``"dbksvd"`` architecture with sae-lens (idempotent)."""
    from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
    from sae_lens.saes.topk_sae import TopKSAE as LensTopKSAE
    from sae_lens.saes.topk_sae import TopKSAEConfig

    if ARCHITECTURE in SAE_CLASS_REGISTRY:
        return

    @dataclass
    class DBKSVDSAEConfig(TopKSAEConfig):
        """sae-lens config of an exported dictionary; the coder settings live in ``metadata.dbksvd_coder``."""

        @classmethod
        def architecture(cls) -> str:
            return ARCHITECTURE

    class DBKSVDSAE(LensTopKSAE):
        """sae-lens SAE whose ``encode`` is the project's sparse coder over ``W_dec`` (exact)."""

        def _coder(self):
            meta = dict(self.cfg.metadata[CODER_KEY])
            signed, n_atoms, groups = meta.pop("signed"), meta.pop("n_atoms"), meta.pop("groups")
            return CoderSettings(**meta), bool(signed), int(n_atoms), groups_from_list(groups)

        def _gram(self, atoms: Tensor) -> Tensor:
            """``atoms atomsᵀ``, computed once per version of ``W_dec`` (not on every encode call)."""
            key = (self.W_dec.data_ptr(), self.W_dec._version, atoms.device, atoms.shape)
            if getattr(self, "_gram_key", None) != key:
                self._gram_cache, self._gram_key = gram(atoms), key
            return self._gram_cache

        @torch.no_grad()
        def encode(self, x: Tensor) -> Tensor:
            coder, signed, K, groups = self._coder()
            sae_in = self.process_sae_in(x)
            shape = sae_in.shape
            atoms = self.W_dec[:K].float()
            codes = run_coder(sae_in.reshape(-1, shape[-1]).float(), atoms, self._gram(atoms), coder, groups)
            dense = codes.to_dense(K)
            if signed:
                dense = split_signed(dense)
            dense = dense.reshape(*shape[:-1], -1).to(sae_in.dtype)
            return self.hook_sae_acts_post(dense)

    DBKSVDSAEConfig.__name__ = DBKSVDSAEConfig.__qualname__ = "DBKSVDSAEConfig"
    DBKSVDSAE.__name__ = DBKSVDSAE.__qualname__ = "DBKSVDSAE"
    register_sae_class(ARCHITECTURE, DBKSVDSAE, DBKSVDSAEConfig)


_register_sae_lens()


# ---------------------------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def mean_max_abs_cos(W: Tensor, block: int = 4096) -> float:
    """Mean over atoms of the largest |cos| with any other atom (coherence), rows of ``W: (K, d)``."""
    W = W.float()
    W = W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)
    out = []
    for s in range(0, W.shape[0], block):
        c = (W[s:s + block] @ W.T).abs()
        idx = torch.arange(s, min(s + block, W.shape[0]))
        c[idx - s, idx] = 0
        out.append(c.max(dim=1).values)
    return float(torch.cat(out).mean())


__all__ = ["DictionarySAE", "save_sae_lens", "load_sae_lens", "dbksvd_disk_loader", "run_coder", "split_signed",
           "mean_max_abs_cos", "ARCHITECTURE"]
