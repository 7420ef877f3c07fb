"""Tests for tasks/calibration.py, the coverage functions of tasks/metrics.py, the perturbed expert, the rollout's
stop-and-ask hook and the judge's calibrated axis: fits checked against known weights and scikit-learn, coverage
curves against hand-computed cases."""

import math
import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from store.errors import UsageError
from tasks import make_env
from tasks import metrics as M
from tasks.calibration import (
    Calibration, LogisticModel, StopAndAsk, SuccessMonitor, Trace, episode_stats, fit_calibration, fit_logistic,
    prefix_features, step_stats,
)
from tasks.judge import JudgeWeights, calibrated_score, summarize
from tasks.perturbed import N_BINS, PerturbedExpert
from tasks.rollout import rollout

POLICY = {"name": "p", "digest": "a" * 64, "temperature": 0.0, "top_p": 1.0, "unnorm_key": None}


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    w, b = np.array([1.5, -2.0, 0.5]), -0.3
    return X, (rng.random(n) < 1 / (1 + np.exp(-(X @ w + b)))).astype(float), w, b


def test_the_fit_recovers_known_logistic_weights():
    X, y, w, b = synthetic(40_000)
    coef, bias = fit_logistic(X, y, l2=0.0)
    assert np.abs(coef - w).max() < 0.06 and abs(bias - b) < 0.04


@pytest.mark.parametrize("l2", [0.01, 1.0, 25.0])
def test_the_fit_matches_scikit_learn_with_the_same_penalty_and_weights(l2):
    X, y, _, _ = synthetic(600, seed=1)
    s = np.random.default_rng(2).uniform(0.1, 3.0, len(y))
    coef, bias = fit_logistic(X, y, s, l2=l2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's notice about its penalty argument
        ref = LogisticRegression(C=1 / l2, tol=1e-12, max_iter=10_000).fit(X, y, sample_weight=s)
    np.testing.assert_allclose(coef, ref.coef_[0], atol=1e-6)
    assert bias == pytest.approx(ref.intercept_[0], abs=1e-6)


def test_the_fit_refuses_a_single_outcome():
    with pytest.raises(ValueError, match="both successes and failures"):
        fit_logistic(np.zeros((4, 1)), np.ones(4))


def test_step_statistics_and_prefix_features_by_hand():
    s = step_stats({"probs": [0.5, 0.25, 1.0], "token_ids": [7, 8, 9, 10, 11], "log_probs": math.log(0.5 ** 2 / 8)})
    assert s["log_confidence"] == pytest.approx(math.log(0.125) / 3)
    assert s["min_log_prob"] == pytest.approx(math.log(0.25))
    assert s["plan_log_prob"] == pytest.approx(math.log(0.5))  # two plan tokens of 0.5: (log(0.5^2 / 8) - log(1/8)) / 2
    assert step_stats({"confidence": 0.3}) is None
    stats = {"log_confidence": [-1.0, -3.0, -2.0], "min_log_prob": [-2.0, -4.0, -6.0]}
    names = ["mean_log_confidence", "mean_min_log_prob", "std_log_confidence", "task=reach", "step_fraction"]
    F = prefix_features(Trace(stats, 6, "reach"), names)
    np.testing.assert_allclose(F, [[-1, -2, 0, 1, 1 / 6], [-2, -3, 1, 1, 2 / 6], [-2, -4, math.sqrt(2 / 3), 1, 0.5]])
    assert prefix_features(Trace(stats, 6, "pick"), names)[:, 3].tolist() == [0, 0, 0]


def _episodes(n: int, seed: int = 0, tasks: tuple[str, ...] = ("reach", "pick")) -> list[Trace]:
    """Synthetic episodes: a hidden noise level sets both the token probabilities and the chance of success."""
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        level = rng.uniform(0, 1)
        T = int(rng.integers(5, 30))
        l = -1.0 - 2 * level + rng.normal(0, 0.3, T)  # noqa: E741
        stats = {"log_confidence": l.tolist(), "min_log_prob": (l - 1 - rng.random(T)).tolist()}
        out.append(Trace(stats, 40, tasks[i % len(tasks)], bool(rng.random() < 1 - level)))
    return out


def test_a_calibration_round_trips_and_refuses_other_weights_or_decoding(tmp_path):
    cal = fit_calibration(_episodes(200), POLICY, fit={"command": "c"})
    cal.save(tmp_path / "calibration.json")
    again = Calibration.load(tmp_path / "calibration.json")
    trace = _episodes(1, seed=5)[0]
    assert again.episode_probability(trace) == cal.episode_probability(trace)
    np.testing.assert_array_equal(again.step_probabilities(trace), cal.step_probabilities(trace))
    assert again.tasks == ["pick", "reach"] and "task=reach" in again.episode.features
    again.check(POLICY)
    with pytest.raises(UsageError, match="covers tasks \\['pick', 'reach'\\], not \\['push'\\]"):
        again.episode_probability(trace._replace(task="push"))
    with pytest.raises(UsageError, match="fitted for weights aaaaaaaaaaaa"):
        again.check({**POLICY, "digest": "b" * 64})
    with pytest.raises(UsageError, match="temperature=1.0 \\(fitted at 0.0\\)"):
        again.check({**POLICY, "temperature": 1.0})
    # a calibration from before binarize_gripper existed ran the bin centres: it fits binarize_gripper=False only
    with pytest.raises(UsageError, match="binarize_gripper=True \\(fitted at False\\)"):
        again.check({**POLICY, "binarize_gripper": True})
    again.check({**POLICY, "binarize_gripper": False})
    fitted = fit_calibration(_episodes(200), {**POLICY, "binarize_gripper": True})
    fitted.check({**POLICY, "binarize_gripper": True})
    assert fitted.decoding_differences({**POLICY, "binarize_gripper": False}) == {"binarize_gripper": (False, True)}


def test_the_same_episodes_give_the_same_calibration():
    a, b = fit_calibration(_episodes(150), POLICY), fit_calibration(_episodes(150), POLICY)
    assert a == b


def test_the_running_monitor_matches_the_offline_probabilities_and_abstains_with_a_hold():
    cal = fit_calibration(_episodes(200), POLICY)
    rng = np.random.default_rng(3)
    infos = [{"probs": rng.uniform(0.01, 0.9, 7).astype(np.float32)} for _ in range(6)]
    monitor = SuccessMonitor(cal, 40, "pick")
    seen = [monitor(np.full(7, 0.01, np.float32), i)[1]["success_probability"] for i in infos]
    np.testing.assert_array_equal(seen, cal.step_probabilities(Trace(episode_stats(infos), 40, "pick")))
    stop = SuccessMonitor(cal, 40, "pick", abstain_below=max(seen[:3]) + 1e-9)
    action, info = stop(np.asarray([0.02, 0, 0, 0, 0, 0, 0.0], np.float32), infos[0])
    assert info["abstain"] and stop.abstained
    np.testing.assert_array_equal(action, [0, 0, 0, 0, 0, 0, 1.0])  # nothing commanded yet: the gripper stays open


def test_coverage_curve_area_and_readings_by_hand():
    curve = M.coverage_curve([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    assert curve["coverage"] == [0.25, 0.5, 0.75, 1.0] and curve["success"] == [1.0, 0.5, 2 / 3, 0.5]
    assert curve["area"] == pytest.approx((1 + 0.5 + 2 / 3 + 0.5) / 4)
    ties = M.coverage_curve([0.5, 0.9, 0.5, 0.2], [0, 1, 1, 0])  # the two 0.5s are kept or declined together
    assert ties["threshold"] == [0.9, 0.5, 0.2] and ties["coverage"] == [0.25, 0.75, 1.0]
    assert ties["success"] == [1.0, 2 / 3, 0.5] and ties["area"] == pytest.approx(0.25 + 0.5 * 2 / 3 + 0.25 * 0.5)
    assert M.success_at_coverage(ties, 0.8) == {"threshold": 0.5, "coverage": 0.75, "success": 2 / 3}
    assert M.success_at_coverage(ties, 0.2) is None
    assert M.coverage_at_success(ties, 0.6)["coverage"] == 0.75 and M.coverage_at_success(ties, 1.01) is None
    n = 1000  # a perfect ranking with base rate r has area r (1 + ln 1/r)
    perfect = M.coverage_curve(np.arange(n, 0, -1), np.arange(n) < 300)
    assert perfect["area"] == pytest.approx(0.3 * (1 + math.log(1 / 0.3)), abs=2e-3)
    assert M.coverage_curve([], [])["area"] is None


def test_the_perturbed_expert_reports_its_token_statistics_and_replays():
    env = make_env("reach", image_size=32)
    runs = [rollout(env, PerturbedExpert(env.task.expert(env), 0.01, 0.01), 1234) for _ in range(2)]
    assert np.array_equal(runs[0].actions, runs[1].actions)
    for info, action in zip(runs[0].step_info, runs[0].actions):
        p = info["probs"]
        assert info["confidence"] == pytest.approx(np.exp(np.log(p.astype(float)).mean()), rel=1e-6)
        assert info["log_probs"] == pytest.approx(np.log(p.astype(float)).sum())
        assert np.all(p[3:] == 1) and np.all((0 < p[:3]) & (p[:3] <= 1))
        assert np.allclose(action[:3], -0.05 + (info["token_ids"][:3] + 0.5) * 0.1 / N_BINS, atol=1e-7)
    noisy = rollout(env, PerturbedExpert(env.task.expert(env), 0.03, 0.03), 1234)
    assert noisy.confidence < runs[0].confidence


class _StopAt:
    def __init__(self, step: int):
        self.step, self.t = step, 0

    def __call__(self, action, info):
        self.t += 1
        return action, {**info, "abstain": self.t == self.step}


@pytest.mark.parametrize("step", [1, 3])
def test_an_abstaining_monitor_ends_the_episode_before_executing_the_action(step):
    env = make_env("pick", image_size=32)
    r = rollout(env, env.task.expert(env), 77, monitor=_StopAt(step))
    assert r.abstained and not r.success and r.steps == step - 1
    assert r.actions.shape == (step - 1, 7) and len(r.images) == len(r.object_positions) == step - 1
    full = rollout(env, env.task.expert(env), 77)
    assert not full.abstained and np.array_equal(full.actions[: step - 1], r.actions)


def test_stop_and_ask_stops_a_perturbed_expert_in_the_simulator():
    cal = fit_calibration(_episodes(200), POLICY)
    env = make_env("reach", image_size=32)
    r = rollout(env, PerturbedExpert(env.task.expert(env)), 5, monitor=StopAndAsk(cal, 0.999999)(env))
    assert r.abstained and r.steps == 0 and not r.success


def test_the_judge_reads_the_calibrated_probability():
    cal = fit_calibration(_episodes(200), POLICY)
    env = make_env("reach", image_size=32)
    r = rollout(env, PerturbedExpert(env.task.expert(env)), 9)
    raw, calibrated = summarize(r, 40), summarize(r, 40, cal)
    assert raw.success_probability is None and calibrated.success_probability == pytest.approx(
        cal.episode_probability(Trace(episode_stats(r.step_info), 40, "reach")))
    p = np.asarray(calibrated.step_success_probability)
    motion = np.minimum(np.asarray(calibrated.step_motion) / JudgeWeights().max_translation, 1.0)
    outcome = 0.25 * (1 - calibrated.success_probability) if r.success else calibrated.success_probability
    expected = np.clip(1 - outcome - np.mean(motion * (1 - p)), 0, 1)
    assert calibrated_score(calibrated, JudgeWeights()) == pytest.approx(expected)
    assert calibrated_score(calibrated, JudgeWeights()) != calibrated_score(raw, JudgeWeights())


def test_a_constant_feature_keeps_a_zero_weight():
    F = np.c_[np.linspace(-1, 1, 50), np.full(50, 3.0)]
    model = LogisticModel.fit(F, (np.arange(50) % 3 == 0).astype(float), ["a", "b"])
    assert model.weights[1] == 0.0 and model.scale[1] == 1.0


def test_ece_if_calibrated_is_the_ece_of_outcomes_drawn_from_the_confidences():
    c = np.random.default_rng(4).uniform(0, 1, 50)
    got = M.ece_if_calibrated(c, draws=300, seed=9)
    eces = [M.expected_calibration_error(c, y) for y in np.random.default_rng(9).random((300, 50)) < c]
    assert got["mean"] == pytest.approx(np.mean(eces)) and got["q95"] == pytest.approx(np.quantile(eces, 0.95))
