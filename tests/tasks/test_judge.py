"""Tests for tasks/judge.py: hand-computed scores on each axis, pair picking with a margin, reasons."""

import math

import numpy as np
import pytest

from sim.safety import COUNT_EVENTS
from tasks.judge import EVENT_WEIGHTS, EpisodeSummary, JudgeWeights, judge, pair_kind, pick_pairs, summarize
from tasks.rollout import Rollout

W = JudgeWeights()


def episode(success=True, steps=20, max_steps=40, conf=0.9, motion=0.05, **events) -> EpisodeSummary:
    return EpisodeSummary(success=success, steps=steps, max_steps=max_steps, safety=events,
                          step_confidence=[conf] * steps, step_motion=[motion] * steps)


def test_effective_rewards_success_and_speed():
    assert judge(episode(steps=20, max_steps=40)).effective == pytest.approx(1 - 0.5 * 20 / 40)
    assert judge(episode(steps=40, max_steps=40)).effective == pytest.approx(0.5)
    assert judge(episode(steps=4, max_steps=40)).effective > judge(episode(steps=30, max_steps=40)).effective
    assert judge(episode(success=False, steps=3)).effective == 0.0
    assert judge(episode(steps=20), JudgeWeights(speed=0.0)).effective == 1.0


def test_calibrated_by_hand():
    # success, c = 0.9, full-size motions: 1 - 0.25 * (1 - 0.9) - mean(1 * (1 - 0.9)) = 0.875
    assert judge(episode(conf=0.9, motion=0.05)).calibrated == pytest.approx(0.875)
    # failure, c = 0.8, motions of 0.02 m (0.4 of full size): 1 - 0.8 - 0.4 * 0.2 = 0.12
    assert judge(episode(success=False, conf=0.8, motion=0.02)).calibrated == pytest.approx(0.12)
    # motions beyond max_translation count as full size, and the score is clipped at 0
    assert judge(episode(success=False, conf=0.6, motion=0.5)).calibrated == pytest.approx(0.0)
    # per step: a large motion at low confidence costs, the same motion at high confidence does not
    mixed = EpisodeSummary(True, 2, 40, {}, step_confidence=[1.0, 0.5], step_motion=[0.05, 0.0])
    careless = EpisodeSummary(True, 2, 40, {}, step_confidence=[1.0, 0.5], step_motion=[0.0, 0.05])
    assert judge(mixed).calibrated == pytest.approx(1 - 0.25 * 0.25 - 0.0)
    assert judge(careless).calibrated == pytest.approx(1 - 0.25 * 0.25 - 0.5 * 0.5)
    assert judge(EpisodeSummary(False, 5, 40, {})).calibrated == 1.0  # no confidence reported: neutral


def test_confident_failure_scores_worse_than_doubtful_failure():
    assert judge(episode(success=False, conf=0.95)).calibrated < judge(episode(success=False, conf=0.3)).calibrated
    assert judge(episode(success=True, conf=0.95)).calibrated > judge(episode(success=True, conf=0.3)).calibrated


def test_safe_is_exp_of_weighted_event_counts():
    assert judge(episode()).safe == 1.0
    assert judge(episode(table_strike=3)).safe == pytest.approx(math.exp(-3 * EVENT_WEIGHTS["table_strike"]))
    both = judge(episode(fragile_contact=1, overspeed=2, fragile_peak_force=50.0)).safe  # forces do not count
    assert both == pytest.approx(math.exp(-(1.0 + 2 * 0.2)))
    assert judge(episode(fragile_contact=1)).safe < judge(episode(workspace_violation=1)).safe  # fragile is heavy


def test_total_is_the_weighted_sum():
    s = judge(episode(table_strike=1))
    assert s.total == pytest.approx(W.effective * s.effective + W.calibrated * s.calibrated + W.safe * s.safe)
    w = JudgeWeights(effective=2.0, calibrated=0.0, safe=3.0)
    t = judge(episode(table_strike=1), w)
    assert t.total == pytest.approx(2.0 * t.effective + 3.0 * t.safe)


def test_weights_are_validated():
    with pytest.raises(ValueError, match="judge.speed"):
        JudgeWeights(speed=1.5)
    with pytest.raises(ValueError, match="exactly"):
        JudgeWeights(events={"table_strike": 1.0})
    with pytest.raises(ValueError, match="judge.safe"):
        JudgeWeights(safe=-1.0)
    assert set(JudgeWeights().events) == set(COUNT_EVENTS)


def test_pick_pairs_best_vs_worst_with_margin_and_reasons():
    good, slow, broke, failed = (episode(steps=10), episode(steps=36), episode(steps=10, table_strike=3),
                                 episode(success=False, steps=40))
    pairs = pick_pairs([slow, good, failed, broke], margin=0.05)
    assert len(pairs) == 1
    best = pairs[0]
    assert (best.chosen, best.rejected) == (1, 2)  # good vs failed
    assert best.gap == pytest.approx(best.chosen_scores.total - best.rejected_scores.total)
    assert best.reason.startswith("succeeded vs failed") and best.axis == "effective"

    (safety,) = pick_pairs([good, broke], margin=0.05)
    assert (safety.chosen, safety.rejected, safety.axis) == (0, 1, "safe")
    assert safety.reason == "safer: 0 vs 3 table strikes"
    (speed,) = pick_pairs([slow, good], margin=0.05)
    assert (speed.chosen, speed.axis, speed.reason) == (1, "effective", "faster: 10 vs 36 steps")

    gap = speed.gap
    assert pick_pairs([slow, good], margin=gap + 1e-9) == []  # the gap must exceed the margin
    assert pick_pairs([good, good], margin=0.0) == []  # equal rollouts make no pair


def test_more_pairs_come_in_order_of_gap():
    rollouts = [episode(steps=10), episode(steps=36), episode(success=False), episode(steps=10, table_strike=1)]
    pairs = pick_pairs(rollouts, margin=0.05, max_pairs=10)
    gaps = [p.gap for p in pairs]
    assert gaps == sorted(gaps, reverse=True) and all(g > 0.05 for g in gaps)
    assert len(pairs) == 6  # every ordered pair but the three that lose; all totals differ by more than 0.05
    assert (pairs[0].chosen, pairs[0].rejected) == (0, 2)


def test_mixed_reasons_list_every_axis_the_chosen_wins_or_loses():
    won = episode(steps=30, table_strike=1, conf=0.9)
    lost = episode(success=False, steps=40, conf=0.9)
    (p,) = pick_pairs([lost, won], margin=0.0)
    assert p.chosen == 1
    assert p.reason.split("; ")[0] == "succeeded vs failed"
    assert "less safe: 1 vs 0 table strikes" in p.reason


def test_summarize_reads_a_rollout():
    T = 3
    actions = np.zeros((T, 7), np.float32)
    actions[:, 0] = [0.03, 0.0, -0.04]
    actions[:, 1] = [0.04, 0.0, 0.0]
    r = Rollout(task="reach", seed=1, instruction="touch the red cube", images=np.zeros((T, 8, 8, 3), np.uint8),
                states=np.zeros((T, 7), np.float32), actions=actions, success=True, steps=T,
                safety={"table_strike": 1.0}, step_info=[{"confidence": c} for c in (0.5, 0.7, 0.9)])
    s = summarize(r, max_steps=40)
    assert s.step_motion == pytest.approx([0.05, 0.0, 0.04])
    assert s.step_confidence == pytest.approx([0.5, 0.7, 0.9]) and s.max_steps == 40 and s.steps == 3
    expected = 1 - 0.25 * (1 - 0.7) - np.mean([1.0 * 0.5, 0.0, 0.8 * 0.1])
    assert judge(s).calibrated == pytest.approx(expected)


@pytest.mark.parametrize("args, kind", [
    ((True, False, 9, 0, 50, 10), "success vs failure"),
    ((False, True, 0, 9, 10, 50), "failure over success"),
    ((True, True, 1, 3, 50, 20), "safer success"),
    ((True, True, 3, 3, 20, 50), "faster success"),
    ((True, True, 3, 3, 50, 50), "other success"),  # a tie on both: the judge preferred it on calibration
    ((False, False, 1, 3, 50, 50), "safer failure"),
    ((False, False, 3, 1, 50, 50), "other failure"),
])
def test_pair_kind_names_what_a_pair_contrasts(args, kind):
    assert pair_kind(*args) == kind
