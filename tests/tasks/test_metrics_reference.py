"""tasks/metrics.py against the libraries the field trusts (scipy, statsmodels, scikit-learn), each on a few hundred
seeded random cases: small and large n, rates near 0 and 1, ties, empty cells."""

import numpy as np
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint
from statsmodels.stats.rates import confint_poisson
from statsmodels.stats.weightstats import zconfint, ztest

from tasks.metrics import (
    Z95,
    auroc,
    brier_score,
    expected_calibration_error,
    mcnemar_exact,
    paired_difference,
    paired_rate_difference,
    poisson_rate_interval,
    rate_upper_bound_zero,
    reliability_diagram,
    wilson_interval,
)

CASES = 300
Z = float(stats.norm.ppf(0.975))  # the exact quantile, so that only the formulas differ


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def sizes(r: np.random.Generator) -> int:
    """n from 1 to ~2000, log-uniform: as many small suites as large ones."""
    return int(np.exp(r.uniform(0, np.log(2000))))


def outcomes(r: np.random.Generator, n: int) -> np.ndarray:
    """n booleans at a rate drawn from {near 0, anywhere, near 1}."""
    p = r.choice([r.uniform(0, 0.05), r.uniform(0, 1), r.uniform(0.95, 1)])
    return r.random(n) < p


def test_z95_is_the_normal_quantile():
    assert Z95 == pytest.approx(Z, abs=1e-6)


def test_wilson_matches_statsmodels_and_scipy():
    r = rng(0)
    for _ in range(CASES):
        n = sizes(r)
        k = int(r.integers(0, n + 1))
        ours = wilson_interval(k, n, z=Z)
        assert ours == pytest.approx(proportion_confint(k, n, alpha=0.05, method="wilson"), abs=1e-12), (k, n)
        ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert ours == pytest.approx((ci.low, ci.high), abs=1e-12), (k, n)


def test_zero_event_bound_is_the_one_sided_clopper_pearson_bound():
    r = rng(1)
    for _ in range(CASES):
        n, confidence = sizes(r), float(r.uniform(0.5, 0.999))
        # statsmodels' two-sided "beta" interval at alpha = 2 (1 - confidence) has the one-sided upper bound
        _, high = proportion_confint(0, n, alpha=2 * (1 - confidence), method="beta")
        assert rate_upper_bound_zero(n, confidence) == pytest.approx(high, rel=1e-10), (n, confidence)
        assert rate_upper_bound_zero(n, confidence) == pytest.approx(stats.beta.ppf(confidence, 1, n), rel=1e-10)


def test_poisson_interval_matches_statsmodels_and_chi_square():
    r = rng(2)
    for _ in range(CASES):
        count = int(r.choice([r.integers(0, 10), r.integers(0, 5000)]))
        exposure, confidence = float(r.uniform(0.1, 50)), float(r.uniform(0.5, 0.999))
        alpha = 1 - confidence
        low, high = poisson_rate_interval(count, exposure, confidence)
        ref = confint_poisson(count, exposure, method="exact-c", alpha=alpha)
        assert (low, high) == pytest.approx((float(ref[0]), float(ref[1])), rel=1e-9, abs=1e-12), count
        chi_low = stats.chi2.ppf(alpha / 2, 2 * count) / 2 if count else 0.0
        chi_high = stats.chi2.ppf(1 - alpha / 2, 2 * count + 2) / 2
        assert (low, high) == pytest.approx((chi_low / exposure, chi_high / exposure), rel=1e-9, abs=1e-12)


def test_mcnemar_matches_statsmodels_and_the_binomial_test():
    r = rng(3)
    for _ in range(CASES):
        n = sizes(r) // 4 + 1
        a = outcomes(r, n)
        b = np.where(r.random(n) < r.uniform(0, 0.5), ~a, a)  # B agrees with A on most episodes
        ours = mcnemar_exact(a, b)
        table = [[ours["b11"], ours["b10"]], [ours["b01"], ours["b00"]]]
        assert ours["p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-9, abs=1e-300)
        m = ours["b10"] + ours["b01"]
        if m:
            assert ours["p_value"] == pytest.approx(stats.binomtest(ours["b10"], m, 0.5).pvalue, rel=1e-9)


def test_paired_difference_is_newcombe_built_on_the_library_wilson_intervals():
    """No library ships Newcombe's paired method 10; its pieces (the two Wilson intervals) come from statsmodels
    here, the formula from the docstring, and the interval must contain the difference."""
    r = rng(4)
    for _ in range(CASES):
        n = sizes(r) // 4 + 1
        a = outcomes(r, n)
        b = np.where(r.random(n) < r.uniform(0, 0.5), ~a, a)
        d = paired_difference(a, b, z=Z)
        l1, u1 = proportion_confint(int(a.sum()), n, alpha=0.05, method="wilson")
        l2, u2 = proportion_confint(int(b.sum()), n, alpha=0.05, method="wilson")
        b11, b10, b01, b00 = (int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()),
                              int((~a & ~b).sum()))
        cross = b11 * b00 - b10 * b01
        cross = max(cross - n / 2, 0.0) if cross > 0 else cross
        margins = (b11 + b10) * (b01 + b00) * (b11 + b01) * (b10 + b00)
        phi = cross / np.sqrt(margins) if margins else 0.0
        p1, p2 = a.mean(), b.mean()
        low = p1 - p2 - np.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
        high = p1 - p2 + np.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
        assert (d["ci_low"], d["ci_high"]) == pytest.approx((max(-1.0, low), min(1.0, high)), abs=1e-10)
        assert d["ci_low"] <= d["diff"] <= d["ci_high"]


def test_paired_rate_difference_matches_the_statsmodels_z_test():
    r = rng(5)
    for _ in range(CASES):
        n = int(r.integers(2, 400))
        x, y = r.poisson(r.uniform(0, 3), n), r.poisson(r.uniform(0, 3), n)
        ours = paired_rate_difference(x, y, z=Z)
        d = (x - y).astype(float)
        if d.std() == 0:
            continue  # no spread: statsmodels divides by zero, ours reports p = 1 or 0 (tested elsewhere)
        assert (ours["ci_low"], ours["ci_high"]) == pytest.approx(zconfint(d, alpha=0.05, ddof=1.0), abs=1e-10)
        assert ours["p_value"] == pytest.approx(ztest(d, value=0, ddof=1.0)[1], rel=1e-9, abs=1e-300)


def test_auroc_matches_scikit_learn_and_mann_whitney_with_ties():
    r = rng(6)
    for case in range(CASES):
        n = sizes(r) // 2 + 2
        y = outcomes(r, n)
        y[:2] = (True, False)  # both classes present
        scores = r.random(n) + 0.3 * y
        if case % 2:
            scores = np.round(scores, 1)  # many ties
        ours = auroc(scores, y)
        assert ours == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
        u = stats.mannwhitneyu(scores[y], scores[~y]).statistic
        assert ours == pytest.approx(u / (y.sum() * (~y).sum()), abs=1e-12)


def test_calibration_matches_scikit_learn():
    r = rng(7)
    for _ in range(CASES):
        n, bins = sizes(r) + 2, int(r.integers(2, 20))
        conf = r.random(n) ** r.uniform(0.3, 3)
        y = r.random(n) < conf
        y[:2] = (True, False)  # scikit-learn wants both classes
        assert brier_score(conf, y) == pytest.approx(brier_score_loss(y, conf), abs=1e-12)
        diagram = reliability_diagram(conf, y, bins)
        accuracy, mean_conf = calibration_curve(y, conf, n_bins=bins, strategy="uniform")  # non-empty bins only
        filled = [i for i, m in enumerate(diagram["count"]) if m]
        assert [diagram["accuracy"][i] for i in filled] == pytest.approx(accuracy, abs=1e-12)
        assert [diagram["mean_confidence"][i] for i in filled] == pytest.approx(mean_conf, abs=1e-12)
        weights = np.histogram(conf, bins=np.linspace(0, 1, bins + 1))[0][filled] / n
        ece = float(np.sum(weights * np.abs(accuracy - mean_conf)))
        assert expected_calibration_error(conf, y, bins) == pytest.approx(ece, abs=1e-12)
