"""The log-scale curve rules every method is judged by: the measuring grid, log-time interpolation, the gain per
doubling (the plateau rule's quantity) and the first crossing of a level, each against a hand computation."""

from __future__ import annotations

import math

import pytest

from pipeline.utils.curves import first_reaching, improvement_per_doubling, on_log_grid, value_at


def test_log_grid_has_two_points_per_doubling():
    grid = [n for n in range(1, 70) if on_log_grid(n)]
    assert grid == [1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64]
    assert on_log_grid(2**20) and on_log_grid(round(2**20.5)) and not on_log_grid(2**20 + 1)


def test_value_at_is_linear_in_log_x():
    curve = [{"samples": 100, "fvu": 0.4}, {"samples": 400, "fvu": 0.2}]
    assert value_at(curve, 200, "samples") == pytest.approx(0.3)  # halfway in log x
    assert value_at(curve, 100, "samples") == 0.4 and value_at(curve, 400, "samples") == 0.2
    assert value_at(curve, 50, "samples") is None and value_at(curve, 500, "samples") is None
    assert value_at([], 1, "samples") is None


def test_improvement_per_doubling_reads_the_curve_at_half_the_last_x():
    curve = [{"samples": 100, "fvu": 0.4}, {"samples": 400, "fvu": 0.2}, {"samples": 800, "fvu": 0.19}]
    assert improvement_per_doubling(curve, "samples") == pytest.approx((0.2 - 0.19) / 0.2)
    assert improvement_per_doubling(curve[:2], "samples") == pytest.approx((0.3 - 0.2) / 0.3)
    assert improvement_per_doubling(curve[:1], "samples") is None  # nothing at x / 2 yet
    worse = [{"samples": 1, "fvu": 0.2}, {"samples": 2, "fvu": 0.25}]
    assert improvement_per_doubling(worse, "samples") == pytest.approx(-0.25)


def test_first_reaching_interpolates_the_crossing_in_log_x():
    curve = [{"seconds": 10.0, "fvu": 0.5}, {"seconds": 40.0, "fvu": 0.3}, {"seconds": 160.0, "fvu": 0.1}]
    # 0.2 is half-way from 0.3 to 0.1, so half-way from 40 to 160 in log time: 80
    assert first_reaching(curve, 0.2, "seconds") == pytest.approx(80.0)
    assert first_reaching(curve, 0.5, "seconds") == 10.0 and first_reaching(curve, 0.6, "seconds") == 10.0
    assert first_reaching(curve, 0.05, "seconds") is None
    bounce = [{"seconds": 1.0, "fvu": 0.5}, {"seconds": 2.0, "fvu": 0.2}, {"seconds": 4.0, "fvu": 0.3}]
    assert first_reaching(bounce, 0.25, "seconds") == pytest.approx(math.exp(math.log(2) * 5 / 6))
