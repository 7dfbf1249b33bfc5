"""The stand-ins for sklearn's binary scores in absorption's ``build_metrics_df``
(``pipeline.evals.metrics.binary_scores``).

Pinned to sklearn itself, bit for bit: every score equals sklearn's on random inputs shaped like SAEBench's (a
few to a thousand rows, rare and common positives, scores with ties, exact zeros, negative zeros, float32 and
float64), on the edge cases (no positive prediction, no positive label, one row), and SAEBench's whole
``build_metrics_df`` gives an equal frame with the stand-in in place; inputs it does not cover go to sklearn.
"""

from __future__ import annotations

import math
import struct
import warnings

import numpy as np
import pytest

from pipeline.evals.metrics.binary_scores import BinaryScores

sk_metrics = pytest.importorskip("sklearn.metrics")


def _same(a: float, b: float) -> bool:
    """Bit-identical floats (nan equal to nan)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and struct.pack("<d", a) == struct.pack("<d", b)


def _cases(seed: int = 0):
    rng = np.random.default_rng(seed)
    for n in (1, 2, 3, 5, 17, 130, 1000):
        for rate in (0.0, 0.03, 0.3, 0.9, 1.0):
            for kind in ("normal", "ties", "sparse", "signed_zero"):
                for dtype in (np.float32, np.float64):
                    y = rng.random(n) < rate
                    s = rng.standard_normal(n) + 1.5 * y
                    if kind == "ties":
                        s = np.round(s * 2) / 2
                    elif kind == "sparse":  # most rows exactly 0, as a k-sparse probe's sum often is
                        s = np.where(rng.random(n) < 0.8, 0.0, np.abs(s))
                    elif kind == "signed_zero":
                        s = np.where(rng.random(n) < 0.5, -0.0, np.where(rng.random(n) < 0.5, 0.0, s))
                    yield y, s.astype(dtype)


def test_counting_scores_equal_sklearn_bit_for_bit() -> None:
    fast = BinaryScores(sk_metrics)
    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on a zero denominator; the stand-in gives its value silently
        for y, s in _cases():
            for pred in (s > 0.0, s > 1e-6, np.zeros_like(y), np.ones_like(y)):
                for name in ("precision_score", "recall_score", "f1_score"):
                    want = getattr(sk_metrics, name)(y, pred)
                    got = getattr(fast, name)(y, pred)
                    assert _same(got, want), (name, y, pred, got, want)
                    n += 1
    assert fast.fast_calls == n


def test_roc_auc_equals_sklearn_bit_for_bit() -> None:
    fast = BinaryScores(sk_metrics)
    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for y, s in (case for seed in (1, 2, 3) for case in _cases(seed)):
            want = sk_metrics.roc_auc_score(y, s)
            got = fast.roc_auc_score(y, s)
            assert _same(got, want), (y, s, got, want)
            n += int(0 < y.sum() < y.size)
    assert fast.fast_calls == n > 250


def test_uncovered_inputs_go_to_sklearn() -> None:
    fast = BinaryScores(sk_metrics)
    y = np.array([0, 1, 1, 0])
    p = np.array([1, 1, 0, 0])
    assert fast.f1_score(y, p) == sk_metrics.f1_score(y, p)  # integer labels
    yb, pb = y.astype(bool), p.astype(bool)
    assert fast.f1_score(yb, pb, zero_division=1.0) == sk_metrics.f1_score(yb, pb, zero_division=1.0)
    with pytest.raises(ValueError, match="infinity"):  # a non-finite score: sklearn's own error
        fast.roc_auc_score(yb, np.array([0.1, np.inf, 0.3, 0.2]))
    with pytest.warns(Warning):  # one class only: sklearn warns and returns nan
        assert math.isnan(fast.roc_auc_score(np.zeros(4, bool), np.arange(4.0)))
    assert fast.fast_calls == 0
    assert fast.accuracy_score is sk_metrics.accuracy_score  # the rest of the module


def test_build_metrics_df_equal_with_the_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    pd = pytest.importorskip("pandas")
    ksp = pytest.importorskip("sae_bench.evals.absorption.k_sparse_probing")
    from sae_bench.evals.absorption.vocab import LETTERS

    rng = np.random.default_rng(3)
    n, max_k = 130, 4
    answers = rng.choice(list(LETTERS), size=n)
    raw: dict[str, object] = {"answer_letter": answers}
    meta = []
    for letter in LETTERS:
        y = answers == letter
        raw[f"score_probe_{letter}"] = rng.standard_normal(n) + 2.0 * y
        for k in range(1, max_k + 1):
            raw[f"score_sparse_sae_{letter}_k_{k}"] = rng.standard_normal(n) + y
            raw[f"sum_sparse_sae_{letter}_k_{k}"] = np.where(rng.random(n) < 0.7, 0.0, rng.random(n)) + y
            meta.append(
                {
                    "letter": letter,
                    "k": k,
                    "feats": np.arange(k),
                    "cos_probe_sae_enc": rng.random(k),
                    "cos_probe_sae_dec": rng.random(k),
                    "weights": rng.random(k),
                    "bias": 0.1,
                    "layer": 15,
                    "sae_name": "s",
                }
            )
    results_df, metadata_df = pd.DataFrame(raw), pd.DataFrame(meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ksp.build_metrics_df(results_df, metadata_df, max_k)
        stand_in = BinaryScores(ksp.metrics)
        monkeypatch.setattr(ksp, "metrics", stand_in)
        got = ksp.build_metrics_df(results_df, metadata_df, max_k)
    assert stand_in.fast_calls == len(LETTERS) * (4 + 8 * max_k)
    assert list(got.columns) == list(want.columns)
    for col in want.columns:
        for a, b in zip(want[col], got[col]):
            if isinstance(a, float):
                assert _same(float(b), a), col
            else:
                assert np.array_equal(np.asarray(a), np.asarray(b)), col
