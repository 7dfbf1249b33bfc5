"""Training curves on a log scale: where to measure, when a curve has flattened, and when it reached a level.

A *curve* is a list of points, each a dict with an x key (``"samples"``, ``"seconds"``, ``"steps"``,
``"iteration"``) and ``"fvu"``, in training order. Every method in a comparison (the dictionary after its
updates, an SAE after its optimiser steps) is measured at the same log-spaced counts (:func:`on_log_grid`), so
the curves are comparable on a log axis, and the same plateau rule (:func:`improvement_per_doubling`) judges each.

Interpolation is linear in log x (a power law ``fvu ≈ a·x^−α`` is then exact between points up to its
curvature): :func:`value_at` reads a curve at any x inside it, :func:`first_reaching` the first x at which it
reaches a level.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

#: Points per doubling of the log grid: 2 puts a point at every power of √2 (1, 2, 3, 4, 6, 8, 11, 16, 23, …).
GRID_POINTS_PER_DOUBLING = 2
_GRID = frozenset(round(2 ** (j / GRID_POINTS_PER_DOUBLING)) for j in range(0, 2 * 64))

Curve = Sequence[Mapping[str, float]]


def on_log_grid(count: int) -> bool:
    """Whether the ``count``-th update / step (1-based) is a measuring point: ``count = round(√2^j)``."""
    return count in _GRID


def value_at(curve: Curve, x: float, x_key: str, y_key: str = "fvu") -> float | None:
    """``y`` of ``curve`` at ``x``, linear in log x between the points around it; None outside the curve."""
    pts = _points(curve, x_key, y_key)
    if not pts or x < pts[0][0] or x > pts[-1][0] or x <= 0:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y1
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return pts[-1][1]


def improvement_per_doubling(curve: Curve, x_key: str, y_key: str = "fvu") -> float | None:
    """Relative improvement ``(y(x/2) − y(x)) / y(x/2)`` over the last doubling of ``x`` at the curve's last point;
    None while the curve does not yet reach back to ``x/2``. Negative when the curve went up."""
    pts = _points(curve, x_key, y_key)
    if not pts:
        return None
    x, y = pts[-1]
    before = value_at(curve, x / 2, x_key, y_key)
    if before is None or before <= 0:
        return None
    return (before - y) / before


def first_reaching(curve: Curve, level: float, x_key: str, y_key: str = "fvu") -> float | None:
    """The first ``x`` at which ``curve`` is at or below ``level`` (linear in log x between the two points around
    the crossing); None if it never is."""
    pts = _points(curve, x_key, y_key)
    for i, (x1, y1) in enumerate(pts):
        if y1 <= level:
            if i == 0:
                return x1
            x0, y0 = pts[i - 1]
            if y0 == y1 or x0 <= 0:
                return x1
            t = (y0 - level) / (y0 - y1)
            return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
    return None


def _points(curve: Curve, x_key: str, y_key: str) -> list[tuple[float, float]]:
    """``(x, y)`` of the points that have both, x > 0, in order of x."""
    pts = [
        (float(p[x_key]), float(p[y_key]))
        for p in curve
        if p.get(x_key) is not None and p.get(y_key) is not None and float(p[x_key]) > 0
    ]
    return sorted(pts, key=lambda q: q[0])


__all__ = ["first_reaching", "improvement_per_doubling", "on_log_grid", "value_at"]
