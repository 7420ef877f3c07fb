"""Evaluation statistics as pure functions on numbers and arrays: success intervals, event-rate bounds,
calibration and paired comparisons of two policies. Imports nothing from this project; scipy only for the inverse
incomplete gamma. The closed forms stay here, checked against scipy, statsmodels and scikit-learn by the tests.

Conventions: an outcome is 1 (success) or 0 (failure); a confidence is a probability in [0, 1]; interval dicts
carry `ci_low`, `ci_high` and `confidence`. Formulas are in each docstring and in docs/metrics.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.special import gammaincinv

Z95 = 1.959964  # two-sided 95% normal quantile, Phi^-1(0.975)


def _coverage(z: float) -> float:
    """Two-sided coverage of +-z under the standard normal (1.959964 -> 0.95)."""
    return round(math.erf(z / math.sqrt(2.0)), 4)


def _binary(values: Sequence[bool] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be a 1-D sequence of booleans or 0/1 values")
    return arr.astype(bool)


def _pair(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _binary(a, "a"), _binary(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need one entry per episode for both policies, got {len(a)} and {len(b)}")
    return a, b


def _conf_outcome(conf, outcome) -> tuple[np.ndarray, np.ndarray]:
    c, y = np.asarray(conf, dtype=float), _binary(outcome, "outcome").astype(float)
    if c.shape != y.shape or len(c) == 0:
        raise ValueError(f"need as many confidences as outcomes, and at least one; got {c.shape} and {y.shape}")
    if not (np.isfinite(c).all() and (c >= 0).all() and (c <= 1).all()):
        raise ValueError("confidences must be finite probabilities in [0, 1]")
    return c, y


# ---------------------------------------------------------------- success and event rates


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion p = k/n:
    (p + z^2/2n -+ z * sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n). n = 0 gives (0, 1)."""
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


def success_summary(outcomes: Sequence[bool]) -> dict:
    """n, successes, rate = successes / n (None when n = 0) and its Wilson 95% interval."""
    y = _binary(outcomes, "outcomes")
    n, k = len(y), int(y.sum())
    low, high = wilson_interval(k, n)
    return {"n": n, "successes": k, "rate": k / n if n else None, "ci_low": low, "ci_high": high}


def rate_upper_bound_zero(n: int, confidence: float = 0.95) -> float:
    """One-sided exact binomial upper bound on a per-episode event probability after 0 events in n episodes:
    the p with (1 - p)^n = 1 - confidence, i.e. 1 - (1 - confidence)^(1/n) (about 3/n at 95%). n = 0 gives 1."""
    if n < 0 or not 0 < confidence < 1:
        raise ValueError(f"need n >= 0 and 0 < confidence < 1, got n={n}, confidence={confidence}")
    return 1.0 if n == 0 else 1.0 - (1.0 - confidence) ** (1.0 / n)


def poisson_rate_interval(count: int, exposure: float, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Garwood) interval for a Poisson rate, count / exposure:
    low = G^-1(alpha/2; shape=count) / exposure (0 when count = 0), high = G^-1(1 - alpha/2; shape=count+1) / exposure,
    G the unit-scale gamma distribution (equivalently chi2(2k)/2, chi2(2k+2)/2), alpha = 1 - confidence;
    G^-1(q; shape=a) is scipy's ``gammaincinv(a, q)``, the inverse of the regularized lower incomplete gamma.
    The rate is per unit of exposure: pass exposure = steps / 100 for events per 100 steps."""
    if count < 0 or exposure <= 0 or not 0 < confidence < 1:
        raise ValueError(f"need count >= 0, exposure > 0, 0 < confidence < 1; got {count}, {exposure}, {confidence}")
    alpha = 1 - confidence
    low = 0.0 if count == 0 else float(gammaincinv(count, alpha / 2))
    return low / exposure, float(gammaincinv(count + 1, 1 - alpha / 2)) / exposure


# ---------------------------------------------------------------- calibration


def reliability_diagram(conf: Sequence[float], outcome: Sequence[bool], n_bins: int = 10) -> dict:
    """Equal-width bins over [0, 1], [k/B, (k+1)/B) with the last closed at 1. Per bin: count, mean confidence and
    accuracy (fraction of successes), None for empty bins. Lists are plain Python, ready for JSON."""
    c, y = _conf_outcome(conf, outcome)
    index = np.minimum((c * n_bins).astype(int), n_bins - 1)  # (N,) bin of each episode
    count = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=c, minlength=n_bins)
    hits = np.bincount(index, weights=y, minlength=n_bins)
    return {
        "n": len(c),
        "bin_edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.tolist(),
        "mean_confidence": [float(s / m) if m else None for s, m in zip(conf_sum, count)],
        "accuracy": [float(h / m) if m else None for h, m in zip(hits, count)],
    }


def _ece(diagram: dict) -> float:
    rows = zip(diagram["count"], diagram["accuracy"], diagram["mean_confidence"])
    return float(sum(m / diagram["n"] * abs(acc - mc) for m, acc, mc in rows if m))


def expected_calibration_error(conf: Sequence[float], outcome: Sequence[bool], n_bins: int = 10) -> float:
    """ECE = sum over bins b of |B_b| / n * |acc_b - conf_b|, with the bins of `reliability_diagram`."""
    return _ece(reliability_diagram(conf, outcome, n_bins))


def brier_score(conf: Sequence[float], outcome: Sequence[bool]) -> float:
    """Brier score = mean over episodes of (c_i - y_i)^2; 0 is perfect, 0.25 is always saying 0.5."""
    c, y = _conf_outcome(conf, outcome)
    return float(np.mean((c - y) ** 2))


def auroc(scores: Sequence[float], outcome: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` as a predictor of success, as the Mann-Whitney statistic:
    U / (n_pos * n_neg), U = #{pos > neg} + 1/2 #{pos == neg} over all (success, failure) pairs,
    computed from tie-averaged ranks. None when only one class is present."""
    s, y = np.asarray(scores, dtype=float), _binary(outcome, "outcome")
    if s.shape != y.shape:
        raise ValueError(f"need one score per outcome, got {s.shape} and {y.shape}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    u = mean_rank[inverse][y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def plot_reliability(diagram: dict, path: str | Path) -> Path:
    """Write a PNG: accuracy per bin against the diagonal of perfect calibration, episode counts below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    edges = np.asarray(diagram["bin_edges"])
    width, centres = np.diff(edges), (edges[:-1] + edges[1:]) / 2
    filled = [i for i, m in enumerate(diagram["count"]) if m]
    fig = Figure(figsize=(4.5, 5.0), dpi=100)
    FigureCanvasAgg(fig)  # Agg for this figure only; the global pyplot backend stays untouched
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.bar(centres[filled], [diagram["accuracy"][i] for i in filled], width=width[filled] * 0.9,
            color="tab:blue", alpha=0.8, label="accuracy")
    top.plot(centres[filled], [diagram["mean_confidence"][i] for i in filled], "o", color="tab:red",
             label="mean confidence")
    top.set(ylim=(0, 1), ylabel="success rate", title=f"Reliability (ECE {_ece(diagram):.3f}, n = {diagram['n']})")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, diagram["count"], width=width * 0.9, color="tab:grey")
    bottom.set(xlim=(0, 1), xlabel="confidence", ylabel="episodes")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------- paired comparison of two policies


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test on paired outcomes of policy A (a_i) and baseline B (b_i) over the same episodes.
    b10 = #(A success, B fail), b01 = #(A fail, B success), m = b01 + b10;
    p = min(1, 2 * sum_{i <= min(b01, b10)} C(m, i) / 2^m), and p = 1 when m = 0."""
    a, b = _pair(a, b)
    b10, b01 = int((a & ~b).sum()), int((~a & b).sum())
    m = b01 + b10
    tail = sum(math.comb(m, i) for i in range(min(b01, b10) + 1)) / 2**m  # exact big-integer ratio
    return {"n": len(a), "b11": int((a & b).sum()), "b10": b10, "b01": b01, "b00": int((~a & ~b).sum()),
            "p_value": min(1.0, 2 * tail)}


def paired_difference(a: Sequence[bool], b: Sequence[bool], z: float = Z95) -> dict:
    """Difference in success rate p_A - p_B = (b10 - b01) / n with Newcombe's (1998) method 10 interval:
    Wilson intervals (l1, u1) for p_A and (l2, u2) for p_B, correlation
    phi = C / sqrt((b11+b10)(b01+b00)(b11+b01)(b10+b00)) with C = b11*b00 - b10*b01 reduced by n/2 toward 0
    when positive (C = max(C - n/2, 0)), and phi = 0 when a margin is empty;
    low  = diff - sqrt((p_A - l1)^2 - 2 phi (p_A - l1)(u2 - p_B) + (u2 - p_B)^2),
    high = diff + sqrt((p_B - l2)^2 - 2 phi (p_B - l2)(u1 - p_A) + (u1 - p_A)^2)."""
    t = mcnemar_exact(a, b)
    n, b11, b10, b01, b00 = t["n"], t["b11"], t["b10"], t["b01"], t["b00"]
    if n == 0:
        raise ValueError("a paired difference needs at least one episode run by both policies")
    p1, p2 = (b11 + b10) / n, (b11 + b01) / n
    l1, u1 = wilson_interval(b11 + b10, n, z)
    l2, u2 = wilson_interval(b11 + b01, n, z)
    margins = (b11 + b10) * (b01 + b00) * (b11 + b01) * (b10 + b00)
    cross = b11 * b00 - b10 * b01
    cross = max(cross - n / 2, 0.0) if cross > 0 else cross
    phi = cross / math.sqrt(margins) if margins else 0.0
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    eps = math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    diff = p1 - p2
    return {"n": n, "rate_a": p1, "rate_b": p2, "diff": diff, "ci_low": max(-1.0, diff - delta),
            "ci_high": min(1.0, diff + eps), "confidence": _coverage(z)}


def paired_rate_difference(x: Sequence[float], y: Sequence[float], z: float = Z95) -> dict:
    """Per-episode event counts x_i (policy A) and y_i (baseline B) on the same episodes; d_i = x_i - y_i.
    diff = mean(d), CI = diff -+ z * sd(d) / sqrt(n) (sd with n - 1; normal approximation, too narrow for small n;
    (-inf, inf) when n < 2), two-sided p = erfc(|diff| / (sd/sqrt(n)) / sqrt 2),
    relative_change = (mean_x - mean_y) / mean_y (None when mean_y = 0)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"need paired 1-D per-episode counts of equal length, got {x.shape} and {y.shape}")
    n = len(x)
    mean_x, mean_y = (float(x.mean()), float(y.mean())) if n else (math.nan, math.nan)
    diff = mean_x - mean_y
    low, high, p = -math.inf, math.inf, 1.0
    if n >= 2:
        se = float(np.std(x - y, ddof=1)) / math.sqrt(n)
        low, high = diff - z * se, diff + z * se
        p = math.erfc(abs(diff) / se / math.sqrt(2)) if se > 0 else float(diff == 0)
    return {"n": n, "mean_a": mean_x, "mean_b": mean_y, "diff": diff, "ci_low": low, "ci_high": high,
            "confidence": _coverage(z), "p_value": p,
            "relative_change": diff / mean_y if n and mean_y != 0 else None}


def verdict(name_a: str, name_b: str, diff: dict, p_value: float, alpha: float = 0.05, *,
            lower_is_better: bool = False, events: str = "safety events") -> str:
    """One line that claims a difference only when the CI excludes 0 and p < alpha.
    Success (default): `diff` from `paired_difference`, shown in percentage points, McNemar p.
    lower_is_better=True: `diff` from `paired_rate_difference`, shown per episode (and relative), paired z-test p."""
    d, low, high = diff["diff"], diff["ci_low"], diff["ci_high"]
    level = f"{100 * diff.get('confidence', 0.95):g}% CI"
    if lower_is_better:
        rel = diff.get("relative_change")
        effect = f"{d:+.3g} per episode" + (f", {100 * rel:+.0f}% relative" if rel is not None else "")
        stats = f"{effect}, {level} [{low:+.3g}, {high:+.3g}], paired z-test p={p_value:.3g}"
        topic, claim = events, f"has {'fewer' if d < 0 else 'more'} {events} than"
    else:
        stats = f"{100 * d:+.1f} points, {level} [{100 * low:+.1f}, {100 * high:+.1f}], McNemar p={p_value:.3g}"
        topic, claim = "success", f"succeeds {'more' if d > 0 else 'less'} often than"
    if p_value < alpha and (low > 0 or high < 0):
        return f"{name_a} {claim} {name_b} ({stats})"
    return f"no significant difference between {name_a} and {name_b} in {topic} ({stats})"


# ---------------------------------------------------------------- selective prediction: success against coverage


def coverage_curve(scores: Sequence[float], outcome: Sequence[bool]) -> dict:
    """Success of the episodes a policy keeps when it may decline those it scores lowest (selective prediction).
    For each distinct score s_1 > s_2 > ... > s_m, point j keeps the n_j episodes with score >= s_j (tied episodes
    are kept or declined together): threshold_j = s_j, coverage_j = n_j / n, success_j = (successes kept) / n_j.
    area = sum_j (coverage_j - coverage_{j-1}) * success_j with coverage_0 = 0: the area under the step curve, which
    with distinct scores is the mean over k = 1..n of the success rate of the top k. A score unrelated to the
    outcome keeps about the base rate r everywhere (area ~ r); ranking every success first gives r * (1 + ln(1/r)).
    Empty lists and area None when there are no episodes."""
    s, y = np.asarray(scores, dtype=float), _binary(outcome, "outcome").astype(float)
    if s.shape != y.shape or not np.isfinite(s).all():
        raise ValueError(f"need one finite score per outcome, got shapes {s.shape} and {y.shape}")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)  # the last episode of each tie group
    kept = np.arange(1, len(s) + 1)[last]
    success = np.cumsum(y)[last] / kept
    coverage = kept / len(s) if len(s) else kept.astype(float)
    area = float(np.sum(np.diff(np.r_[0.0, coverage]) * success)) if len(s) else None
    return {"n": len(s), "threshold": s[last].tolist(), "coverage": coverage.tolist(), "success": success.tolist(),
            "area": area}


def success_at_coverage(curve: dict, coverage: float) -> dict | None:
    """The point of a ``coverage_curve`` with the largest coverage <= ``coverage`` ({threshold, coverage, success});
    None when even the first tie group is larger."""
    points = [j for j, c in enumerate(curve["coverage"]) if c <= coverage + 1e-12]
    if not points:
        return None
    j = points[-1]
    return {k: curve[k][j] for k in ("threshold", "coverage", "success")}


def coverage_at_success(curve: dict, success: float) -> dict | None:
    """The point of a ``coverage_curve`` with the largest coverage whose success is >= ``success``
    ({threshold, coverage, success}); None when no kept set reaches it."""
    points = [j for j, r in enumerate(curve["success"]) if r >= success - 1e-12]
    if not points:
        return None
    j = points[-1]
    return {k: curve[k][j] for k in ("threshold", "coverage", "success")}


def ece_if_calibrated(conf: Sequence[float], n_bins: int = 10, draws: int = 2000, seed: int = 0) -> dict:
    """The ECE that a perfectly calibrated predictor shows on these confidences, by consistency resampling (Broecker
    & Smith 2007): ``draws`` outcome vectors y_i ~ Bernoulli(c_i), each scored with ``expected_calibration_error``'s
    bins. Returns {"mean", "q95"}. The binned ECE is biased upward on finite samples (0.07 on average at n = 200
    for confidences uniform over [0.1, 0.9]); an observed ECE below q95 cannot be told apart from perfect calibration by
    this sample, one above it can."""
    c = np.asarray(conf, dtype=float)
    if c.ndim != 1 or len(c) == 0 or not ((c >= 0) & (c <= 1)).all():
        raise ValueError("need a non-empty 1-D sequence of confidences in [0, 1]")
    index = np.minimum((c * n_bins).astype(int), n_bins - 1)  # (N,) bin of each episode
    onehot = np.eye(n_bins)[index]  # (N, B)
    y = (np.random.default_rng(seed).random((draws, len(c))) < c).astype(float)  # (draws, N)
    gap = np.abs(y @ onehot - c @ onehot)  # (draws, B): |successes - summed confidence| per bin
    ece = gap.sum(axis=1) / len(c)
    return {"mean": float(ece.mean()), "q95": float(np.quantile(ece, 0.95))}
