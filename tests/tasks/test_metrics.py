import math

import numpy as np
import pytest

from tasks.metrics import (
    auroc,
    brier_score,
    expected_calibration_error,
    mcnemar_exact,
    paired_difference,
    paired_rate_difference,
    plot_reliability,
    poisson_rate_interval,
    rate_upper_bound_zero,
    reliability_diagram,
    success_summary,
    verdict,
    wilson_interval,
)


def paired(b11: int, b10: int, b01: int, b00: int) -> tuple[list[bool], list[bool]]:
    """Outcome lists of policy A and baseline B from the four cells of the paired table."""
    a = [True] * (b11 + b10) + [False] * (b01 + b00)
    b = [True] * b11 + [False] * b10 + [True] * b01 + [False] * b00
    return a, b


# ---------------------------------------------------------------- success and event rates


def test_wilson_published_and_hand_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    z2 = 1.959964**2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))  # closed form when k = 0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_is_symmetric_in_successes_and_failures():
    for k in range(11):
        low, high = wilson_interval(k, 10)
        assert (1 - high, 1 - low) == pytest.approx(wilson_interval(10 - k, 10))
        assert low <= k / 10 <= high


def test_success_summary():
    s = success_summary([True] * 8 + [False] * 2)
    assert (s["n"], s["successes"], s["rate"]) == (10, 8, 0.8)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert success_summary([]) == {"n": 0, "successes": 0, "rate": None, "ci_low": 0.0, "ci_high": 1.0}
    with pytest.raises(ValueError):
        success_summary([0, 2])


def test_zero_event_upper_bound():
    assert rate_upper_bound_zero(100) == pytest.approx(0.0295, abs=1e-4)
    assert rate_upper_bound_zero(1, confidence=0.5) == pytest.approx(0.5)
    assert rate_upper_bound_zero(0) == 1.0
    p = rate_upper_bound_zero(30)
    assert (1 - p) ** 30 == pytest.approx(0.05)  # seeing no event at this rate has probability 5%


def test_poisson_interval_published_values():
    assert poisson_rate_interval(0, 1.0) == pytest.approx((0.0, 3.689), abs=1e-3)
    low, high = poisson_rate_interval(10, 1.0)
    assert low == pytest.approx(4.795, abs=1e-3) and high == pytest.approx(18.39, abs=1e-2)
    assert poisson_rate_interval(10, 2.0) == pytest.approx((low / 2, high / 2))  # per unit of exposure


@pytest.mark.parametrize("count", [1, 3, 10, 57, 400])
def test_poisson_interval_meets_its_definition(count):
    """Garwood: P(X >= k | low) = 2.5% and P(X <= k | high) = 2.5%, X ~ Poisson (summed here term by term)."""

    def cdf(k: int, mu: float) -> float:
        return sum(math.exp(-mu + i * math.log(mu) - math.lgamma(i + 1)) for i in range(k + 1))

    low, high = poisson_rate_interval(count, 1.0)
    assert 1 - cdf(count - 1, low) == pytest.approx(0.025, rel=1e-7)
    assert cdf(count, high) == pytest.approx(0.025, rel=1e-7)


# ---------------------------------------------------------------- calibration


def test_ece_of_perfectly_calibrated_bins_is_zero():
    conf = [0.25] * 4 + [0.75] * 4
    outcome = [1, 0, 0, 0] + [1, 1, 1, 0]
    assert expected_calibration_error(conf, outcome) == pytest.approx(0.0)


def test_ece_of_confident_failures_is_one():
    assert expected_calibration_error([1.0] * 5, [0] * 5) == pytest.approx(1.0)  # conf 1.0 lands in the last bin


def test_ece_hand_value():
    # bin 9: acc 0.5, conf 0.9, weight 1/2 -> 0.2; bin 1: acc 0, conf 0.1, weight 1/2 -> 0.05
    assert expected_calibration_error([0.9, 0.9, 0.1, 0.1], [1, 0, 0, 0]) == pytest.approx(0.25)


def test_reliability_diagram_bins():
    d = reliability_diagram([0.0, 0.1, 0.15, 0.95, 1.0], [0, 1, 0, 1, 1], n_bins=10)
    assert d["n"] == 5 and d["bin_edges"][0] == 0.0 and d["bin_edges"][-1] == 1.0
    assert d["count"] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]  # 0.1 opens bin 1; 1.0 closes bin 9
    assert d["accuracy"][1] == 0.5 and d["mean_confidence"][1] == pytest.approx(0.125)
    assert d["accuracy"][2] is None and d["mean_confidence"][2] is None
    assert d["mean_confidence"][9] == pytest.approx(0.975) and d["accuracy"][9] == 1.0


def test_calibration_rejects_bad_input():
    with pytest.raises(ValueError):
        brier_score([1.2], [1])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5, 0.5], [1])
    with pytest.raises(ValueError):
        expected_calibration_error([], [])


def test_brier_known_values():
    assert brier_score([1.0, 0.0], [1, 0]) == 0.0
    assert brier_score([0.5] * 6, [1, 0, 1, 1, 0, 0]) == pytest.approx(0.25)
    assert brier_score([0.8, 0.3], [1, 0]) == pytest.approx((0.04 + 0.09) / 2)
    assert brier_score([0.0, 1.0], [1, 0]) == 1.0


def test_auroc_known_values():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5] * 6, [1, 0, 1, 0, 1, 0]) == 0.5
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # ties count 1/2: pairs (0.5, 0.5) = 1/2, (0.5, 0.2), (0.7, 0.5), (0.7, 0.2) = 1 each -> 3.5 / 4
    assert auroc([0.5, 0.7, 0.5, 0.2], [1, 1, 0, 0]) == 0.875
    assert auroc([0.3, 0.9], [1, 1]) is None and auroc([0.3, 0.9], [0, 0]) is None


def test_auroc_equals_pair_counting():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60) / 4  # many ties
    y = rng.random(60) < 0.4
    pos, neg = scores[y], scores[~y]
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    assert auroc(scores, y) == pytest.approx(pairs.mean())


def test_plot_reliability_writes_png(tmp_path):
    d = reliability_diagram([0.05, 0.5, 0.55, 0.9, 1.0], [0, 1, 0, 1, 1])  # includes empty bins
    out = plot_reliability(d, tmp_path / "reliability.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# ---------------------------------------------------------------- paired comparison


def test_mcnemar_exact_hand_values():
    t = mcnemar_exact(*paired(b11=5, b10=1, b01=9, b00=3))
    assert (t["n"], t["b11"], t["b10"], t["b01"], t["b00"]) == (18, 5, 1, 9, 3)
    assert t["p_value"] == pytest.approx(2 * (1 + 10) / 2**10)  # 2 * P(Bin(10, 1/2) <= 1)
    assert mcnemar_exact(*paired(4, 0, 0, 6))["p_value"] == 1.0  # no discordant pairs
    assert mcnemar_exact(*paired(0, 3, 3, 0))["p_value"] == 1.0  # 2 * 42/64 capped at 1
    assert mcnemar_exact(*paired(0, 0, 6, 0))["p_value"] == pytest.approx(2 / 64)


def test_mcnemar_is_symmetric_in_the_policies():
    a, b = paired(7, 2, 8, 4)
    ab, ba = mcnemar_exact(a, b), mcnemar_exact(b, a)
    assert (ab["b10"], ab["b01"]) == (ba["b01"], ba["b10"]) and ab["p_value"] == ba["p_value"]


def test_paired_difference_published_example():
    """Fagerland, Lydersen & Laake (2017), ch. 8, Cavo et al. (2012) table 59/6/16/80:
    Newcombe square-and-add estimate -0.0621, 95% CI -0.1186 to -0.0046."""
    d = paired_difference(*paired(b11=59, b10=6, b01=16, b00=80))
    assert d["diff"] == pytest.approx(-0.0621, abs=1e-4)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((-0.1186, -0.0046), abs=1e-4)
    assert d["confidence"] == 0.95


def test_paired_difference_without_correlation_is_independent_square_and_add():
    # b11*b00 - b10*b01 = 1 <= n/2, so phi = 0 and the limits come from the two Wilson intervals alone
    b11, b10, b01, b00 = 3, 4, 1, 2
    n = b11 + b10 + b01 + b00
    p1, p2 = (b11 + b10) / n, (b11 + b01) / n
    l1, u1 = wilson_interval(b11 + b10, n)
    l2, u2 = wilson_interval(b11 + b01, n)
    d = paired_difference(*paired(b11, b10, b01, b00))
    assert d["ci_low"] == pytest.approx(p1 - p2 - math.hypot(p1 - l1, u2 - p2))
    assert d["ci_high"] == pytest.approx(p1 - p2 + math.hypot(p2 - l2, u1 - p1))


def test_paired_difference_of_identical_policies_contains_zero():
    a, _ = paired(12, 0, 0, 8)
    d = paired_difference(a, a)
    assert d["diff"] == 0.0 and d["ci_low"] < 0 < d["ci_high"]
    with pytest.raises(ValueError):
        paired_difference([True], [True, False])


def test_paired_rate_difference_hand_values():
    r = paired_rate_difference([1, 2, 3], [0, 0, 0])  # d = 1, 2, 3: mean 2, sd 1
    assert r["diff"] == 2.0 and r["relative_change"] is None
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((2 - 1.959964 / math.sqrt(3), 2 + 1.959964 / math.sqrt(3)))
    assert r["p_value"] == pytest.approx(math.erfc(2 * math.sqrt(3) / math.sqrt(2)))
    r = paired_rate_difference([1, 1, 2, 0], [2, 2, 2, 2])
    assert r["diff"] == -1.0 and r["relative_change"] == pytest.approx(-0.5)
    assert paired_rate_difference([3], [1])["ci_low"] == -math.inf
    assert paired_rate_difference([0, 0], [0, 0])["p_value"] == 1.0


def test_verdict_claims_only_when_ci_and_test_agree():
    d = {"diff": 0.12, "ci_low": 0.031, "ci_high": 0.209, "confidence": 0.95}
    expected = "A succeeds more often than B (+12.0 points, 95% CI [+3.1, +20.9], McNemar p=0.008)"
    assert verdict("A", "B", d, 0.008) == expected
    assert verdict("A", "B", d, 0.2).startswith("no significant difference between A and B in success (+12.0 points")
    straddles = {"diff": 0.12, "ci_low": -0.01, "ci_high": 0.25, "confidence": 0.95}
    assert verdict("A", "B", straddles, 0.01).startswith("no significant difference")
    worse = {"diff": -0.2, "ci_low": -0.3, "ci_high": -0.1, "confidence": 0.95}
    assert verdict("A", "B", worse, 0.001).startswith("A succeeds less often than B (-20.0 points")


def test_verdict_for_event_rates_where_lower_is_better():
    r = paired_rate_difference([0, 0, 1, 0, 0, 0, 1, 0], [1, 2, 1, 1, 0, 1, 2, 1])
    line = verdict("DPO", "SFT", r, r["p_value"], lower_is_better=True)
    assert line.startswith("DPO has fewer safety events than SFT (-0.875 per episode, -78% relative, 95% CI [")
    assert verdict("DPO", "SFT", r, 0.3, lower_is_better=True).startswith(
        "no significant difference between DPO and SFT in safety events")
