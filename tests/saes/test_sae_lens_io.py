"""sae-lens export of a dictionary: every coder as sae-lens's native matching_pursuit (the closest stock encoder;
exact for non-negative plain MP with a step cap <= k and no relative stop, exact in reconstruction for the signed
± split, an approximation otherwise, each measured against stock topk built here from the same W_dec), the
difference records, the sample check, the exact loaders, and the staged (temp then rename) write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.dictionary import CoderSettings, Dictionary
from pipeline.core.learner import learn_dictionary
from pipeline.core.matryoshka import matryoshka_groups, total_budget
from pipeline.core.synthetic import planted_problem
from pipeline.saes import sae_lens_io
from pipeline.saes.dictionary_sae import DictionarySAE
from pipeline.saes.sae_lens_io import EXACT_LOADER, load_dictionary_sae, load_sae_lens, save_sae_lens
from pipeline.saes.stock_encoder import (
    APPROXIMATE,
    EXACT,
    EXACT_RECONSTRUCTION,
    MATCHING_PURSUIT,
    differences,
    encoder_agreement,
    stock_fidelity,
)

D_IN, N_ATOMS, K_SPARSE = 64, 256, 5
#: Exact case (plain MP, max_iter = k, rtol = 0) on the planted problem below: measured 1.0000 identical supports
#: and 1.3e-7 mean (3.9e-7 max) relative reconstruction difference; asserted with room for float near-ties.
MIN_IDENTICAL = 0.995
MAX_REL_DIFF = 1e-5
#: Default coder (4k steps, k distinct atoms, rtol 0.05) on the planted problem below against stock MP with
#: max_iterations = k: measured 0.9365 identical supports, 5.2e-2 mean relative reconstruction difference (0.945 /
#: 5.0e-2 on 4000 rows, 0.92-0.94 / 4.3-4.9e-2 on fitted dictionaries; module docstring). Floors with margin:
DEFAULT_MIN_IDENTICAL = 0.90
DEFAULT_MAX_REL_DIFF = 0.08
#: Stock topk on the same problems: 0.03-0.05 identical supports, 0.53-0.60 mean relative difference.
TOPK_MAX_IDENTICAL = 0.10
TOPK_MIN_REL_DIFF = 0.40
#: Signed default coder against stock MP over the ± split: measured 0.863 split supports, 9.2e-2 mean relative.
SIGNED_DEFAULT_MAX_REL_DIFF = 0.15


@pytest.fixture(scope="module")
def planted():
    return planted_problem(d=D_IN, n_atoms=N_ATOMS, k=K_SPARSE, n=2000, nonnegative=True, snr_db=20, seed=0)


@pytest.fixture(scope="module")
def planted_signed():
    return planted_problem(d=D_IN, n_atoms=N_ATOMS, k=K_SPARSE, n=2000, nonnegative=False, snr_db=20, seed=0)


def _sae(atoms, centre=None, groups=None, **coder) -> DictionarySAE:
    coder = {"k": K_SPARSE, "max_iter": K_SPARSE, "rtol": 0.0} | coder
    return DictionarySAE(Dictionary(atoms, CoderSettings(**coder), centre=centre, groups=groups), "tiny-test", 3)


def _cfg(path: Path) -> dict:
    return json.loads((path / "cfg.json").read_text())


def _stock(path: Path):
    from sae_lens import SAE

    return SAE.load_from_disk(str(path))


def _stock_topk(sae: DictionarySAE):
    """Stock sae-lens topk over the dictionary's exported decoder (``W_enc = W_decᵀ``, ``b_dec`` ours): the other
    stock encoder an export could have declared (the top-k of the correlations, in one shot)."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    W = sae.W_dec.detach().float()
    stock = TopKSAE(TopKSAEConfig(d_in=W.shape[1], d_sae=W.shape[0], k=K_SPARSE, apply_b_dec_to_input=True))
    with torch.no_grad():
        stock.W_dec.copy_(W)
        stock.W_enc.copy_(W.T)
        stock.b_dec.copy_(sae.b_dec.detach().float())
        stock.b_enc.zero_()
    return stock


def _closer(a: dict, b: dict) -> bool:
    """Agreement ``a`` is closer to our encoder than ``b``: lower mean relative reconstruction difference."""
    return a["recon_rel_diff_mean"] < b["recon_rel_diff_mean"]


def _aspects(meta: dict) -> dict[str, dict]:
    return {d["aspect"]: d for d in meta["differences"]}


def _support_and_recon(sae: DictionarySAE, ours: torch.Tensor, theirs: torch.Tensor, x: torch.Tensor):
    same = ((ours != 0) == (theirs != 0)).all(dim=-1)
    W, b = sae.W_dec.detach(), sae.b_dec.detach()
    rel = ((ours - theirs) @ W).norm(dim=-1) / (x - b).norm(dim=-1)
    return float(same.float().mean()), rel


def _exact_loaders_agree(path: Path, sae: DictionarySAE, x: torch.Tensor) -> None:
    ours = sae.encode(x)
    assert type(load_sae_lens(path)).__name__ == "DBKSVDSAE"
    assert torch.equal(load_sae_lens(path).encode(x), ours)
    assert torch.equal(load_dictionary_sae(path).encode(x), ours)


# ---------------------------------------------------------------------------------------------- exact case
@pytest.mark.parametrize("centred", [False, True])
def test_exact_mp_exports_as_stock_matching_pursuit(tmp_path, planted, centred):
    from sae_lens.saes.matching_pursuit_sae import MatchingPursuitSAE

    centre = torch.randn(D_IN, generator=torch.Generator().manual_seed(5)) if centred else None
    x = planted.Y + (centre if centred else 0)
    sae = _sae(planted.D, centre)
    assert differences(sae) == [] and stock_fidelity(differences(sae)) == EXACT
    path = save_sae_lens(sae, tmp_path / "mp")
    cfg = _cfg(path)
    assert cfg["architecture"] == MATCHING_PURSUIT and cfg["k"] == K_SPARSE
    assert cfg["max_iterations"] == K_SPARSE and cfg["residual_threshold"] == 0.0
    assert cfg["stop_on_duplicate_support"] is False
    assert cfg["metadata"]["stock_fidelity"] == EXACT
    assert set(load_file(str(path / "sae_weights.safetensors"))) == {"W_dec", "b_dec"}

    stock = _stock(path)
    assert type(stock) is MatchingPursuitSAE
    assert stock.cfg.max_iterations == K_SPARSE and stock.cfg.residual_threshold == 0.0
    ours = sae.encode(x)
    with torch.no_grad():
        theirs = stock.encode(x)
    identical, rel = _support_and_recon(sae, ours, theirs, x)
    assert identical >= MIN_IDENTICAL, identical
    assert float(rel.mean()) < MAX_REL_DIFF, float(rel.mean())
    assert int((theirs != 0).sum(-1).max()) <= K_SPARSE
    # decode of the same codes: identical
    with torch.no_grad():
        assert torch.equal(stock.decode(ours), sae.decode(ours))
    # the exact loaders: the registered class and the DictionarySAE itself, bit-identical encode
    _exact_loaders_agree(path, sae, x)
    back = load_dictionary_sae(path)
    assert isinstance(back, DictionarySAE) and back.has_centre == centred
    assert torch.equal(back.atoms, sae.atoms) and back.coder == sae.coder
    assert back.cfg.hook_layer == 3 and back.cfg.hook_name == sae.cfg.hook_name


def test_fitted_dictionary_agrees(tmp_path):
    train = planted_problem(d=32, n_atoms=64, k=4, n=3000, nonnegative=True, snr_db=20, seed=1)
    d = learn_dictionary(train.Y, 64, 4, max_iters=4, progress=False, device="cpu", max_iter=4, rtol=0.0)
    sae = DictionarySAE(d, "tiny-test", 1)
    path = save_sae_lens(sae, tmp_path / "fitted")
    assert _cfg(path)["architecture"] == MATCHING_PURSUIT and _cfg(path)["metadata"]["stock_fidelity"] == EXACT
    x = planted_problem(d=32, n_atoms=64, k=4, n=1000, nonnegative=True, snr_db=20, seed=2).Y
    with torch.no_grad():
        identical, rel = _support_and_recon(sae, sae.encode(x), _stock(path).encode(x), x)
    assert identical >= MIN_IDENTICAL and float(rel.mean()) < MAX_REL_DIFF, (identical, float(rel.mean()))


# ---------------------------------------------------------------------------------------------- approximations
def test_default_coder_exports_as_matching_pursuit_closer_than_topk(tmp_path, planted):
    """The default coder (step cap 4k > k, k distinct atoms, relative stop) is not reproducible by stock MP, but
    stock MP with max_iterations = k is far closer to it than stock topk."""
    sae = _sae(planted.D, max_iter=None, rtol=0.05)
    path = save_sae_lens(sae, tmp_path / "default")
    cfg = _cfg(path)
    meta = cfg["metadata"]
    assert cfg["architecture"] == MATCHING_PURSUIT and cfg["max_iterations"] == K_SPARSE
    assert meta["stock_fidelity"] == APPROXIMATE
    assert meta["differences"] == [
        {"aspect": "step_cap", "max_iter": 20, "k": 5, "reference_rules": False, "stock_max_iterations": 5},
        {"aspect": "relative_stop", "rtol": 0.05, "stock_residual_threshold": 0.0},
    ]

    mp = encoder_agreement(sae, _stock(path), planted.Y)
    assert DEFAULT_MIN_IDENTICAL <= mp["identical_support"] < MIN_IDENTICAL, mp  # close, not exact
    assert mp["recon_rel_diff_mean"] <= DEFAULT_MAX_REL_DIFF, mp
    assert mp["l0_stock"] <= K_SPARSE
    topk = encoder_agreement(sae, _stock_topk(sae), planted.Y)
    assert topk["identical_support"] <= TOPK_MAX_IDENTICAL and topk["recon_rel_diff_mean"] >= TOPK_MIN_REL_DIFF
    assert _closer(mp, topk)
    # a larger stock step cap (our 4k) is far worse: the k-step cap is what makes stock MP close
    forced = json.loads((path / "cfg.json").read_text())
    forced["max_iterations"] = 4 * K_SPARSE
    (path / "cfg.json").write_text(json.dumps(forced))
    far = encoder_agreement(sae, _stock(path), planted.Y)
    assert far["identical_support"] < 0.05 and far["l0_stock"] > K_SPARSE, far


@pytest.mark.parametrize("max_iter", [K_SPARSE, None])
def test_signed_exports_as_matching_pursuit_over_the_split(tmp_path, planted_signed, max_iter):
    x = planted_signed.Y
    sae = _sae(planted_signed.D, nonnegative=False, max_iter=max_iter)
    path = save_sae_lens(sae, tmp_path / "signed")
    cfg = _cfg(path)
    meta = cfg["metadata"]
    assert cfg["architecture"] == MATCHING_PURSUIT and cfg["d_sae"] == 2 * N_ATOMS
    assert cfg["max_iterations"] == K_SPARSE
    weights = load_file(str(path / "sae_weights.safetensors"))
    assert torch.equal(weights["W_dec"], torch.cat([planted_signed.D, -planted_signed.D]))
    assert _aspects(meta)["signed_split"] == {"aspect": "signed_split", "atoms": N_ATOMS, "latents": 2 * N_ATOMS}
    stock = _stock(path)
    assert type(stock).__name__ == "MatchingPursuitSAE"
    agreement = encoder_agreement(sae, stock, x)
    if max_iter == K_SPARSE:
        # reconstruction and net signed code reproduced; the split latents differ where a sign flips
        assert meta["stock_fidelity"] == EXACT_RECONSTRUCTION and list(_aspects(meta)) == ["signed_split"]
        assert agreement["recon_rel_diff_mean"] < MAX_REL_DIFF and agreement["recon_rel_diff_max"] < 1e-4, agreement
        assert agreement["identical_signed_support"] >= MIN_IDENTICAL, agreement
        assert agreement["identical_support"] < 0.99, agreement  # measured 0.913: the stated split difference
        with torch.no_grad():
            theirs = stock.encode(x)
        net = theirs[:, :N_ATOMS] - theirs[:, N_ATOMS:]
        signed = sae.encode_sparse(x).to_dense(N_ATOMS)
        assert torch.allclose(net, signed, atol=1e-5)
    else:
        assert meta["stock_fidelity"] == APPROXIMATE
        assert agreement["recon_rel_diff_mean"] <= SIGNED_DEFAULT_MAX_REL_DIFF, agreement
        topk = encoder_agreement(sae, _stock_topk(sae), x)
        assert topk["recon_rel_diff_mean"] >= TOPK_MIN_REL_DIFF and _closer(agreement, topk), (agreement, topk)
    _exact_loaders_agree(path, sae, x[:300])


STEP_CAP_20 = {"aspect": "step_cap", "max_iter": 20, "k": 5, "reference_rules": False, "stock_max_iterations": 5}


@pytest.mark.parametrize(
    "coder, records, steps",
    [
        (dict(refit=True), [{"aspect": "refit"}], K_SPARSE),
        (dict(refit=True, max_iter=None), [{"aspect": "refit"}, STEP_CAP_20], K_SPARSE),
        (dict(method="omp", max_iter=None), [{"aspect": "omp"}], K_SPARSE),
        (dict(max_iter=None, candidates=16), [{"aspect": "candidates", "candidates": 16}, STEP_CAP_20], K_SPARSE),
        (dict(max_iter=None, precision="bf16"), [STEP_CAP_20, {"aspect": "precision", "precision": "bf16"}], K_SPARSE),
        (dict(max_iter=3), [], 3),
    ],
)
def test_other_coders_export_as_approximate_matching_pursuit(tmp_path, planted, coder, records, steps):
    sae = _sae(planted.D, **coder)
    path = save_sae_lens(sae, tmp_path / "mp")
    cfg = _cfg(path)
    meta = cfg["metadata"]
    assert cfg["architecture"] == MATCHING_PURSUIT and cfg["max_iterations"] == steps
    assert type(_stock(path)).__name__ == "MatchingPursuitSAE"
    assert meta["differences"] == records
    assert meta["stock_fidelity"] == (EXACT if not records else APPROXIMATE)
    # matching pursuit measures closer than topk on the planted problem
    x = planted.Y[:500]
    mp = encoder_agreement(sae, _stock(path), x)
    topk = encoder_agreement(sae, _stock_topk(sae), x)
    assert _closer(mp, topk) and mp["recon_rel_diff_mean"] < 0.5 * topk["recon_rel_diff_mean"], (mp, topk)
    _exact_loaders_agree(path, sae, planted.Y[:300])


@pytest.mark.parametrize("nonnegative", [True, False])
def test_matryoshka_exports_as_matching_pursuit(tmp_path, nonnegative):
    p = planted_problem(d=D_IN, n_atoms=N_ATOMS, k=K_SPARSE, n=600, nonnegative=nonnegative, snr_db=20, seed=0)
    groups = matryoshka_groups(N_ATOMS, K_SPARSE, 5)
    sae = DictionarySAE(Dictionary(p.D, CoderSettings(k=K_SPARSE, nonnegative=nonnegative), groups=groups), "m", 0)
    path = save_sae_lens(sae, tmp_path / "mat")
    cfg = _cfg(path)
    meta = cfg["metadata"]
    assert cfg["architecture"] == MATCHING_PURSUIT and cfg["max_iterations"] == total_budget(groups) == 8
    assert meta["stock_fidelity"] == APPROXIMATE
    record = _aspects(meta)["matryoshka"]
    assert record["budgets"] == [g.budget for g in groups] and sum(record["budgets"]) == 8
    assert record["ranges"] == [[g.start, g.end] for g in groups]
    # measured: stock MP 0.42-0.43 mean relative difference, topk 0.61-0.67; supports differ everywhere
    mp = encoder_agreement(sae, _stock(path), p.Y)
    topk = encoder_agreement(sae, _stock_topk(sae), p.Y)
    assert _closer(mp, topk) and mp["recon_rel_diff_mean"] < 0.5 and topk["recon_rel_diff_mean"] > 0.55, (mp, topk)
    _exact_loaders_agree(path, sae, p.Y[:40])


def test_metadata_is_structured(tmp_path, planted):
    """Every field the export adds is data (a JSON round trip of what the code computed), none is prose."""
    sae = _sae(planted.D)
    exact = _cfg(save_sae_lens(sae, tmp_path / "a"))["metadata"]
    assert exact["stock_fidelity"] == EXACT and exact["differences"] == []
    assert exact["stock_encoder"] == {
        "architecture": MATCHING_PURSUIT,
        "class": "MatchingPursuitSAE",
        "settings": {"max_iterations": 5, "residual_threshold": 0.0, "stop_on_duplicate_support": False},
    }
    assert (
        exact["exact_loader"]
        == EXACT_LOADER
        == {
            "function": "pipeline.saes.sae_lens_io.load_sae_lens",
            "sae_lens_architecture": "dbksvd",
        }
    )
    assert exact["dbksvd_coder"] == sae.coder_metadata() and exact["dbksvd_centre"] is False
    for key in ("sae_lens_version", "hook_layer", "hook_name", "model_name"):
        assert key in exact, key
    rtol = _cfg(save_sae_lens(_sae(planted.D, rtol=0.05), tmp_path / "b"))["metadata"]
    assert rtol["stock_fidelity"] == APPROXIMATE  # the relative stop can end a row early
    assert rtol["differences"] == [{"aspect": "relative_stop", "rtol": 0.05, "stock_residual_threshold": 0.0}]
    exact_class = _cfg(save_sae_lens(sae, tmp_path / "c", architecture="dbksvd"))
    assert exact_class["architecture"] == "dbksvd" and exact_class["metadata"]["stock_fidelity"] == EXACT
    with pytest.raises(ValueError, match="architecture must be one of"):
        save_sae_lens(sae, tmp_path / "d", architecture="topk")


# ---------------------------------------------------------------------------------------------- sample
def test_sample_measures_agreement_and_can_withdraw_an_exact_claim(tmp_path, planted):
    sae = _sae(planted.D)
    path = save_sae_lens(sae, tmp_path / "measured", sample=planted.Y[:500])
    cfg = _cfg(path)
    meta = cfg["metadata"]
    agreement = meta["stock_agreement"]
    assert cfg["architecture"] == MATCHING_PURSUIT and meta["stock_fidelity"] == EXACT and agreement["rows"] == 500
    assert agreement["identical_support"] >= MIN_IDENTICAL and agreement["recon_rel_diff_mean"] < MAX_REL_DIFF
    assert meta["differences"] == []
    # a sample on which the exact claim misses the bar marks the export approximate, saying what was measured
    path = save_sae_lens(sae, tmp_path / "gated", sample=planted.Y[:500], min_support_agreement=1.01)
    meta = _cfg(path)["metadata"]
    assert _cfg(path)["architecture"] == MATCHING_PURSUIT and meta["stock_fidelity"] == APPROXIMATE
    (record,) = meta["differences"]
    assert record == {
        "aspect": "sample",
        "measured": "identical_support",
        "value": meta["stock_agreement"]["identical_support"],
        "rows": 500,
        "min_support_agreement": 1.01,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gated", "measured"]  # no staging folder left


# ---------------------------------------------------------------------------------------------- staged write
def test_staged_write(tmp_path, planted, monkeypatch):
    mp_sae = _sae(planted.D)

    # a failed first write leaves nothing behind: no folder, no staging folder
    def boom(*a, **k):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(sae_lens_io, "save_file", boom)
        with pytest.raises(RuntimeError):
            save_sae_lens(mp_sae, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # an existing export survives a failed rewrite intact
    path = save_sae_lens(mp_sae, tmp_path / "out", architecture="dbksvd")
    (path / "README.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(sae_lens_io, "save_file", boom)
        with pytest.raises(RuntimeError):
            save_sae_lens(mp_sae, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a successful rewrite switches the layout (dbksvd -> matching_pursuit) and keeps foreign files
    save_sae_lens(mp_sae, path)
    assert type(_stock(path)).__name__ == "MatchingPursuitSAE"
    assert (path / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "cfg.json", "sae_weights.safetensors"]


def test_reference_rules_export_with_k_plus_one_codes(tmp_path, planted_signed):
    """A dictionary coding with KSVD.jl's rules (signed, k + 1 wide codes): the SAE wrapper gives up to k + 1
    active latents, the export states the rule, and the exact loaders reproduce the k + 1 codes."""
    x = planted_signed.Y[:400]
    sae = _sae(planted_signed.D, nonnegative=False, max_iter=None, rtol=0.3, reference_rules=True)
    l0 = (sae.encode(x) != 0).sum(-1)
    assert int(l0.max()) == K_SPARSE + 1 and int((l0 == K_SPARSE + 1).sum()) > 0
    assert sae.encode_sparse(x).k == K_SPARSE + 1
    path = save_sae_lens(sae, tmp_path / "ref")
    meta = _cfg(path)["metadata"]
    assert meta["stock_fidelity"] == APPROXIMATE
    assert _aspects(meta)["step_cap"]["reference_rules"] is True
    _exact_loaders_agree(path, sae, x[:200])
    assert load_dictionary_sae(path).coder.reference_rules
