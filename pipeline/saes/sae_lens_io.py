"""A :class:`DictionarySAE` as a sae-lens 6.x folder, and back.

:func:`save_sae_lens` writes ``cfg.json`` (the 6.x layout, ``metadata.sae_lens_version``, ``k`` always written)
and ``sae_weights.safetensors`` into a staging folder beside the target, then renames it into place. The folder
declares sae-lens's stock ``matching_pursuit`` architecture, the stock encoder closest to the dictionary's coder
(:mod:`pipeline.saes.stock_encoder`), so plain ``sae_lens.SAE.load_from_disk`` opens it with no code of ours.
Its ``metadata`` records, as structured fields (none is prose):

* ``dbksvd_coder`` (the coder settings, width and groups) and ``dbksvd_centre``;
* ``stock_encoder``: the declared architecture, its class and the settings chosen for it;
* ``stock_fidelity`` and ``differences``: whether stock encode reproduces ours, and the records of how it does
  not (their codes: :mod:`pipeline.saes.stock_encoder`);
* ``stock_agreement``: with a ``sample``, stock against ours measured on it
  (:func:`~pipeline.saes.stock_encoder.encoder_agreement`);
* ``exact_loader``: the function that loads the folder with the exact coder.

A signed dictionary in the ``signed`` form (``d_sae = K``, signed codes: :mod:`pipeline.saes.export_forms`) is
written as its ± split when the folder declares ``matching_pursuit`` (stock sae-lens's encoder codes
non-negatively, so it can follow a signed coder only through ``W_dec = [D; −D]``), and as itself (``d_sae = K``,
``metadata.dbksvd_coder.export = "signed"``) when it declares ``"dbksvd"``.

The exact coder: :func:`load_sae_lens` (``SAE.load_from_disk(path, converter=dbksvd_disk_loader)``) loads any
export as the registered sae-lens architecture ``"dbksvd"``, whose ``encode`` runs the project's coder;
:func:`load_dictionary_sae` rebuilds the :class:`DictionarySAE`. Importing this module registers ``"dbksvd"``
with sae-lens; an export may also declare it (``architecture="dbksvd"``), which then needs this import to load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.core.coders import gram
from pipeline.core.dictionary import CoderSettings, Dictionary
from pipeline.core.dictionary import apply_coder as run_coder  # the coder Dictionary.encode runs
from pipeline.core.matryoshka import groups_from_list
from pipeline.saes.dictionary_sae import ARCHITECTURE, DictionarySAE, split_signed
from pipeline.saes.export_forms import NONNEGATIVE, SIGNED, SPLIT
from pipeline.saes.stock_encoder import (
    EXACT,
    MATCHING_PURSUIT,
    MATCHING_PURSUIT_CLASS,
    MIN_SUPPORT_AGREEMENT,
    differences,
    encoder_agreement,
    sample_contradiction,
    stock_fidelity,
    stock_settings,
)
from pipeline.utils.atomic import atomic_write, atomic_write_text

#: Metadata key of the exported coder settings.
CODER_KEY = "dbksvd_coder"
#: Files of a sae-lens folder: sae-lens's ``SAE_CFG_FILENAME`` / ``SAE_WEIGHTS_FILENAME`` (spelled out here so
#: that importing this module does not import sae-lens; a test checks they agree).
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
#: ``architecture`` values :func:`save_sae_lens` accepts: the stock encoder, or the registered exact class.
ARCHITECTURES = (MATCHING_PURSUIT, ARCHITECTURE)
#: ``metadata.exact_loader``: what loads an export with the exact coder.
EXACT_LOADER = {"function": "pipeline.saes.sae_lens_io.load_sae_lens", "sae_lens_architecture": ARCHITECTURE}


# ---------------------------------------------------------------------------------------------- export
def _folder(
    sae: DictionarySAE,
    architecture: str,
    found: list[dict[str, Any]],
    extra_metadata: dict[str, Any] | None,
    agreement: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(cfg, tensors)`` of an export declaring ``architecture``, stock differing from ours as ``found`` says."""
    import sae_lens

    c = sae.cfg
    stock = (
        {"architecture": MATCHING_PURSUIT, "class": MATCHING_PURSUIT_CLASS, "settings": stock_settings(sae)}
        if architecture == MATCHING_PURSUIT
        else {"architecture": ARCHITECTURE, "class": "DBKSVDSAE", "settings": {}}
    )
    metadata = {
        "sae_lens_version": sae_lens.__version__,
        "sae_lens_training_version": None,
        "model_name": c.model_name,
        "hook_name": c.hook_name,
        "hook_layer": int(c.hook_layer),
        "hook_head_index": c.hook_head_index,
        "prepend_bos": c.prepend_bos,
        "context_size": c.context_size,
        "dataset_path": c.dataset_path,
        "model_from_pretrained_kwargs": c.model_from_pretrained_kwargs or {},
        "seqpos_slice": list(c.seqpos_slice) if c.seqpos_slice is not None else None,
        "neuronpedia_id": None,
        CODER_KEY: sae.coder_metadata(),
        "dbksvd_centre": bool(sae.has_centre),
        "exact_loader": EXACT_LOADER,
        "stock_encoder": stock,
        "stock_fidelity": stock_fidelity(found) if architecture == MATCHING_PURSUIT else EXACT,
        "differences": found,
        **({"stock_agreement": agreement} if agreement is not None else {}),
        **(extra_metadata or {}),
    }
    cfg: dict[str, Any] = {
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
    }
    # MatchingPursuitSAE is tied (W_enc = W_decᵀ, no b_enc) and loads strictly: only W_dec and b_dec
    names = ("W_dec", "b_dec") if architecture == MATCHING_PURSUIT else ("W_enc", "b_enc", "W_dec", "b_dec")
    if architecture == MATCHING_PURSUIT:
        cfg.update(stock["settings"])
    cfg["metadata"] = metadata
    tensors = {name: getattr(sae, name).detach().float().cpu().contiguous() for name in names}
    return cfg, tensors


def _write(stage: Path, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    atomic_write(stage / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
    atomic_write_text(stage / CFG_FILE, json.dumps(cfg, indent=2))


def _publish(stage: Path, path: Path) -> None:
    """Move the staged folder to ``path``: one rename when ``path`` does not exist yet, else one rename per
    file (weights, then cfg), each atomic, leaving any other file in ``path`` alone."""
    try:
        os.rename(stage, path)  # atomic; replaces nothing but an empty directory
        return
    except OSError:
        if not path.is_dir():
            raise
    for name in (WEIGHTS_FILE, CFG_FILE):
        os.replace(stage / name, path / name)
    stage.rmdir()


def save_sae_lens(
    sae: DictionarySAE,
    path: str | os.PathLike,
    *,
    architecture: str = MATCHING_PURSUIT,
    extra_metadata: dict[str, Any] | None = None,
    sample: Tensor | None = None,
    min_support_agreement: float = MIN_SUPPORT_AGREEMENT,
) -> Path:
    """Write ``sae`` as a sae-lens 6.x folder: ``cfg.json`` + ``sae_weights.safetensors``.

    Args:
        sae: the dictionary SAE.
        path: the folder. Both files are written into a staging folder ``.<name>.tmp-<pid>`` beside it and then
            renamed into place, so a reader never sees a half-written export.
        architecture: ``"matching_pursuit"`` (default): stock sae-lens's closest encoder (a ``signed``-form SAE is
            written as its ± split: stock codes are non-negative); ``"dbksvd"``: the registered exact class
            (loading then needs this module imported), in ``sae``'s own form.
        extra_metadata: merged into ``cfg.json``'s metadata.
        sample: optional activations ``(…, d)``: the written folder's stock encoder is loaded and compared with
            ours on them (``metadata.stock_agreement``); an exact claim whose identical (net signed) support
            fraction there falls below ``min_support_agreement`` becomes ``"approximate"``, with a ``sample``
            record added to ``metadata.differences``.

    Either way :func:`load_sae_lens` gives the exact coder.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if architecture == MATCHING_PURSUIT and sae.signed_codes:
        sae = sae.with_export(SPLIT)  # stock matching_pursuit cannot produce a negative code
    found = differences(sae) if architecture == MATCHING_PURSUIT else []
    stage = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir()
        _write(stage, *_folder(sae, architecture, found, extra_metadata))
        if sample is not None and architecture == MATCHING_PURSUIT:
            from sae_lens import SAE

            agreement = encoder_agreement(sae, SAE.load_from_disk(str(stage)), sample)
            contradiction = sample_contradiction(stock_fidelity(found), agreement, min_support_agreement)
            found = found + ([contradiction] if contradiction else [])
            cfg, _ = _folder(sae, architecture, found, extra_metadata, agreement)
            atomic_write_text(stage / CFG_FILE, json.dumps(cfg, indent=2))
        _publish(stage, path)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------- exact loaders
def dbksvd_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """sae-lens disk converter: a folder exported by :func:`save_sae_lens` (any declared architecture) as the
    exact ``"dbksvd"`` class. A matching_pursuit export stores no encoder weights; they are ``W_decᵀ`` and 0."""
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

    cfg_dict, state = sae_lens_disk_loader(path, device, cfg_overrides)
    if CODER_KEY in (cfg_dict.get("metadata") or {}):
        cfg_dict["architecture"] = ARCHITECTURE
        W_dec = state["W_dec"]
        if "W_enc" not in state:
            state["W_enc"] = W_dec.T.contiguous().clone()
        if "b_enc" not in state:
            state["b_enc"] = torch.zeros(W_dec.shape[0], dtype=W_dec.dtype, device=W_dec.device)
    return cfg_dict, state


def load_sae_lens(path: str | os.PathLike, device: str = "cpu") -> Any:
    """Load an exported folder with sae-lens (a ``sae_lens.SAE`` of the registered ``"dbksvd"`` class), whose
    ``encode`` runs the real coder."""
    from sae_lens import SAE

    return SAE.load_from_disk(str(path), device=device, converter=dbksvd_disk_loader)


def load_dictionary_sae(path: str | os.PathLike, device: str = "cpu", **kwargs: Any) -> DictionarySAE:
    """Rebuild the :class:`DictionarySAE` of an exported folder (any declared architecture): atoms =
    ``W_dec[:K]``, centre = ``b_dec``, coder, groups and form (``export``; an export without it: the split) from
    ``metadata.dbksvd_coder``; ``kwargs`` go to :class:`DictionarySAE`."""
    path = Path(path)
    cfg = json.loads((path / CFG_FILE).read_text())
    meta = cfg.get("metadata") or {}
    if CODER_KEY not in meta:
        raise ValueError(f"{path} is not a DB-KSVD export: metadata.{CODER_KEY} is missing.")
    coder = dict(meta[CODER_KEY])
    coder.pop("signed")
    form = coder.pop("export", None)
    kwargs.setdefault("signed_export", SIGNED if form == SIGNED else SPLIT)
    K, groups = int(coder.pop("n_atoms")), groups_from_list(coder.pop("groups"))
    tensors = load_file(str(path / WEIGHTS_FILE))
    atoms = tensors["W_dec"][:K].float()
    b_dec = tensors["b_dec"].float()
    has_centre = meta.get("dbksvd_centre")
    centre = b_dec if (bool(b_dec.abs().sum() > 0) if has_centre is None else has_centre) else None
    hook_name = meta.get("hook_name")
    layer = meta.get("hook_layer")
    if layer is None:
        found = re.search(r"blocks\.(\d+)\.", hook_name or "")
        layer = int(found.group(1)) if found else 0
    sae = DictionarySAE(
        Dictionary(atoms, CoderSettings(**coder), centre, groups),
        meta.get("model_name") or "",
        int(layer),
        hook_name,
        device=device,
        **kwargs,
    )
    for key in ("context_size", "hook_head_index", "prepend_bos", "dataset_path", "model_from_pretrained_kwargs"):
        if meta.get(key) is not None:
            setattr(sae.cfg, key, meta[key])
    if meta.get("seqpos_slice") is not None:
        sae.cfg.seqpos_slice = tuple(meta["seqpos_slice"])
    return sae


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
            """``(coder, split, K, groups)``: ``split`` = codes go out as ``[relu(x), relu(−x)]`` (a signed
            dictionary exported as its ± split; an export that records no form and is signed is one)."""
            meta = dict(self.cfg.metadata[CODER_KEY])
            signed, n_atoms, groups = meta.pop("signed"), meta.pop("n_atoms"), meta.pop("groups")
            form = meta.pop("export", None) or (SPLIT if signed else NONNEGATIVE)
            return CoderSettings(**meta), form == SPLIT, int(n_atoms), groups_from_list(groups)

        def _gram(self, atoms: Tensor) -> Tensor:
            """``atoms atomsᵀ``, computed once per version of ``W_dec`` (not on every encode call)."""
            key = (self.W_dec.data_ptr(), self.W_dec._version, atoms.device, atoms.shape)
            if getattr(self, "_gram_key", None) != key:
                self._gram_cache, self._gram_key = gram(atoms), key
            return self._gram_cache

        @torch.no_grad()
        def encode(self, x: Tensor) -> Tensor:
            coder, split, K, groups = self._coder()
            sae_in = self.process_sae_in(x)
            shape = sae_in.shape
            atoms = self.W_dec[:K].float()
            codes = run_coder(sae_in.reshape(-1, shape[-1]).float(), atoms, self._gram(atoms), coder, groups)
            dense = codes.to_dense(K)
            if split:
                dense = split_signed(dense)
            dense = dense.reshape(*shape[:-1], -1).to(sae_in.dtype)
            return self.hook_sae_acts_post(dense)

    DBKSVDSAEConfig.__name__ = DBKSVDSAEConfig.__qualname__ = "DBKSVDSAEConfig"
    DBKSVDSAE.__name__ = DBKSVDSAE.__qualname__ = "DBKSVDSAE"
    register_sae_class(ARCHITECTURE, DBKSVDSAE, DBKSVDSAEConfig)


_register_sae_lens()

__all__ = [
    "ARCHITECTURES",
    "CFG_FILE",
    "CODER_KEY",
    "EXACT_LOADER",
    "WEIGHTS_FILE",
    "dbksvd_disk_loader",
    "load_dictionary_sae",
    "load_sae_lens",
    "save_sae_lens",
]
