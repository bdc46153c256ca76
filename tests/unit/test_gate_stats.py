"""The gate's statistics by hand: sign-flip p-values and confidence bounds, McNemar, Tango, power and MDE."""

from __future__ import annotations

import math
import random

import pytest

from nightly_train.stats import (
    equal_candidate_power,
    mcnemar_exact_p,
    min_attainable_p,
    noninferiority_mde,
    noninferiority_rejection_rate,
    noninferiority_z_p,
    paired_noninferiority,
    sign_flip_mde,
    sign_flip_test,
    tango_score_p,
)

Z95 = 1.6448536269514722  # z_{0.95}
Z80 = 0.8416212335729143  # z_{0.80}


# ------------------------------------------------------------------------------------------ sign flip
def test_sign_flip_p_counts_subsets_whose_sum_is_not_positive():
    # Subset sums of (1, 2, -0.5): {}=0, {1}=1, {2}=2, {-.5}=-.5, {1,2}=3, {1,-.5}=.5, {2,-.5}=1.5, {all}=2.5.
    # Two of the eight (the empty one and {-0.5}) are <= 0: flipping them does not lower the sum.
    t = sign_flip_test([1.0, 2.0, -0.5], alpha=0.25)
    assert t.p_value == 2 / 8
    assert t.mean == pytest.approx(2.5 / 3)
    assert t.method == "sign-flip exact (2^3 patterns)"


def test_sign_flip_bounds_invert_the_test():
    # Subset means sorted: -inf (empty), -0.5, 0.25, 0.75, 0.833, 1, 1.5, 2; K = floor(0.25 * 8) = 2 -> 0.25.
    t = sign_flip_test([1.0, 2.0, -0.5], alpha=0.25)
    assert t.lower == 0.25
    assert t.upper == 1.5
    assert sign_flip_test([1.0 - 0.2, 2.0 - 0.2, -0.5 - 0.2], alpha=0.25).significant  # "mean <= 0.2" rejected
    assert not sign_flip_test([1.0 - 0.25, 2.0 - 0.25, -0.5 - 0.25], alpha=0.25).significant  # "<= 0.25" kept


def test_five_positive_differences_are_the_fewest_that_can_pass_at_5_percent():
    five = sign_flip_test([0.3, 0.1, 0.2, 0.4, 0.5], alpha=0.05)
    assert five.p_value == 1 / 32
    assert five.significant
    assert five.lower == 0.1  # K = floor(0.05 * 32) = 1: the smallest non-empty subset mean, the minimum
    assert five.upper == 0.5
    four = sign_flip_test([0.3, 0.1, 0.2, 0.4], alpha=0.05)
    assert four.p_value == 1 / 16
    assert not four.significant
    assert four.lower == -math.inf
    assert min_attainable_p(4) == 1 / 16


def test_identical_sides_and_ties_count_against_the_candidate():
    assert sign_flip_test([0.0] * 8, alpha=0.05).p_value == 1.0
    assert sign_flip_test([1.0, -1.0], alpha=0.05).p_value == 3 / 4  # {}, {-1} and {1, -1} sum to <= 0
    assert sign_flip_test([0.1 + 0.2, -0.3], alpha=0.05).p_value == 3 / 4  # float noise of an exact 0 is a tie


def test_monte_carlo_above_the_exact_size_agrees_and_is_seeded():
    rng = random.Random(7)
    d = [rng.gauss(0.3, 1.0) for _ in range(14)]
    exact = sign_flip_test(d, alpha=0.05)
    mc = sign_flip_test(d, alpha=0.05, exact_max=8)
    assert mc.method == "sign-flip Monte Carlo (19999 patterns, seed 0)"
    assert abs(mc.p_value - exact.p_value) < 0.01
    assert abs(mc.lower - exact.lower) < 0.05
    assert sign_flip_test(d, alpha=0.05, exact_max=8) == mc
    assert sign_flip_test(d, alpha=0.05, exact_max=8, seed=1).p_value != mc.p_value


def test_level_under_a_symmetric_null_is_at_most_alpha():
    # Exact for n = 8: P(reject) = floor(0.05 * 256) / 256 = 12/256 = 0.047 for any continuous symmetric law.
    rng = random.Random(0)
    rejected = sum(sign_flip_test([rng.gauss(0, 1) for _ in range(8)], alpha=0.05).significant for _ in range(600))
    assert rejected / 600 <= 0.047 + 3 * math.sqrt(0.047 * 0.953 / 600)


def test_sign_flip_mde_is_the_normal_approximation():
    assert sign_flip_mde(1.0, 16, 0.05) == pytest.approx((Z95 + Z80) / 4)
    assert math.isnan(sign_flip_mde(1.0, 1, 0.05))


# ------------------------------------------------------------------------------------------ paired binary
def test_exact_mcnemar_hand_computed():
    assert mcnemar_exact_p(5, 0) == 1 / 32  # 0.5^5
    assert mcnemar_exact_p(1, 0) == 0.5
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(6, 1) == (7 + 1) / 128  # (C(7,6) + C(7,7)) / 2^7
    assert mcnemar_exact_p(2, 3) == (10 + 10 + 5 + 1) / 32  # P(X >= 2), X ~ Bin(5, 1/2)


def test_tango_score_test_hand_computed():
    # c = 0: q = (b - d (2n - b)) / (2n). b=1, n=5, d=0.05: q = (1 - 0.45) / 10 = 0.055,
    # var = 5 (2 * 0.055 + 0.05 - 0.0025) = 0.7875, Z = (1 - 5 * 0.05) / sqrt(0.7875).
    z, p = tango_score_p(1, 0, 5, 0.05)
    assert z == pytest.approx(0.75 / math.sqrt(0.7875))
    assert p == pytest.approx(0.199012, abs=1e-6)
    # c > 0: b=6, c=1, n=20, d=0.05: 40 q^2 - 5.25 q - 0.0475 = 0 -> q = (5.25 + sqrt(35.1625)) / 80.
    q = (5.25 + math.sqrt(35.1625)) / 80
    assert tango_score_p(6, 1, 20, 0.05)[0] == pytest.approx(4 / math.sqrt(20 * (2 * q + 0.0475)))
    assert tango_score_p(5, 1, 30, 0.0)[0] == pytest.approx(4 / math.sqrt(6))  # margin 0: McNemar's score statistic
    assert tango_score_p(0, 0, 30, 0.0) == (0.0, 1.0)


def test_noninferiority_without_discordance_by_hand():
    # b = c = 0, n = 8, m = 0.5: q = 0, var = 8 (0.5 - 0.25) = 2, Z = -4 / sqrt(2), p = Phi(Z).
    t = paired_noninferiority(0, 0, 8, margin=0.5, alpha=0.05)
    assert t.z == pytest.approx(-4 / math.sqrt(2))
    assert t.p_value == pytest.approx(0.0023389, abs=1e-7)
    assert t.method == "tango-score"
    assert t.passed


def test_noninferiority_with_discordance_by_hand():
    # b=12, c=15, n=240, m=0.05: 480 q^2 + B q + C = 0, B = -27 + 0.05 (480 - 12 + 15) = -2.85,
    # C = -15 * 0.05 * 0.95 = -0.7125; Z = (12 - 15 - 12) / sqrt(240 (2 q + 0.0475)).
    q = (2.85 + math.sqrt(2.85 ** 2 + 4 * 480 * 0.7125)) / 960
    t = paired_noninferiority(12, 15, 240, margin=0.05, alpha=0.05)
    assert t.z == pytest.approx(-15 / math.sqrt(240 * (2 * q + 0.0475)))
    assert t.p_value == pytest.approx(0.003703, abs=1e-6)
    assert t.drop == pytest.approx(-3 / 240)
    assert t.discordance == pytest.approx(27 / 240)


def test_margin_zero_is_the_exact_mcnemar_of_the_other_tail():
    t = paired_noninferiority(3, 6, 240, margin=0.0, alpha=0.05)
    assert t.p_value == (84 + 36 + 9 + 1) / 512  # P(X >= 6), X ~ Bin(9, 1/2)
    assert t.method == "exact-mcnemar (margin 0)"
    assert not paired_noninferiority(0, 0, 240, margin=0.0, alpha=0.05).passed  # no evidence, no pass


def test_a_negative_margin_asks_for_an_improvement():
    # H0 "drop >= -0.05" is H0 "improvement (c - b)/n <= 0.05": Tango with b and c swapped, upper tail.
    z, p = noninferiority_z_p(2, 30, 200, -0.05)
    z_swapped, p_swapped = tango_score_p(30, 2, 200, 0.05)
    assert (z, p) == (-z_swapped, p_swapped)


def test_confidence_bounds_of_the_drop():
    # b = c = 0: p(m) = Phi(-sqrt(n m / (1 - m))) = alpha at m = z^2 / (n + z^2).
    t = paired_noninferiority(0, 0, 8, margin=0.5, alpha=0.05)
    assert t.upper == pytest.approx(Z95 ** 2 / (8 + Z95 ** 2), abs=1e-6)
    assert t.lower == pytest.approx(-Z95 ** 2 / (8 + Z95 ** 2), abs=1e-6)
    t = paired_noninferiority(20, 5, 240, margin=0.05, alpha=0.05)
    assert noninferiority_z_p(20, 5, 240, t.upper)[1] == pytest.approx(0.05, abs=1e-6)
    assert t.lower < t.drop < t.upper


def test_mde_without_discordance_by_hand():
    assert noninferiority_mde(240, 0.0, 0.05) == pytest.approx(Z95 ** 2 / (240 + Z95 ** 2), abs=1e-6)


@pytest.mark.parametrize("discordance", [0.1, 0.2])
def test_an_equal_candidate_passes_at_the_mde_with_about_80_percent_power(discordance):
    mde = noninferiority_mde(240, discordance, 0.05)
    assert mde == pytest.approx((Z95 + Z80) * math.sqrt(discordance / 240), rel=0.1)  # the first-order formula
    exact = noninferiority_rejection_rate(240, discordance / 2, discordance / 2, mde, 0.05)
    assert 0.77 <= exact <= 0.85
    assert equal_candidate_power(240, discordance, mde, 0.05) == pytest.approx(0.8, abs=1e-6)


@pytest.mark.parametrize("n, discordance", [(240, 0.1), (240, 0.3), (541, 0.2)])
def test_exact_size_at_the_margin_is_at_most_alpha(n, discordance):
    m = 0.05  # the H0 boundary: P(b) - P(c) = m
    size = noninferiority_rejection_rate(n, (discordance + m) / 2, (discordance - m) / 2, m, 0.05)
    assert size <= 0.051
