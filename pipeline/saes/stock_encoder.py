"""sae-lens's stock ``matching_pursuit`` encoder against a dictionary's own coder: the stock settings closest to it,
how the two differ, whether stock reproduces it, and how closely it follows it on a sample.

An export (:func:`pipeline.saes.sae_lens_io.save_sae_lens`) declares sae-lens's ``MatchingPursuitSAE`` (tied:
``W_enc = W_decᵀ``; weights ``W_dec`` and ``b_dec``): it measured closer to every coder of this project than
stock ``topk`` (the top-k of the correlations), by 2-10× in reconstruction difference and 10-∞× in identical
supports (BENCHMARKS.md, "sae-lens export"). What the two encoders share: both subtract ``b_dec`` (our centre,
zero when fitted uncentred) first and add it back; both pick the atom of largest positive correlation with the
residual, add that correlation to its coefficient and may pick an atom again; with no positive correlation left
ours stops and stock adds ``relu(·) = 0``. Ours updates correlations through the Gram matrix in fp32, stock
recomputes them each step in the SAE's dtype: in fp32 the codes agree to rounding.

:func:`differences` lists, as records ``{"aspect": <code>, ...its parameters}``, what makes stock's codes
differ from ours beyond rounding; ``cfg.json`` stores them as ``metadata.differences``:

==================  ===================================================================================
``signed_split``    a signed dictionary is exported as ``W_dec = [D; −D]`` (``latents`` = 2K); where a row
                    re-picks an atom with the other sign, stock activates both halves where ours holds one
                    signed coefficient: reconstruction and net code ``a[:K] − a[K:]`` agree, split latents not
``matryoshka``      ours codes group by group (``budgets`` over atom ``ranges``) on the residual the earlier
                    groups left; stock codes over all atoms at once
``omp``             ours re-fits every coefficient by least squares after each pick; stock never re-fits
``refit``           ours re-solves least squares on the final support; stock keeps the greedy sums
``candidates``      ours searches each row's ``candidates`` largest correlations only
``step_cap``        ours takes up to ``max_iter`` steps, until a (k+1)-th distinct atom enters (then drops the
                    smallest; with ``reference_rules`` sometimes keeps it); stock's ``max_iterations`` counts
                    steps: the same rule only when ``max_iter <= k``
``relative_stop``   ours stops a row once ``‖r‖ <= rtol ‖x − b_dec‖``; stock has only an absolute threshold,
                    which the export disables (``residual_threshold = 0`` measured closer than any
                    ``rtol ×`` a quantile of ``‖x‖``)
``precision``       ours computes the initial correlations at ``precision`` (bf16 / tf32)
``sample``          on the export's sample, fewer than ``min_support_agreement`` of the rows had our
                    supports (``measured``), so an exact claim was withdrawn
==================  ===================================================================================

:func:`stock_fidelity`: :data:`EXACT` when nothing is listed (stock encode gives our codes up to rounding),
:data:`EXACT_RECONSTRUCTION` when only ``signed_split`` is, :data:`APPROXIMATE` otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.core.dictionary import CoderSettings, code_width
from pipeline.saes.dictionary_sae import DictionarySAE

#: The stock sae-lens architecture an export declares, and its class.
MATCHING_PURSUIT = "matching_pursuit"
MATCHING_PURSUIT_CLASS = "MatchingPursuitSAE"
#: ``metadata.stock_fidelity`` values (module docstring).
EXACT, EXACT_RECONSTRUCTION, APPROXIMATE = "exact", "exact_reconstruction", "approximate"
#: With a sample, an export claiming EXACT (EXACT_RECONSTRUCTION) needs at least this fraction of the sample's
#: rows coded by stock with our supports (our net signed supports), else it is APPROXIMATE. Where the claim
#: holds, tests/saes/test_sae_lens_io.py requires at least 0.995 on its planted cases; the slack is for float
#: near-ties.
MIN_SUPPORT_AGREEMENT = 0.99


def step_cap(coder: CoderSettings) -> int:
    """Our matching pursuit's step cap (``max_iter``, default ``4 k``)."""
    return 4 * coder.k if coder.max_iter is None else int(coder.max_iter)


def code_cap(sae: DictionarySAE) -> int:
    """Most atoms in one of our codes: k (k + 1 with the reference's stopping rules), or for a Matryoshka
    dictionary ``B`` = the sum of the group budgets (each + 1 with those rules)."""
    return code_width(sae.coder, sae.groups)


def stock_max_iterations(sae: DictionarySAE) -> int:
    """sae-lens ``max_iterations``: our step cap when it is ``<= k`` (the same rule), else k (OMP, or MP with a
    larger cap: the best support agreement measured, and stock's L0 stays <= k); for a Matryoshka dictionary
    ``B`` = Σ budgets, the most atoms our cascade holds (measured as close or closer)."""
    c = sae.coder
    if sae.groups is not None:
        return code_cap(sae)
    return min(step_cap(c), c.k) if c.method == "mp" else c.k


def stock_settings(sae: DictionarySAE) -> dict[str, Any]:
    """The ``MatchingPursuitSAEConfig`` fields closest to ``sae``'s coder: :func:`stock_max_iterations`, no
    absolute residual stop, and no stop on a re-picked atom (ours keeps going; stopping agreed worse)."""
    return {"max_iterations": stock_max_iterations(sae), "residual_threshold": 0.0, "stop_on_duplicate_support": False}


def differences(sae: DictionarySAE) -> list[dict[str, Any]]:
    """What makes stock ``matching_pursuit``'s codes of ``sae`` differ from ours beyond rounding, as records
    ``{"aspect": <code>, ...}`` (the codes: module docstring); ``[]`` when stock reproduces our coder."""
    c = sae.coder
    out: list[dict[str, Any]] = []
    if sae.signed:
        out.append({"aspect": "signed_split", "atoms": sae.n_atoms, "latents": 2 * sae.n_atoms})
    if sae.groups is not None:
        out.append(
            {
                "aspect": "matryoshka",
                "budgets": [g.budget for g in sae.groups],
                "ranges": [[g.start, g.end] for g in sae.groups],
            }
        )
    if c.method == "omp":
        out.append({"aspect": "omp"})
    elif c.refit:
        out.append({"aspect": "refit"})
    if c.candidates is not None and c.candidates < sae.n_atoms:
        out.append({"aspect": "candidates", "candidates": int(c.candidates)})
    if c.method == "mp" and sae.groups is None and step_cap(c) > c.k:
        out.append(
            {
                "aspect": "step_cap",
                "max_iter": step_cap(c),
                "k": c.k,
                "reference_rules": bool(c.reference_rules),
                "stock_max_iterations": stock_max_iterations(sae),
            }
        )
    if c.rtol > 0:
        out.append({"aspect": "relative_stop", "rtol": float(c.rtol), "stock_residual_threshold": 0.0})
    if c.precision != "fp32":
        out.append({"aspect": "precision", "precision": c.precision})
    return out


def stock_fidelity(found: list[dict[str, Any]]) -> str:
    """:data:`EXACT`, :data:`EXACT_RECONSTRUCTION` or :data:`APPROXIMATE` from :func:`differences`' records."""
    aspects = {d["aspect"] for d in found}
    if not aspects:
        return EXACT
    return EXACT_RECONSTRUCTION if aspects == {"signed_split"} else APPROXIMATE


@torch.no_grad()
def encoder_agreement(sae: DictionarySAE, stock: Any, x: Tensor) -> dict[str, float]:
    """How closely ``stock.encode`` (a loaded sae-lens SAE) follows ``sae.encode`` on ``x: (…, d)``.

    Returns the number of rows, the fraction of rows whose supports are identical (a signed dictionary also:
    ``identical_signed_support``, the supports of the net codes ``a[:K] − a[K:]``), the mean and max relative
    reconstruction difference ``‖(a − b) W_dec‖ / ‖x − b_dec‖``, both mean relative reconstruction errors
    ``‖x − b_dec − a W_dec‖ / ‖x − b_dec‖`` and both mean L0s.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    ours = sae.encode(x).float().cpu()
    param = next(stock.parameters())
    theirs = stock.encode(x.to(param.device, param.dtype)).float().cpu()
    W = sae.W_dec.detach().float().cpu()
    y = x.cpu() - sae.b_dec.detach().float().cpu()
    norm = y.norm(dim=-1).clamp(min=1e-12)
    rel = ((ours - theirs) @ W).norm(dim=-1) / norm
    n = x.shape[0]

    def same_support(a: Tensor, b: Tensor) -> float:
        return float(((a != 0) == (b != 0)).all(dim=-1).float().mean()) if n else 1.0

    out = {
        "rows": n,
        "identical_support": same_support(ours, theirs),
        "recon_rel_diff_mean": float(rel.mean()) if n else 0.0,
        "recon_rel_diff_max": float(rel.max()) if n else 0.0,
        "recon_rel_err_ours": float(((y - ours @ W).norm(dim=-1) / norm).mean()) if n else 0.0,
        "recon_rel_err_stock": float(((y - theirs @ W).norm(dim=-1) / norm).mean()) if n else 0.0,
        "l0_ours": float((ours != 0).sum(-1).float().mean()) if n else 0.0,
        "l0_stock": float((theirs != 0).sum(-1).float().mean()) if n else 0.0,
    }
    if sae.signed:
        K = sae.n_atoms
        out["identical_signed_support"] = same_support(ours[:, :K] - ours[:, K:], theirs[:, :K] - theirs[:, K:])
    return out


def sample_contradiction(
    fidelity: str, agreement: dict[str, float], min_support_agreement: float = MIN_SUPPORT_AGREEMENT
) -> dict[str, Any] | None:
    """The ``sample`` difference record when the measured ``agreement`` contradicts an :data:`EXACT` /
    :data:`EXACT_RECONSTRUCTION` claim (fewer identical supports than ``min_support_agreement``), else None."""
    key = {EXACT: "identical_support", EXACT_RECONSTRUCTION: "identical_signed_support"}.get(fidelity)
    if key is None or agreement[key] >= min_support_agreement:
        return None
    return {
        "aspect": "sample",
        "measured": key,
        "value": float(agreement[key]),
        "rows": int(agreement["rows"]),
        "min_support_agreement": float(min_support_agreement),
    }


__all__ = [
    "APPROXIMATE",
    "EXACT",
    "EXACT_RECONSTRUCTION",
    "MATCHING_PURSUIT",
    "MIN_SUPPORT_AGREEMENT",
    "code_cap",
    "differences",
    "encoder_agreement",
    "sample_contradiction",
    "step_cap",
    "stock_fidelity",
    "stock_max_iterations",
    "stock_settings",
]
