"""The ``reference`` mode against independent transcriptions of KSVD.jl (``docs/reference-implementation.md``).

* Matching pursuit with ``reference_rules``: KSVD.jl's ``matching_pursuit_`` transcribed sample by sample (explicit
  residual, a dict of coefficients, its order of tests), compared code by code, including the rows that keep
  k + 1 atoms and those that drop one.
* The Matryoshka loop: KSVD.jl's ``ksvd_loop!(::MatryoshkaLoop, ...)`` transcribed with numpy SVDs for the
  rank-1 refits (one Jacobi batch per group, so the atom order cannot matter) and the MP transcription for the
  re-coding, against one learner iteration.
* The schedule: contiguous batches with the partial last one skipped, the saved coder's evaluation refit, and
  the ``dictionary=reference`` preset equal to ``PAPER_SCHEDULE``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.coders import encode
from pipeline.core.learner import PAPER_SCHEDULE, learn_dictionary
from pipeline.core.learner_config import LearnerConfig


# ------------------------------------------------------------------------------------- transcriptions
def ksvdjl_mp(y: np.ndarray, D: np.ndarray, k: int, rtol: float, max_iter: int) -> dict[int, float]:
    """KSVD.jl's ``matching_pursuit_`` for one sample ``y: (d,)`` over atoms ``D: (K, d)`` (rows), as its loop
    reads: residual test, then support test (drop the smallest |coefficient|), then the pick."""
    G = D @ D.T
    r, c, x = y.copy(), D @ y, {}
    norm_y = np.linalg.norm(y)
    for _ in range(max_iter):
        if np.linalg.norm(r) == 0 or np.linalg.norm(r) / norm_y < rtol:
            return x
        if len(x) > k:
            del x[min(x, key=lambda j: abs(x[j]))]
            return x
        j = int(np.argmax(np.abs(c)))
        a = c[j]
        r = r - a * D[j]
        c = c - a * G[:, j]
        x[j] = x.get(j, 0.0) + a
    return x


def ksvd_group_update(E: np.ndarray, Dg: np.ndarray, Xg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One Jacobi batch of exact K-SVD refits over a whole group: every atom j with samples ω_j is refitted to
    the top singular pair of ``E[ω_j] − X[ω_j] Dgᵀ + x_j d_jᵀ`` using the old atoms and codes. ``E: (n, d)``,
    ``Dg: (m, d)``, ``Xg: (n, m)`` dense. Returns new ``(Dg, Xg)``."""
    R = E - Xg @ Dg
    D_new, X_new = Dg.copy(), Xg.copy()
    for j in range(Dg.shape[0]):
        w = np.nonzero(Xg[:, j])[0]
        if w.size == 0:
            continue
        Ej = R[w] + np.outer(Xg[w, j], Dg[j])
        U, S, Vt = np.linalg.svd(Ej, full_matrices=False)
        D_new[j], X_new[w, j] = Vt[0], S[0] * U[:, 0]
    return D_new, X_new


def dense(x: dict[int, float], K: int) -> np.ndarray:
    out = np.zeros(K)
    for j, v in x.items():
        out[j] = v
    return out


def _problem(n: int = 400, d: int = 12, K: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(K, d, generator=g, dtype=torch.float64)
    D = D / D.norm(dim=1, keepdim=True)
    Y = torch.randn(n, d, generator=g, dtype=torch.float64)
    return Y, D


# ------------------------------------------------------------------------------------- the coder
@pytest.mark.parametrize("kernel", ["torch", "numba"])
@pytest.mark.parametrize(
    "rtol, max_iter, case",
    [
        (0.0, None, "drop"),  # no residual stop: a (k+1)-th atom enters and the smallest is dropped
        (0.3, None, "keep"),  # the (k+1)-th atom often brings the row under rtol: k + 1 kept (146 of 400)
        (0.0, 5, "cap"),  # the step cap right after the (k+1)-th atom: k + 1 kept
        (0.2, None, "mixed"),
    ],
)
def test_mp_reference_rules_equal_ksvdjl(rtol, max_iter, case, kernel):
    Y, D = _problem()
    k = 4
    codes = encode(Y, D, k, nonnegative=False, rtol=rtol, max_iter=max_iter, reference_rules=True, kernel=kernel)
    assert codes.k == k + 1
    ours = codes.to_dense(D.shape[0]).numpy()
    want = np.stack([dense(ksvdjl_mp(y, D.numpy(), k, rtol, max_iter or 4 * k), D.shape[0]) for y in Y.numpy()])
    np.testing.assert_array_equal(ours != 0, want != 0)  # the same support, row by row
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-10)
    l0 = (want != 0).sum(1)
    if case == "drop":
        assert l0.max() == k and (l0 == k).mean() > 0.9
    elif case in ("keep", "cap"):
        assert (l0 == k + 1).sum() >= 20, "the test data must exercise the k + 1 case"
    # our own rules never hold more than k, and agree wherever the reference holds at most k and did not stop
    # on the strict-vs-inclusive boundary
    ours_k = encode(Y, D, k, nonnegative=False, rtol=rtol, max_iter=max_iter)
    assert ours_k.k == k and int(ours_k.l0().max()) <= k


def test_mp_reference_rules_need_mp():
    Y, D = _problem(n=10)
    with pytest.raises(ValueError, match="method='mp'"):
        encode(Y, D, 3, method="omp", reference_rules=True)


# ------------------------------------------------------------------------------------- the Matryoshka loop
def test_matryoshka_reference_loop_equals_ksvdjl():
    """One iteration of ``matryoshka_loop="reference"`` = KSVD.jl's MatryoshkaLoop on the same atoms: code with
    all atoms, then per group: exact refits with the group's share of those codes against E, re-code the group
    on E with its budget, subtract. One Jacobi batch per group (``atom_batch_size = K``), so order is moot."""
    from pipeline.core.coders import gram
    from pipeline.core.learner import _iteration
    from pipeline.core.matryoshka import matryoshka_groups

    Y, D0 = _problem(n=600, d=10, K=32, seed=3)
    k, log2min = 6, 3
    groups = matryoshka_groups(32, k, log2min)  # 8, 8, 16 atoms; budget 2 each
    cfg = LearnerConfig.from_options(
        32,
        k,
        **{
            **PAPER_SCHEDULE,
            "matryoshka": log2min,
            "atom_batch_size": 32,
            "rank1_tol": 1e-13,
            "rank1_max_iters": 2000,
            "reseed": None,
            "progress": False,
        },
    )
    D = D0.clone()
    rec = _iteration(Y, D, gram(D), cfg, groups, 32, torch.Generator().manual_seed(0))

    Yn, Dn = Y.numpy(), D0.numpy().copy()
    X = np.stack([dense(ksvdjl_mp(y, Dn, k, 0.05, 4 * k), 32) for y in Yn])
    fvu_before = ((Yn - X @ Dn) ** 2).sum() / ((Yn - Yn.mean(0)) ** 2).sum()
    E = Yn.copy()
    for g in groups:
        Dg, Xg = ksvd_group_update(E, Dn[g.start : g.end], X[:, g.start : g.end])
        Dn[g.start : g.end] = Dg
        Xg = np.stack([dense(ksvdjl_mp(e, Dg, g.budget, 0.05, 4 * g.budget), g.end - g.start) for e in E])
        E = E - Xg @ Dg
    fvu_after = (E**2).sum() / ((Yn - Yn.mean(0)) ** 2).sum()

    cos = np.abs((D.numpy() * Dn).sum(1))  # atoms agree up to sign (an SVD's sign is arbitrary)
    assert cos.min() > 1 - 1e-8
    assert rec["fvu"] == pytest.approx(fvu_before, rel=1e-10)
    assert rec["fvu_after_update"] == pytest.approx(fvu_after, rel=1e-8)


def test_matryoshka_loops_differ():
    """The two loop orders are different algorithms (guards against the switch being ignored)."""
    Y, _ = _problem(n=600, d=10, K=32, seed=4)
    common = dict(matryoshka=3, max_iters=2, tol=None, progress=False, init="uniform", nonnegative=False)
    a = learn_dictionary(Y.float(), 32, 6, matryoshka_loop="cascade", **common)
    b = learn_dictionary(Y.float(), 32, 6, matryoshka_loop="reference", **common)
    assert not torch.allclose(a.atoms, b.atoms)


# ------------------------------------------------------------------------------------- the schedule
def test_contiguous_batches_skip_the_partial_last_one():
    from pipeline.core.batches import BatchSource

    Y = torch.arange(2500 * 3, dtype=torch.float32).reshape(2500, 3)
    cfg = LearnerConfig.from_options(8, 2, batch_size=1000, sample_order="contiguous")
    for epoch in (0, 1):
        batches = list(BatchSource(Y, cfg).epoch(epoch))
        assert [b[0, 0].item() for b in batches] == [0.0, 3000.0]  # rows 0-999, 1000-1999; 500 left over
        assert all(b.shape == (1000, 3) for b in batches)
    assert [b.shape[0] for b in BatchSource(Y, cfg).epoch(0, skip=1)] == [1000]


def test_reference_fit_trains_without_refit_and_saves_the_evaluation_refit():
    Y, _ = _problem(n=3000, d=12, K=40, seed=5)
    D = learn_dictionary(Y.float(), 40, 3, progress=False, **{**PAPER_SCHEDULE, "batch_size": 1000, "epochs": 2})
    assert len(D.history) == 6  # 3 contiguous batches x 2 epochs, one update each
    assert D.metadata["learner"]["coder"]["refit"] is False and D.coder.refit is True
    assert D.coder.reference_rules and not D.coder.nonnegative and D.code_width == 4
    codes = D.encode(Y.float())
    assert codes.k == 4 and int(codes.l0().max()) <= 4
    # the least-squares refit does not raise the error of the training coder's codes
    raw = D.encode(Y.float(), refit=False)
    err = lambda c: float((Y.float() - D.decode(c)).pow(2).sum())  # noqa: E731
    assert err(codes) <= err(raw) * (1 + 1e-5)


def test_reference_preset_is_the_paper_schedule():
    from tests.conftest import compose_config

    cfg = compose_config("dictionary=reference")
    node = cfg.dictionary
    for key, value in PAPER_SCHEDULE.items():
        got = node.coder[key] if key in node.coder else node[key]
        assert got == value, key
    for preset in ("gemma2b_paper", "pythia160m_paper"):
        paper = compose_config(f"experiment={preset}").dictionary
        assert paper.coder.reference_rules and paper.sample_order == "contiguous"
        assert paper.matryoshka_loop == "reference" and paper.eval_refit is True
        assert paper.coder.candidates is None and paper.coder.precision == "fp32"


def test_resume_identity_covers_the_reference_switches():
    """A checkpoint resumes only under the same reference switches; one written before they existed resumes under
    their defaults (what it ran with)."""
    from dataclasses import asdict

    from pipeline.core.checkpoint import _resume_identity

    now = asdict(LearnerConfig.from_options(8, 2))
    older = {key: v for key, v in now.items() if key not in ("matryoshka_loop", "sample_order")}
    older["coder"] = {key: v for key, v in now["coder"].items() if key != "reference_rules"}
    assert _resume_identity(older) == _resume_identity(now)
    for change in (dict(sample_order="contiguous"), dict(matryoshka_loop="reference"), dict(reference_rules=True)):
        other = asdict(LearnerConfig.from_options(8, 2, **change))
        assert _resume_identity(other) != _resume_identity(now), change
