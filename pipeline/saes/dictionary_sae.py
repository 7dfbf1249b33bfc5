"""A learned :class:`~pipeline.core.dictionary.Dictionary` as an SAEBench SAE.

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
* a *signed* dictionary (``coder.nonnegative = False``) has two forms (``signed_export``;
  :mod:`pipeline.saes.export_forms`): ``"split"`` (default) exposes it exactly as a non-negative SAE of width
  ``2K``: ``W_dec = [D; −D]`` and the signed code ``x`` becomes ``[relu(x), relu(−x)]``; ``"signed"`` exposes
  it as the DB-KSVD authors' SAEBench wrapper does: ``d_sae = K``, ``W_dec = D`` and the signed codes
  themselves. Either way ``decode(encode(y))`` is the signed reconstruction and L0 is that of the signed code;
  :meth:`DictionarySAE.with_export` gives the other form of the same dictionary.

The sae-lens export and loader are in :mod:`pipeline.saes.sae_lens_io`.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections import OrderedDict
from dataclasses import asdict
from typing import Any

import torch
from sae_bench.custom_saes.base_sae import BaseSAE  # noqa: E402  (third-party, after ours for clarity)
from torch import Tensor

from pipeline.core.coders import gram
from pipeline.core.codes import Codes
from pipeline.core.dictionary import CoderSettings, Dictionary, code_width
from pipeline.core.dictionary import apply_coder as run_coder  # the coder Dictionary.encode runs
from pipeline.core.matryoshka import groups_to_list
from pipeline.saes.export_forms import SIGNED, SPLIT, export_form

#: SAEBench / sae-lens architecture name of a dictionary (SAEBench's plots key markers on it).
ARCHITECTURE = "dbksvd"


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

    def __init__(
        self,
        dictionary: Dictionary,
        model_name: str,
        hook_layer: int,
        hook_name: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_bytes: int = 256 << 20,
        coder_overrides: dict[str, Any] | None = None,
        signed_export: str = SPLIT,
    ):
        D = dictionary.atoms.detach().float().cpu()
        K, d = D.shape
        self.coder = CoderSettings(**(asdict(dictionary.coder) | dict(coder_overrides or {})))
        self.groups = dictionary.groups
        #: the dictionary's coefficients are signed (``coder.nonnegative = False``), whatever the form
        self.signed = not self.coder.nonnegative
        #: ``"nonnegative"``, ``"split"`` or ``"signed"`` (:func:`~pipeline.saes.export_forms.export_form`)
        self.export_form = export_form(self.signed, signed_export)
        #: exposed as the 2K-wide ± split (``W_dec = [D; −D]``)
        self.split = self.export_form == SPLIT
        #: ``encode`` returns signed codes (``d_sae = K``, ``W_dec = D``)
        self.signed_codes = self.export_form == SIGNED
        self.n_atoms = K
        W = torch.cat([D, -D]) if self.split else D
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
        """``d_sae``: 2K for a signed dictionary in the ± split form, else K."""
        return self.cfg.d_sae

    def with_export(self, signed_export: str) -> DictionarySAE:
        """This SAE in the form ``signed_export`` (``"split"`` / ``"signed"``; :mod:`~pipeline.saes.export_forms`):
        the same atoms, coder, centre, groups, metadata and ``cfg`` fields (``d_sae`` follows the form), on the same
        device, with an empty code cache of the same size; ``self`` when it already has that form (or has only one:
        a non-negative dictionary)."""
        if export_form(self.signed, signed_export) == self.export_form:
            return self
        dictionary = Dictionary(
            self.atoms.detach().cpu(),
            self.coder,
            self.centre32.detach().cpu() if self.has_centre else None,
            self.groups,
            list(self.fit_history),
            dict(self.dictionary_metadata),
        )
        other = DictionarySAE(
            dictionary,
            self.cfg.model_name,
            self.cfg.hook_layer,
            self.cfg.hook_name,
            device=self.atoms.device,
            dtype=self.W_dec.dtype,
            cache_bytes=self._cache.max_bytes,
            signed_export=signed_export,
        )
        cfg = copy.deepcopy(self.cfg)
        cfg.d_sae = other.cfg.d_sae
        other.cfg = cfg
        return other

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
                width = part.k if part.n else code_width(self.coder, self.groups)
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
        """Dense ``(…, d_sae)`` codes of ``x: (…, d)``, in ``x``'s dtype: non-negative, except in the ``signed``
        form."""
        shape = x.shape
        codes = self.encode_sparse(x.reshape(-1, shape[-1]))
        dense = codes.to_dense(self.n_atoms)
        if self.split:
            dense = split_signed(dense)
        return dense.reshape(*shape[:-1], self.cfg.d_sae).to(x.dtype)

    def decode(self, feature_acts: Tensor) -> Tensor:
        return feature_acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model_name: str,
        hook_layer: int,
        hook_name: str | None = None,
        device: str = "cpu",
        **kwargs,
    ) -> DictionarySAE:
        """Build from a folder written by :meth:`Dictionary.save`."""
        return cls(Dictionary.load(path, device="cpu"), model_name, hook_layer, hook_name, device=device, **kwargs)

    def coder_metadata(self) -> dict[str, Any]:
        """The coder settings as exported (the ``metadata.dbksvd_coder`` block), with the form (``export``)."""
        return {
            **asdict(self.coder),
            "signed": self.signed,
            "export": self.export_form,
            "n_atoms": self.n_atoms,
            "groups": groups_to_list(self.groups),
        }


__all__ = ["DictionarySAE", "split_signed", "run_coder", "ARCHITECTURE"]
