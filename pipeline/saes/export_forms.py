"""The forms in which a dictionary is handed to SAEBench (no SAEBench import: the eval config check reads them).

A non-negative dictionary of K atoms has one form, ``nonnegative``: K latents, ``W_dec = D``, its codes as they
are. A *signed* dictionary (``coder.nonnegative = False``, e.g. ``dictionary=reference``) has two, chosen by
``eval.signed_export``:

* ``split`` (the default): 2K non-negative latents, ``W_dec = [D; −D]``, the signed code ``x`` as
  ``[relu(x), relu(−x)]``. Every SAEBench metric reads it as it reads any SAE; SAEBench's per-latent statistics
  (feature density, alive fraction, the latents probed, ablated or explained) see 2K latents.
* ``signed``: K latents, ``W_dec = D``, the signed codes themselves (``d_sae = K``), as the DB-KSVD authors'
  SAEBench wrapper exposes their dictionaries. Only the metrics whose SAEBench code reads signed codes correctly
  run on it (:attr:`pipeline.evals.metrics.base.MetricRunner.signed_codes`).

Both forms decode to the same reconstruction and have the same L0.
"""

from __future__ import annotations

#: A non-negative dictionary's only form.
NONNEGATIVE = "nonnegative"
#: A signed dictionary as 2K non-negative latents.
SPLIT = "split"
#: A signed dictionary as K latents with signed codes.
SIGNED = "signed"
#: The values of ``eval.signed_export``.
SIGNED_EXPORTS: tuple[str, ...] = (SPLIT, SIGNED)


def check_signed_export(value: str, key: str = "eval.signed_export") -> str:
    """``value`` if it is one of :data:`SIGNED_EXPORTS`, else ``ValueError`` naming ``key`` and the choices."""
    if value not in SIGNED_EXPORTS:
        raise ValueError(
            f"{key}={value!r} is not one of {', '.join(SIGNED_EXPORTS)}: how a signed dictionary is handed to "
            f"SAEBench ({SPLIT}: 2K non-negative latents W_dec = [D; -D]; {SIGNED}: K latents with signed codes, "
            "W_dec = D, as the DB-KSVD authors' SAEBench wrapper)"
        )
    return value


def export_form(signed_dictionary: bool, signed_export: str = SPLIT) -> str:
    """The form a dictionary is handed to SAEBench in: :data:`NONNEGATIVE` for a non-negative dictionary (it has
    one form, whatever ``signed_export`` says), else ``signed_export`` (checked)."""
    check_signed_export(signed_export)
    return signed_export if signed_dictionary else NONNEGATIVE


__all__ = ["NONNEGATIVE", "SIGNED", "SIGNED_EXPORTS", "SPLIT", "check_signed_export", "export_form"]
