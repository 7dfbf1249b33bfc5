"""Exact stand-ins for the four sklearn scores SAEBench's absorption computes per SAE in ``build_metrics_df``.

For every letter and every k = 1..10, SAEBench's ``build_metrics_df`` calls ``roc_auc_score``, ``f1_score``,
``recall_score`` and ``precision_score`` on a few hundred rows: about 2,200 calls per SAE, each of which spends
nearly all its time in sklearn's input validation (about 7 s per SAE on the default store, half the metric's
per-SAE cost). Its inputs there are always the same simple kind: a 1-D boolean label array against a 1-D boolean
prediction (the three counting scores) or a 1-D finite float score (the AUC).

:class:`BinaryScores` stands in for the ``sklearn.metrics`` module in SAEBench's ``k_sparse_probing`` namespace.
For exactly those inputs (and no keyword arguments) it computes the same value from the confusion counts, with the
same floating-point operations as sklearn 1.9 (checked bit for bit in ``tests/evals/test_binary_scores.py``):

* precision ``tp / (tp + fp)``, recall ``tp / (tp + fn)``, F1 ``2 tp / ((tp + fn) + (tp + fp))``, each a float64
  division of integers, 0.0 where the denominator is 0 (sklearn's ``zero_division="warn"`` value);
* ROC AUC from the counts at each distinct score (sorted descending), sklearn's ``drop_intermediate`` rule, the
  same ``fpr`` / ``tpr`` divisions and the same ``scipy.integrate.trapezoid`` call.

Anything else (other shapes or dtypes, keyword arguments, a non-finite score, one class only in the labels, where
sklearn warns and returns nan) goes to sklearn unchanged; so does every other attribute of the module.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def _bool_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """``(y_true, y_pred)`` when both are 1-D numpy bool arrays of one length, else None."""
    if not (isinstance(y_true, np.ndarray) and isinstance(y_pred, np.ndarray)):
        return None
    if y_true.dtype != np.bool_ or y_pred.dtype != np.bool_ or y_true.ndim != 1 or y_true.shape != y_pred.shape:
        return None
    return y_true, y_pred


def _counts(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[int, int, int]:
    """``(tp, predicted positives, true positives + false negatives)`` of boolean labels and predictions."""
    return int(np.count_nonzero(y_true & y_pred)), int(np.count_nonzero(y_pred)), int(np.count_nonzero(y_true))


def _divide(numerator: float, denominator: float) -> float:
    """sklearn's ``_prf_divide`` for one label: a float64 division, 0.0 on a zero denominator."""
    return float(np.float64(numerator) / np.float64(denominator)) if denominator != 0 else 0.0


def precision(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """sklearn's binary ``precision_score`` of boolean ``y_true, y_pred: (n,)``."""
    tp, predicted, _ = _counts(y_true, y_pred)
    return _divide(tp, predicted)


def recall(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """sklearn's binary ``recall_score`` of boolean ``y_true, y_pred: (n,)``."""
    tp, _, true = _counts(y_true, y_pred)
    return _divide(tp, true)


def f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """sklearn's binary ``f1_score`` of boolean ``y_true, y_pred: (n,)``: ``(1 + b^2) tp / (b^2 true + pred)``
    with b = 1, as sklearn writes it."""
    tp, predicted, true = _counts(y_true, y_pred)
    return _divide(2.0 * np.float64(tp), 1.0 * np.float64(true) + np.float64(predicted))


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """sklearn's binary ``roc_auc_score`` of boolean ``y_true: (n,)`` (both classes present) and finite
    ``y_score: (n,)``."""
    from scipy.integrate import trapezoid

    order = np.argsort(y_score, kind="stable")[::-1]
    score, hit = y_score[order], y_true[order].astype(np.float64)
    # the last row of each run of equal scores; within a run the order does not matter: the counts at its end
    # are integers, exact in float64 whatever the order
    thresholds = np.concatenate([np.nonzero(np.diff(score))[0], [hit.size - 1]])
    tps = np.cumsum(hit, dtype=np.float64)[thresholds]
    fps = 1 + thresholds.astype(np.float64) - tps
    if fps.shape[0] > 2:  # roc_curve's drop_intermediate
        keep = np.nonzero(np.concatenate([[True], np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), [True]]))[0]
        fps, tps = fps[keep], tps[keep]
    tps = np.concatenate([np.asarray([0.0]), tps])
    fps = np.concatenate([np.asarray([0.0]), fps])
    # both classes are present, so there are at least two points and fps[-1], tps[-1] > 0; fpr never decreases,
    # so sklearn's auc integrates in direction +1
    return float(trapezoid(tps / tps[-1], fps / fps[-1]))


class BinaryScores:
    """A stand-in for the ``sklearn.metrics`` module (module docstring): the four scores computed directly for
    1-D boolean labels, every other call and attribute passed to ``module``."""

    def __init__(self, module: ModuleType):
        self._module = module
        self.fast_calls = 0
        """Calls answered here (the rest went to sklearn)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def _counting(self, name: str, fn: Any, y_true: Any, y_pred: Any, args: tuple, kwargs: dict) -> Any:
        pair = None if args or kwargs else _bool_pair(y_true, y_pred)
        if pair is None:
            return getattr(self._module, name)(y_true, y_pred, *args, **kwargs)
        self.fast_calls += 1
        return fn(*pair)

    def precision_score(self, y_true: Any, y_pred: Any, *args: Any, **kwargs: Any) -> Any:
        return self._counting("precision_score", precision, y_true, y_pred, args, kwargs)

    def recall_score(self, y_true: Any, y_pred: Any, *args: Any, **kwargs: Any) -> Any:
        return self._counting("recall_score", recall, y_true, y_pred, args, kwargs)

    def f1_score(self, y_true: Any, y_pred: Any, *args: Any, **kwargs: Any) -> Any:
        return self._counting("f1_score", f1, y_true, y_pred, args, kwargs)

    def roc_auc_score(self, y_true: Any, y_score: Any, *args: Any, **kwargs: Any) -> Any:
        fast = (
            not args
            and not kwargs
            and isinstance(y_true, np.ndarray)
            and isinstance(y_score, np.ndarray)
            and y_true.dtype == np.bool_
            and y_score.dtype.kind == "f"
            and y_true.ndim == 1
            and y_true.shape == y_score.shape
            and bool(y_true.any())
            and not bool(y_true.all())
            and bool(np.isfinite(y_score).all())
        )
        if not fast:
            return self._module.roc_auc_score(y_true, y_score, *args, **kwargs)
        self.fast_calls += 1
        return roc_auc(y_true, y_score)
