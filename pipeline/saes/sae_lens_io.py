"""A :class:`DictionarySAE` in the sae-lens 6.x folder format, and back.

:func:`save_sae_lens` writes ``cfg.json`` (6.x layout with ``metadata.sae_lens_version``, ``k`` always written)
and ``sae_weights.safetensors`` into a staging folder beside the target, then renames it into place. The folder
declares the **stock** sae-lens architecture whose encoder is the *closest* stock approximation of the
dictionary's coder; the exact coder stays one import away (below).

* ``"matching_pursuit"`` (sae-lens's ``MatchingPursuitSAE``: tied, ``W_enc = W_decᵀ``, weights ``W_dec``,
  ``b_dec`` only), chosen by ``architecture="auto"`` for **every** coder: it measured closer to ours than
  ``"topk"`` in every configuration below (MP with any step cap, refit, candidates, bf16, OMP, signed,
  Matryoshka; planted and fitted dictionaries). ``max_iterations`` = :func:`stock_max_iterations`;
* ``"topk"`` (top-k of the correlations ``relu((x − b_dec) W_enc)``, ``W_enc = W_decᵀ``): only when forced, or
  when :func:`save_sae_lens` is given a ``sample`` on which topk measures closer than matching pursuit (never
  observed).

``metadata`` says how stock sae-lens's encoder differs from ours: ``stock_fidelity`` (:data:`EXACT`,
:data:`EXACT_RECONSTRUCTION` or :data:`APPROXIMATE`, see :func:`stock_fidelity`), ``stock_encoder``
(architecture, its settings, ``why_not_exact``), ``differences`` / ``matches`` (one sentence each: step cap vs
distinct-atom cap, relative vs absolute stop, refit, OMP, signed ± split, Matryoshka, candidates, precision,
centring), ``exact_loader``, the coder settings in ``dbksvd_coder`` and, when :func:`save_sae_lens` is given a
``sample``, the measured ``stock_agreement`` (and ``stock_alternatives``: the other stock architecture's).

The exact coder: :func:`load_sae_lens` (or ``SAE.load_from_disk(path, converter=dbksvd_disk_loader)``) loads
any export as the registered ``"dbksvd"`` sae-lens architecture, whose ``encode`` runs the project's coder;
:func:`load_dictionary_sae` rebuilds the :class:`DictionarySAE` itself. Importing this module registers the
architecture with sae-lens.

Sae-lens's matching pursuit against ours, read from ``sae_lens/saes/matching_pursuit_sae.py`` 6.54 and
:mod:`pipeline.core.coders`:

* selection: both pick the atom with the largest *positive* correlation with the residual, add that
  correlation to its coefficient (no refit) and allow an atom to be picked again (sae-lens accumulates with
  ``scatter_add``); with no positive correlation left, ours stops and sae-lens adds ``relu(·) = 0`` — same codes.
  Signed dictionaries are exported as the ± split ``[D; −D]``: stock's largest split correlation is our largest
  |correlation| and it adds the same amount, to latent ``j`` or ``j + K`` by sign;
* step cap: sae-lens's ``max_iterations`` counts *steps*. Ours takes at most ``max_iter`` steps (default 4k)
  and holds at most k *distinct* atoms: when a (k+1)-th enters it drops the smallest |coefficient| and stops.
  With ``max_iter <= k`` that rule never fires and ``max_iterations = max_iter`` is the same rule; with a
  larger cap no setting reproduces it and ``max_iterations = k`` agreed best (below);
* stop: ours stops a row once ‖r‖ <= rtol ‖x − b_dec‖ (relative); sae-lens's ``residual_threshold`` is
  absolute. Its ``stop_on_duplicate_support`` (default on) stops a row at the first re-pick, which ours does not;
* bias: both subtract ``b_dec`` (our centre, zero when fitted uncentred) before encoding and add it back.

Measured (``_encode_matching_pursuit`` / top-k of correlations on the exported ``W_dec`` against our encode;
rows with identical supports / mean relative reconstruction difference ‖(a − b) W_dec‖ / ‖x − b_dec‖;
*planted*: d = 64, K = 256, k = 5, 4000 rows, 20 dB, true atoms; *fitted*: :func:`learn_dictionary` (12
iterations, uncentred and centred, with MP and with OMP) on 8000 planted rows, scored on 4000 held-out rows,
range over those fits; *dense*: fitted (k = 8, centred) on correlated Gaussian data; signed: the split
supports, in brackets the supports of the net signed code ``a[:K] − a[K:]``):

==========================  =======  ================================  =======================  =======================
our coder                   data     stock matching_pursuit (k steps)  stock topk (k)           other MP caps
==========================  =======  ================================  =======================  =======================
mp, max_iter <= k, rtol.05  planted  1.000 / 1.3e-7                    0.044 / 0.54             k+1: 0.48 / 7.1e-2
  same                      fitted   1.000 / 1.3e-7                    0.040-0.045 / 0.52-0.54
  same                      dense    1.000 / 1.3e-7                    0.000 / 2.1
mp, default max_iter = 4k   planted  0.945 / 5.0e-2                    0.044 / 0.53             k+1: 0.52 / 4.0e-2
  same                      fitted   0.92-0.94 / 4.3-4.9e-2            0.040-0.045 / 0.52-0.54  k+1: 0.41-0.44 / 5.8e-2
  same                      dense    0.824 / 3.2e-2                    0.000 / 2.1              k+1: 0.02 / 0.10
mp, 4k, refit               planted  0.945 / 0.11                      0.044 / 0.55             2k: 0.004 / 8.9e-2
  same                      fitted   0.922 / 0.12                      0.043 / 0.55             k+1: 0.41 / 0.11
mp, 4k, candidates = 16     planted  0.725 / 5.2e-2                    0.047 / 0.53
mp, 4k, precision bf16      planted  0.943 / 5.1e-2                    0.044 / 0.53
omp                         planted  0.928 / 0.11                      0.045 / 0.55             2k: 0.004 / 8.9e-2
  same                      fitted   0.905-0.913 / 0.11-0.12           0.041-0.047 / 0.54-0.55  k+1: 0.40-0.43 / 0.11
  same                      dense    0.031 / 0.21                      0.000 / 2.1              2k: 0.000 / 0.17
signed mp, max_iter <= k    planted  0.913 [1.000] / 1.3e-7            0.031 / 0.59
  same                      fitted   0.916-0.922 [1.000] / 1.3e-7      0.025-0.029 / 0.59-0.60
  same                      dense    0.991 [1.000] / 1.3e-7            0.000 / 2.5
signed mp, default 4k       planted  0.853 / 9.1e-2                    0.032 / 0.59             k+1: 0.40 / 4.9e-2
  same                      fitted   0.853-0.859 / 7.9-8.3e-2          0.026-0.030 / 0.60       k+1: 0.31-0.35 / 6e-2
  same                      dense    0.868 / 2.2e-2                    0.000 / 2.5
signed omp                  planted  0.851 / 0.11                      0.032 / 0.60             2k: 0.002 / 6.4e-2
  same                      fitted   0.847-0.851 / 0.11                0.029-0.030 / 0.60       k+1: 0.31-0.35 / 9e-2
  same                      dense    0.030 / 0.20                      0.000 / 2.5              2k: 0.000 / 0.16
Matryoshka mp / omp         planted  0.000 / 0.28-0.42                 0.000 / 0.55-0.61        B: 0.000 / 0.28-0.42
  same                      fitted   0.000 / 0.48                      0.000 / 0.59             B: 0.005 / 0.46
signed Matryoshka           planted  0.000 / 0.29-0.43                 0.000 / 0.60-0.67        B: 0.000 / 0.29-0.43
  same                      fitted   0.000 / 0.52                      0.000 / 0.68             B: 0.000 / 0.50
==========================  =======  ================================  =======================  =======================

Dense Gaussian inputs to random atoms (d = 32, K = 96, k = 5, default coder; the sae-lens round-trip test):
identical supports 0.67–0.72 (signed 0.75–0.77), mean relative difference 0.10–0.12 (max 0.55), stock's own
relative error within 0.004 of ours. So: matching pursuit is the closer stock encoder everywhere, by a factor of
2–10 in reconstruction difference and 10–∞ in identical supports. ``max_iterations``: k (our step cap when it is
smaller) had the best support agreement in every case and keeps stock's L0 <= k like ours; a larger cap (k+1,
2k) lowers the mean difference in a few cases (noted) at the cost of supports and of L0 > k. Matryoshka: our
codes hold up to B = Σ budgets atoms, and ``max_iterations = B`` was as close as k on planted and closer on
fitted dictionaries. ``stop_on_duplicate_support = True`` agreed slightly worse in every case (e.g. 0.998 vs
1.000 for the exact case), so the export turns it off.

The relative stop: on planted problems with per-row norms spread by exp(N(0, 0.5)), ``residual_threshold = 0``
(stop disabled) agreed best: identical supports 1.000 (rtol 0.05) and 0.982–1.000 (rtol 0.1), against 0.998 →
0.72 for ``residual_threshold = rtol × the 10–75 % quantile of ‖x‖``; so the export disables it.
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
from pipeline.core.dictionary import CoderSettings, Dictionary, code_width
from pipeline.core.dictionary import apply_coder as run_coder  # the coder Dictionary.encode runs
from pipeline.core.matryoshka import groups_from_list
from pipeline.saes.dictionary_sae import ARCHITECTURE, DictionarySAE, split_signed
from pipeline.utils.atomic import atomic_write, atomic_write_text

#: Metadata key of the exported coder settings.
CODER_KEY = "dbksvd_coder"
#: Files of a sae-lens folder: sae-lens's ``SAE_CFG_FILENAME`` / ``SAE_WEIGHTS_FILENAME`` (spelled out here so
#: that importing this module does not import sae-lens; a test checks they agree).
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
#: Stock sae-lens architectures an export can declare.
TOPK = "topk"
MATCHING_PURSUIT = "matching_pursuit"
#: ``architecture`` values :func:`save_sae_lens` accepts ("auto": the closest stock encoder, matching_pursuit).
ARCHITECTURES = ("auto", TOPK, MATCHING_PURSUIT, ARCHITECTURE)
#: ``metadata.stock_fidelity`` values. EXACT: stock encode gives our codes up to float rounding on every row.
#: EXACT_RECONSTRUCTION: a signed dictionary whose stock encode gives our reconstruction and our net signed code
#: ``a[:K] − a[K:]`` up to float rounding, but not always our split latents (both halves of an atom re-picked
#: with the other sign are active). APPROXIMATE: anything else (``metadata.differences`` says how).
EXACT, EXACT_RECONSTRUCTION, APPROXIMATE = "exact", "exact_reconstruction", "approximate"
#: With a ``sample``, an export claiming EXACT (EXACT_RECONSTRUCTION) needs at least this fraction of the sample's
#: rows coded by stock with our supports (our net signed supports), else it is marked APPROXIMATE. Measured:
#: 1.000 whenever the criterion holds (module docstring); the slack is for float near-ties.
MIN_SUPPORT_AGREEMENT = 0.99

ENCODER_NOTE = (
    "DB-KSVD dictionary. Its real encoder is sparse coding (matching pursuit / OMP, settings in "
    "metadata.dbksvd_coder). Loaded as architecture 'topk' by plain sae-lens, encode is only the "
    "top-k of the correlations relu((x - b_dec) @ W_enc) with W_enc = W_dec^T, an approximation "
    "(stock 'matching_pursuit' is closer); load with pipeline.saes.sae_lens_io.load_sae_lens "
    "(registered architecture 'dbksvd') for the exact coder. metadata.differences lists how the two "
    "encoders differ."
)
MP_ENCODER_NOTES = {
    EXACT: (
        "DB-KSVD dictionary exported as sae-lens's native 'matching_pursuit' architecture, whose stock "
        "encoder reproduces this dictionary's coder (non-negative matching pursuit, no refit, a step cap <= k, "
        "no relative stop) up to float rounding (metadata.stock_fidelity = 'exact'). Load with "
        "pipeline.saes.sae_lens_io.load_sae_lens (registered architecture 'dbksvd') for the exact coder."
    ),
    EXACT_RECONSTRUCTION: (
        "DB-KSVD signed dictionary exported as sae-lens's native 'matching_pursuit' architecture over the +/- "
        "split W_dec = [D; -D]: stock encode reproduces this dictionary's reconstruction and its signed code "
        "(latents [:K] minus latents [K:]) up to float rounding, but where a row re-picks an atom with the other "
        "sign both of its split latents are active (metadata.stock_fidelity = 'exact_reconstruction'). Load "
        "with pipeline.saes.sae_lens_io.load_sae_lens (registered architecture 'dbksvd') for the exact coder."
    ),
    APPROXIMATE: (
        "DB-KSVD dictionary exported as sae-lens's native 'matching_pursuit' architecture, the closest stock "
        "approximation of its coder (measured much closer than 'topk'), but an approximation: stock encode does "
        "not reproduce our codes (metadata.stock_fidelity = 'approximate'; metadata.differences says how, "
        "metadata.stock_agreement, when present, measures it). Load with pipeline.saes.sae_lens_io."
        "load_sae_lens (registered architecture 'dbksvd') for the exact coder."
    ),
}
DBKSVD_ENCODER_NOTE = (
    "DB-KSVD dictionary declared as the registered architecture 'dbksvd': needs "
    "`import pipeline.saes.sae_lens_io` before sae_lens.SAE.load_from_disk; its encode is the "
    "exact coder."
)
EXACT_LOADER = (
    "pipeline.saes.sae_lens_io.load_sae_lens(path), i.e. sae_lens.SAE.load_from_disk(path, "
    "converter=pipeline.saes.sae_lens_io.dbksvd_disk_loader): the registered sae-lens architecture "
    "'dbksvd', whose encode runs the project's coder exactly; "
    "pipeline.saes.sae_lens_io.load_dictionary_sae(path) rebuilds the DictionarySAE."
)
MP_CRITERION = (
    "'auto' exports every dictionary as 'matching_pursuit', the stock encoder closest to ours "
    "(measured against 'topk' for MP with any step cap, refit, candidates, bf16, OMP, signed via the "
    "+/- split, Matryoshka); with a sample given at export, 'topk' instead if it measures closer "
    "there (lower mean relative reconstruction difference)."
)
EXACT_CRITERION = (
    "stock_fidelity 'exact' iff the dictionary is non-negative, has no Matryoshka groups, and codes "
    "with plain matching pursuit (method 'mp', no refit, no candidate restriction, fp32 precision, "
    "rtol = 0) under a step cap max_iter <= k, which max_iterations reproduces; 'exact_reconstruction'"
    " when the same holds for a signed dictionary (± split); and, when a sample is given at export, "
    f"stock and ours give identical (net signed) supports on >= {MIN_SUPPORT_AGREEMENT:.0%} of its "
    "rows. Otherwise 'approximate'."
)


# ---------------------------------------------------------------------------------------------- criterion
def step_cap(coder: CoderSettings) -> int:
    """Our matching pursuit's step cap (``max_iter``, default ``4 k``)."""
    return 4 * coder.k if coder.max_iter is None else int(coder.max_iter)


def code_cap(sae: DictionarySAE) -> int:
    """Most atoms in one of our codes: k (k + 1 with the reference's stopping rules), or for a Matryoshka
    dictionary ``B`` = the sum of the group budgets (each + 1 with those rules)."""
    return code_width(sae.coder, sae.groups)


def stock_max_iterations(sae: DictionarySAE) -> int:
    """sae-lens ``max_iterations`` of a matching_pursuit export: our step cap when it is ``<= k`` (the same rule),
    else k (OMP, or MP with a larger cap: best support agreement measured, and stock's L0 stays <= k); for a
    Matryoshka dictionary ``B`` = Σ budgets, the most atoms our cascade holds (measured as close or closer)."""
    c = sae.coder
    if sae.groups is not None:
        return code_cap(sae)
    return min(step_cap(c), c.k) if c.method == "mp" else c.k


def why_not_exact(sae: DictionarySAE) -> list[str]:
    """Why stock ``MatchingPursuitSAE`` does not reproduce ``sae``'s codes up to float rounding (:data:`EXACT`);
    a signed dictionary with nothing else listed is :data:`EXACT_RECONSTRUCTION`. ``[]`` and non-negative:
    :data:`EXACT`."""
    c = sae.coder
    why = []
    if sae.signed:
        why.append(
            "signed dictionary (exported as the ± split W_dec = [D; -D]): stock activates both split "
            "latents of an atom a row re-picks with the other sign, where ours holds one signed "
            "coefficient (reconstruction and net signed code agree)."
        )
    if sae.groups is not None:
        why.append(
            "Matryoshka dictionary: ours codes group by group (per-group budgets), stock's matching "
            "pursuit over all atoms at once."
        )
    if c.method != "mp":
        why.append(
            "method 'omp': ours re-fits every coefficient by least squares after each pick; stock never re-fits."
        )
    if c.refit:
        why.append("refit = true: ours re-solves least squares on the final support; stock does not.")
    if c.candidates is not None and c.candidates < sae.n_atoms:
        why.append(
            f"candidates = {c.candidates}: ours restricts its greedy loop to each row's top candidates; "
            "stock searches all atoms."
        )
    if c.method == "mp" and step_cap(c) > c.k:
        keep = (
            " (KSVD.jl's rules: unless that atom brought the residual under rtol or came at the last step, "
            "when it keeps k + 1)"
            if c.reference_rules
            else ""
        )
        why.append(
            f"step cap max_iter = {step_cap(c)} > k = {c.k}: ours keeps stepping (re-picking atoms) until "
            f"a (k+1)-th distinct atom enters, then drops the smallest |coefficient|{keep}; stock's "
            "max_iterations counts steps, not distinct atoms."
        )
    if c.rtol > 0:
        why.append(
            f"rtol = {c.rtol}: ours stops a row once ||r|| <= rtol ||x - b_dec|| (relative); stock has "
            "only an absolute threshold, disabled in the export."
        )
    if c.precision != "fp32":
        why.append(f"precision = {c.precision}: ours computes the initial correlations at {c.precision}.")
    return why


def stock_fidelity(sae: DictionarySAE, architecture: str = MATCHING_PURSUIT) -> str:
    """:data:`EXACT`, :data:`EXACT_RECONSTRUCTION` or :data:`APPROXIMATE` for an export declaring
    ``architecture`` (without a sample; :func:`save_sae_lens` can downgrade it on one)."""
    if architecture == ARCHITECTURE:
        return EXACT
    if architecture != MATCHING_PURSUIT:
        return APPROXIMATE
    why = why_not_exact(sae)
    if not why:
        return EXACT
    return EXACT_RECONSTRUCTION if sae.signed and len(why) == 1 else APPROXIMATE


def choose_architecture(sae: DictionarySAE) -> str:
    """The stock architecture of an ``architecture="auto"`` export without a sample: ``"matching_pursuit"`` for
    every dictionary (measured closer than topk for every coder, module docstring)."""
    return MATCHING_PURSUIT


def _mp_settings(sae: DictionarySAE) -> dict[str, Any]:
    """sae-lens ``MatchingPursuitSAEConfig`` fields closest to our coder.

    ``max_iterations``: :func:`stock_max_iterations`. The relative stop cannot be expressed:
    ``residual_threshold = 0`` disables sae-lens's absolute one (measured closer than any ``rtol × quantile of
    ‖x‖``). ``stop_on_duplicate_support = False``: ours keeps going after re-picking an atom.
    """
    return {"max_iterations": stock_max_iterations(sae), "residual_threshold": 0.0, "stop_on_duplicate_support": False}


# ---------------------------------------------------------------------------------------------- differences
def describe_stock_encoder(sae: DictionarySAE, architecture: str) -> tuple[list[str], list[str]]:
    """``(differences, matches)``: sentences on how stock sae-lens's encoder for ``architecture`` differs from
    (or agrees with) ``sae``'s coder."""
    c, k, K = sae.coder, sae.coder.k, sae.n_atoms
    cap = step_cap(c)
    ours = (
        "Batch-OMP (least-squares coefficients after every pick)"
        if c.method == "omp"
        else "greedy matching pursuit on the residual"
    )
    diff: list[str] = []
    same: list[str] = []
    centring = (
        "Centring: b_dec is our dictionary centre (zeros when fitted uncentred); both encoders subtract "
        "it from x first and decode adds it back (apply_b_dec_to_input = true)."
    )
    if architecture == ARCHITECTURE:
        same.append(
            "Encoder: the registered 'dbksvd' class runs the project's coder exactly (needs "
            "`import pipeline.saes.sae_lens_io`; stock sae-lens alone cannot load this folder)."
        )
        same.append(centring)
        return diff, same

    if architecture == MATCHING_PURSUIT:
        steps = stock_max_iterations(sae)
        if sae.signed:
            same.append(
                f"Selection: stock's largest split correlation over the 2K = {2 * K} atoms [D; -D] is our "
                "largest |<r, d_j>|, and it adds |<r, d_j>| to latent j (positive sign) or j + K (negative): "
                "our greedy step a_j += <r, d_j>. An atom may be picked again in both "
                "(stop_on_duplicate_support = false, so stock does not stop on a re-pick)."
            )
        else:
            same.append(
                "Selection: both pick the atom with the largest positive correlation <r, d_j> with the "
                "residual r, add that correlation to its coefficient (an atom may be picked again; "
                "stop_on_duplicate_support = false, so stock does not stop on a re-pick) and add nothing "
                "once no correlation is positive."
            )
        if sae.groups is not None:
            pass  # the Matryoshka sentence below covers the cap
        elif c.method == "mp" and cap <= k:
            same.append(
                f"Step cap: ours takes at most max_iter = {cap} steps and, as {cap} <= k = {k}, never "
                f"reaches a (k+1)-th atom; stock max_iterations = {steps} steps: the same rule."
            )
        elif c.method == "mp":
            flip = " (a re-pick with the other sign is the same atom)" if sae.signed else ""
            held = (
                f"holds at most k = {k} distinct atoms and usually k"
                if not c.reference_rules
                else f"usually holds k = {k} distinct atoms, and k + 1 where that (k+1)-th atom brought the residual "
                "under rtol or came at the last step (KSVD.jl's rules, which test the residual first)"
            )
            diff.append(
                f"Step cap: ours takes up to max_iter = {cap} steps, re-picking atoms, until a (k+1)-th "
                f"distinct atom enters{flip} (it then drops the smallest |coefficient| and stops), so it "
                f"{held}; stock counts steps: max_iterations = "
                f"{steps}, so on rows where ours re-picks an atom stock stops earlier, with fewer atoms and "
                "a different code."
            )
        if c.method == "omp":
            diff.append(
                f"OMP: ours re-fits all coefficients by least squares on the support after every pick "
                f"(Batch-OMP), so its residual is orthogonal to the chosen atoms, it never re-picks one and "
                f"holds up to k = {k} distinct atoms; stock takes max_iterations = {steps} greedy steps with "
                "the correlations as coefficients (no refit) and holds fewer atoms where it re-picks one: "
                "its later picks and all coefficients differ."
            )
        elif c.refit:
            diff.append(
                "Refit: ours re-solves least squares on the final support (non-negative: active set), so "
                "its coefficients are the least-squares ones; stock keeps the greedy sums (supports agree "
                "where the greedy steps do)."
            )
        else:
            same.append("Coefficients: no least-squares refit in either; a code is the sum of its greedy steps.")
        if c.rtol > 0:
            diff.append(
                f"Stop rule: ours also stops a row once ||r|| <= rtol * ||x - b_dec|| (relative, rtol = "
                f"{c.rtol}); stock can only stop on an absolute ||r|| < residual_threshold, which the "
                "export disables (0.0: no absolute threshold matches a relative one when ||x|| varies; "
                "rtol x a quantile of ||x|| agreed worse than none). Rows ours stops early take further "
                f"steps in stock (lower error, L0 up to max_iterations = {steps})."
            )
        else:
            same.append("Stop rule: neither has a residual stop (rtol = 0, residual_threshold = 0.0).")
        diff.append(
            "Arithmetic: ours updates correlations through the Gram matrix (c <- c - a G[j]) in fp32 "
            "whatever the SAE's dtype; stock recomputes r @ W_dec^T every step in the SAE's dtype. In fp32 "
            "codes agree to float rounding (~1e-7 relative), supports except at exact near-ties; cast to "
            "bf16 (as SAEBench does), stock runs in bf16."
        )
        if sae.signed:
            diff.append(
                f"Signed ± split: ours holds one signed coefficient per atom over K = {K} atoms; stock codes "
                f"non-negative latents over the 2K = {2 * K} exported atoms [D; -D]. Where a row re-picks an "
                "atom with the other sign, stock adds to the other half, so latents j and j + K are both "
                "active (their difference is our signed coefficient) where ours has one: the "
                "reconstruction and the net signed code latents[:K] - latents[K:] are the same, the split "
                "latents and their L0 are not."
            )
        if sae.groups is not None:
            budgets = [g.budget for g in sae.groups]
            diff.append(
                f"Matryoshka: ours codes group by group with budgets {budgets} over atom ranges "
                f"{[[g.start, g.end] for g in sae.groups]}, each group coding the residual the earlier ones "
                f"left (up to B = {sum(budgets)} atoms); stock codes over all atoms at once with "
                f"max_iterations = {steps} steps, picking the largest correlation anywhere, so its supports "
                "differ from ours on almost every row."
            )
    else:
        same.append("Decoder: W_dec and b_dec are ours; decoding a code gives our reconstruction.")
        kmax = code_cap(sae)
        diff.append(
            f"Encoder: stock 'topk' keeps the k = {k} largest of relu((x - b_dec) @ W_enc), W_enc = "
            f"W_dec^T, in one shot with the raw correlations as coefficients; ours is {ours}, whose later "
            "atoms explain what earlier ones left: different supports and coefficients, worse "
            "reconstruction in stock (an approximation; stock 'matching_pursuit' is closer)."
        )
        if sae.groups is not None:
            stop = f"after each group's budget (B = {kmax} atoms in all), "
        elif c.method == "mp":
            stop = f"after max_iter = {cap} steps, " + ("" if cap <= k else "at k distinct atoms, ")
        else:
            stop = f"after k = {k} atoms, "
        diff.append(
            f"Step cap / L0: ours stops {stop}or when no correlation is positive (L0 <= {kmax}); stock "
            f"topk always keeps k = {k} (fewer only where correlations are <= 0)."
        )
        if c.rtol > 0:
            diff.append(
                f"Stop rule: ours also stops a row once ||r|| <= rtol * ||x - b_dec|| (relative, rtol = "
                f"{c.rtol}); stock topk has no residual stop."
            )
        if c.method == "omp":
            diff.append(
                "OMP: ours re-fits all coefficients by least squares after every pick; stock uses the raw correlations."
            )
        elif c.refit:
            diff.append(
                "Refit: ours re-solves least squares on the final support (non-negative: active set), so "
                "its coefficients are the least-squares ones; stock keeps the raw correlations."
            )
        if sae.signed:
            diff.append(
                f"Signed ± split: ours codes with signed coefficients over K = {K} atoms, picking by "
                f"|correlation|, and is exported as W_dec = [D; -D] (width 2K = {2 * K}) with codes "
                "[relu(x), relu(-x)]; stock topk ranks the 2K split correlations as independent atoms."
            )
        if sae.groups is not None:
            budgets = [g.budget for g in sae.groups]
            diff.append(
                f"Matryoshka: ours codes group by group with budgets {budgets} over atom ranges "
                f"{[[g.start, g.end] for g in sae.groups]}; stock ignores the groups and codes over all "
                "atoms."
            )
    if c.candidates is not None and c.candidates < K:
        diff.append(
            f"Candidates: ours restricts its greedy loop to each row's {c.candidates} largest "
            "correlations (approximate); stock searches all atoms."
        )
    if c.precision != "fp32":
        diff.append(
            f"Precision: ours computes the initial correlations at {c.precision} (approximate); stock at "
            "the SAE's dtype."
        )
    same.append(centring)
    return diff, same


# ---------------------------------------------------------------------------------------------- agreement
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


def closer(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether agreement ``a`` is closer to our encoder than ``b``: lower mean relative reconstruction
    difference, ties broken by more identical supports."""
    return (a["recon_rel_diff_mean"], -a["identical_support"]) < (b["recon_rel_diff_mean"], -b["identical_support"])


def _verify_fidelity(
    sae: DictionarySAE, fidelity: str, agreement: dict[str, float], min_support_agreement: float
) -> str | None:
    """Why the sample contradicts an EXACT / EXACT_RECONSTRUCTION claim (``None``: it does not)."""
    key = {EXACT: "identical_support", EXACT_RECONSTRUCTION: "identical_signed_support"}.get(fidelity)
    if key is None or agreement[key] >= min_support_agreement:
        return None
    return (
        f"measured on the export sample: {key} = {agreement[key]:.4f} on {agreement['rows']} rows < "
        f"{min_support_agreement}, so the '{fidelity}' claim does not hold there."
    )


# ---------------------------------------------------------------------------------------------- export
def _folder(
    sae: DictionarySAE,
    architecture: str,
    fidelity: str,
    gaps: list[str],
    extra_metadata: dict[str, Any] | None,
    agreement: dict[str, Any] | None = None,
    alternatives: dict[str, Any] | None = None,
    chosen_by: str | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(cfg, tensors)`` of an export declaring ``architecture`` with ``stock_fidelity = fidelity``."""
    import sae_lens

    c = sae.cfg
    differences, matches = describe_stock_encoder(sae, architecture)
    stock: dict[str, Any] = {
        "architecture": architecture,
        "class": {TOPK: "TopKSAE", MATCHING_PURSUIT: "MatchingPursuitSAE", ARCHITECTURE: "DBKSVDSAE"}[architecture],
        "settings": _mp_settings(sae)
        if architecture == MATCHING_PURSUIT
        else ({"k": int(sae.coder.k)} if architecture == TOPK else {}),
        "why_not_exact": gaps,
        "criterion": MP_CRITERION,
        "exact_criterion": EXACT_CRITERION,
        **({"chosen_by": chosen_by} if chosen_by else {}),
    }
    note = {TOPK: ENCODER_NOTE, ARCHITECTURE: DBKSVD_ENCODER_NOTE}.get(architecture) or MP_ENCODER_NOTES[fidelity]
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
        "encoder_note": note,
        "exact_loader": EXACT_LOADER,
        "stock_fidelity": fidelity,
        "stock_encoder": stock,
        "differences": differences,
        "matches": matches,
        **({"stock_agreement": agreement} if agreement is not None else {}),
        **({"stock_alternatives": alternatives} if alternatives else {}),
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
        cfg.update(_mp_settings(sae))
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


def _fresh(stage: Path) -> Path:
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    return stage


def save_sae_lens(
    sae: DictionarySAE,
    path: str | os.PathLike,
    *,
    architecture: str = "auto",
    extra_metadata: dict[str, Any] | None = None,
    sample: Tensor | None = None,
    min_support_agreement: float = MIN_SUPPORT_AGREEMENT,
) -> Path:
    """Write ``sae`` as a sae-lens 6.x folder: ``cfg.json`` + ``sae_weights.safetensors``.

    Args:
        sae: the dictionary SAE.
        path: the folder. Both files are written into a staging folder ``.<name>.tmp-<pid>`` beside it and then
            renamed into place, so a reader never sees a half-written export.
        architecture: ``"auto"`` (default): the closest stock encoder, ``"matching_pursuit"``
            (:func:`choose_architecture`; ``metadata.stock_fidelity`` by :func:`stock_fidelity`). ``"topk"`` /
            ``"matching_pursuit"`` force that stock architecture (the differences are stated either way);
            ``"dbksvd"`` declares the registered exact class (needs this module imported to load).
        extra_metadata: merged into ``cfg.json``'s metadata.
        sample: optional activations ``(…, d)``; when given, the stock encoder of the written folder is loaded
            and compared with ours on them (:func:`encoder_agreement`, stored as ``metadata.stock_agreement``).
            With ``"auto"`` the other stock architecture is measured too (``metadata.stock_alternatives``) and
            declared instead if it is :func:`closer`. An ``"exact"`` / ``"exact_reconstruction"`` fidelity whose
            identical (net signed) support fraction on the sample falls below ``min_support_agreement`` is
            marked ``"approximate"``, the reason added to ``stock_encoder.why_not_exact``.

    Either way :func:`load_sae_lens` gives the exact coder.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = choose_architecture(sae) if architecture == "auto" else architecture

    def plan(a: str) -> tuple[str, list[str]]:
        if a == TOPK:
            return APPROXIMATE, [
                "architecture 'topk': stock encodes with the top-k of the correlations in one "
                "shot, not by sparse coding."
            ] + why_not_exact(sae)
        return stock_fidelity(sae, a), ([] if a == ARCHITECTURE else why_not_exact(sae))

    fidelity, gaps = plan(arch)
    stage = path.parent / f".{path.name}.tmp-{os.getpid()}"
    alt_stage = path.parent / f".{path.name}.tmp-{os.getpid()}-alt"
    try:
        _fresh(stage)
        cfg, tensors = _folder(sae, arch, fidelity, gaps, extra_metadata)
        _write(stage, cfg, tensors)
        if sample is not None and arch != ARCHITECTURE:
            from sae_lens import SAE

            agreement = encoder_agreement(sae, SAE.load_from_disk(str(stage)), sample)
            alternatives, chosen_by = {}, None
            if architecture == "auto":
                other = TOPK if arch == MATCHING_PURSUIT else MATCHING_PURSUIT
                alt_fidelity, alt_gaps = plan(other)
                _fresh(alt_stage)
                _write(alt_stage, *_folder(sae, other, alt_fidelity, alt_gaps, extra_metadata))
                alt = encoder_agreement(sae, SAE.load_from_disk(str(alt_stage)), sample)
                if closer(alt, agreement):
                    alternatives = {arch: agreement}
                    arch, fidelity, gaps, agreement = other, alt_fidelity, alt_gaps, alt
                    shutil.rmtree(stage)
                    os.rename(alt_stage, stage)
                else:
                    alternatives = {other: alt}
                ((lost, against),) = alternatives.items()
                chosen_by = (
                    f"measured on the export sample ({agreement['rows']} rows): mean relative "
                    f"reconstruction difference {arch} {agreement['recon_rel_diff_mean']:.3g} vs {lost} "
                    f"{against['recon_rel_diff_mean']:.3g}."
                )
            why = _verify_fidelity(sae, fidelity, agreement, min_support_agreement)
            if why is not None:
                fidelity, gaps = APPROXIMATE, gaps + [why]
            cfg, _ = _folder(sae, arch, fidelity, gaps, extra_metadata, agreement, alternatives, chosen_by)
            atomic_write_text(stage / CFG_FILE, json.dumps(cfg, indent=2))
        _publish(stage, path)
    finally:
        for s in (stage, alt_stage):
            if s.exists():
                shutil.rmtree(s, ignore_errors=True)
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
    ``W_dec[:K]``, centre = ``b_dec``, coder and groups from ``metadata.dbksvd_coder``; ``kwargs`` go to
    :class:`DictionarySAE`."""
    path = Path(path)
    cfg = json.loads((path / CFG_FILE).read_text())
    meta = cfg.get("metadata") or {}
    if CODER_KEY not in meta:
        raise ValueError(f"{path} is not a DB-KSVD export: metadata.{CODER_KEY} is missing.")
    coder = dict(meta[CODER_KEY])
    coder.pop("signed")
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

__all__ = [
    "save_sae_lens",
    "load_sae_lens",
    "load_dictionary_sae",
    "dbksvd_disk_loader",
    "encoder_agreement",
    "closer",
    "why_not_exact",
    "stock_fidelity",
    "stock_max_iterations",
    "describe_stock_encoder",
    "choose_architecture",
    "step_cap",
    "code_cap",
    "CODER_KEY",
    "ENCODER_NOTE",
    "MP_ENCODER_NOTES",
    "MP_CRITERION",
    "EXACT_CRITERION",
    "EXACT",
    "EXACT_RECONSTRUCTION",
    "APPROXIMATE",
    "TOPK",
    "MATCHING_PURSUIT",
]
