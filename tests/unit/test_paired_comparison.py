"""The paired comparison of a ratio metric measured twice on the same users."""

from __future__ import annotations

import numpy as np
import pytest

from training.experiments.stats import RatioMoments, compare, compare_paired


def _rounds(rng: np.random.Generator, users: int, lift: float) -> tuple[np.ndarray, ...]:
    """Users of very different tastes, each shown 40 items twice; the second time with ``lift``."""
    base = rng.beta(2, 6, users)
    shown = np.full(users, 40)
    before = rng.binomial(shown, base)
    after = rng.binomial(shown, np.clip(base + lift, 0, 1))
    return after, shown, before, shown


def test_identical_rounds_show_no_change() -> None:
    clicks = np.array([1, 5, 2, 7])
    shown = np.array([10, 10, 12, 9])
    paired = compare_paired((clicks, shown), (clicks, shown), alpha=0.05)
    assert paired.difference.value == 0 and paired.p_value == pytest.approx(1.0)


def test_pairing_removes_the_users_own_variance_and_keeps_its_size() -> None:
    rng = np.random.default_rng(0)
    after_y, after_x, before_y, before_x = _rounds(rng, 300, 0.02)
    paired = compare_paired((after_y, after_x), (before_y, before_x), alpha=0.05)
    unpaired = compare(RatioMoments.of(after_y, after_x), RatioMoments.of(before_y, before_x), alpha=0.05)
    assert paired.difference.value == pytest.approx(unpaired.difference.value)
    assert paired.difference.std_error < 0.8 * unpaired.difference.std_error


def test_paired_test_holds_its_level_under_no_change() -> None:
    rng = np.random.default_rng(1)
    p_values = []
    for _ in range(400):
        after_y, after_x, before_y, before_x = _rounds(rng, 200, 0.0)
        p_values.append(compare_paired((after_y, after_x), (before_y, before_x), alpha=0.05).p_value)
    rejected = float(np.mean(np.asarray(p_values) < 0.05))
    # 5 % expected; 400 draws put 95 % of rejection rates within about 2.9-7.1 %.
    assert 0.02 <= rejected <= 0.085
