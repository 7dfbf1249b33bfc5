"""A :class:`DictionarySAE` in the sae-lens 6.x folder format, and back.

:func:`save_sae_lens` writes ``cfg.json`` (6.x layout with ``metadata.sae_lens_version``, ``k`` always written)
and ``sae_weights.safetensors`` (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``). **A plain sae-lens load is an
approximation:** by default the folder declares ``architecture = "topk"`` so any sae-lens 6.x can open it, and
sae-lens then encodes with the top-k of the correlations ``relu((x − b_dec) W_enc)`` rather than with matching
pursuit. The real coder's settings are kept in ``metadata.dbksvd_coder``; :func:`load_sae_lens` (or
``SAE.load_from_disk(path, converter=dbksvd_disk_loader)``) loads the folder as the registered ``"dbksvd"``
sae-lens architecture, whose ``encode`` runs the project's coder exactly. Importing this module registers that
architecture with sae-lens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from pipeline.core.coders import gram
from pipeline.core.dictionary import CoderSettings
from pipeline.core.dictionary import apply_coder as run_coder  # the coder Dictionary.encode runs
from pipeline.core.matryoshka import groups_from_list
from pipeline.evals.dictionary_sae import ARCHITECTURE, DictionarySAE, split_signed
from pipeline.utils.atomic import atomic_write, atomic_write_text

#: Metadata key of the exported coder settings.
CODER_KEY = "dbksvd_coder"
#: Files of a sae-lens folder: sae-lens's ``SAE_CFG_FILENAME`` / ``SAE_WEIGHTS_FILENAME`` (spelled out here so
#: that importing this module does not import sae-lens; a test checks they agree).
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ENCODER_NOTE = ("DB-KSVD dictionary. Its real encoder is sparse coding (matching pursuit / OMP, settings in "
                "metadata.dbksvd_coder). Loaded as architecture 'topk' by plain sae-lens, encode is only the "
                "top-k of the correlations relu((x - b_dec) @ W_enc) with W_enc = W_dec^T, an approximation; "
                "load with pipeline.evals.sae_lens_io.load_sae_lens (registered architecture 'dbksvd') for the "
                "exact coder.")


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
    atomic_write(path / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
    atomic_write_text(path / CFG_FILE, json.dumps(cfg, indent=2))
    return path


def dbksvd_disk_loader(path: str | Path, device: str = "cpu",
                       cfg_overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """sae-lens disk converter: a folder exported by :func:`save_sae_lens` as the exact ``"dbksvd"`` class."""
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

    cfg_dict, state = sae_lens_disk_loader(path, device, cfg_overrides)
    if CODER_KEY in (cfg_dict.get("metadata") or {}):
        cfg_dict["architecture"] = ARCHITECTURE
    return cfg_dict, state


def load_sae_lens(path: str | os.PathLike, device: str = "cpu") -> Any:
    """Load an exported folder with sae-lens (a ``sae_lens.SAE`` of the registered ``"dbksvd"`` class), whose
    ``encode`` runs the real coder."""
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

__all__ = ["save_sae_lens", "load_sae_lens", "dbksvd_disk_loader", "CODER_KEY", "ENCODER_NOTE"]
