"""The preference judge: scores one episode on three axes and picks (chosen, rejected) pairs among rollouts.

Pure functions on an ``EpisodeSummary`` (built from a ``Rollout`` by ``summarize``). With weights ``JudgeWeights``
(defaults in brackets), an episode of T steps under a budget of ``max_steps``, step confidences c_t in [0, 1]
(``VLAPolicy``'s per-action confidence), commanded translations m_t = |a_t[:3]| in metres, episode confidence
c = mean_t c_t and safety counts n_k:

    effective  = success * (1 - speed * T / max_steps)                                   [speed = 0.5]
                 0 on failure; a success scores 1 - speed at the full budget and up to 1 when instant.
    calibrated = clip(1 - outcome_penalty - motion_penalty, 0, 1)
        outcome_penalty = c                              on failure (confident failure is the worst case)
                        = underconfidence * (1 - c)      on success   [underconfidence = 0.25]
        motion_penalty  = mean_t min(m_t / max_translation, 1) * (1 - c_t)               [max_translation = 0.05]
                          (large motions taken at low confidence)
        A policy that reports no confidence (scripted expert) gets calibrated = 1: the axis cannot separate it.
        With a calibration (``tasks.calibration``), c is the episode's calibrated probability of success and c_t the
        running probability after step t, in place of the raw token confidences.
    safe       = exp(-sum_k events[k] * n_k) over sim.safety.COUNT_EVENTS (fragile contact and table strike heavy)
    total      = effective_weight * effective + calibrated_weight * calibrated + safe_weight * safe   [1, 0.25, 1]

``pick_pairs`` pairs rollouts of one start state: the best against the worst by total when the gap exceeds
``margin``, then (up to ``max_pairs``) the next widest gaps, each with per-axis scores and a reason string.
``pair_kind`` names what a pair teaches (its outcomes and safety counts), for the pair mix of a preference set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from sim.env import MAX_TRANSLATION
from sim.safety import COUNT_EVENTS
from store.errors import UsageError
from tasks.calibration import Calibration, Trace, episode_stats
from tasks.rollout import Rollout

AXES = ("effective", "calibrated", "safe")
EVENT_WEIGHTS = {
    "fragile_contact": 1.0, "table_strike": 1.0, "object_dropped": 0.5, "object_toppled": 0.5,
    "keepout_intrusion": 0.5, "overspeed": 0.2, "workspace_violation": 0.1, "joint_limit": 0.1,
}  # fmt: skip
EVENT_NOUNS = {  # plural nouns for reasons: "safer: 0 vs 3 table strikes"
    "fragile_contact": "fragile contacts", "table_strike": "table strikes", "object_dropped": "objects dropped",
    "object_toppled": "objects toppled", "keepout_intrusion": "keep-out intrusions", "overspeed": "overspeed steps",
    "workspace_violation": "workspace violations", "joint_limit": "joint-limit steps",
}  # fmt: skip


@dataclass
class JudgeWeights:
    """The judge's configurable constants (see the module docstring for the formulas)."""

    effective: float = 1.0  # weight of each axis in the total
    calibrated: float = 0.25
    safe: float = 1.0
    speed: float = 0.5  # share of the effective score that speed can take away, in [0, 1]
    underconfidence: float = 0.25  # calibration penalty per unit of missing confidence on a success
    max_translation: float = MAX_TRANSLATION  # m per step counted as a full-size motion
    events: dict[str, float] = field(default_factory=lambda: dict(EVENT_WEIGHTS))  # per COUNT_EVENTS type

    def __post_init__(self) -> None:
        for name in ("effective", "calibrated", "safe", "underconfidence"):
            if not getattr(self, name) >= 0:
                raise UsageError(f"judge.{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.speed <= 1:
            raise UsageError(f"judge.speed={self.speed} must lie in [0, 1] so that a success always scores > 0")
        if not self.max_translation > 0:
            raise UsageError(f"judge.max_translation={self.max_translation} must be > 0 (metres per step)")
        if set(self.events) != set(COUNT_EVENTS) or any(not w >= 0 for w in self.events.values()):
            raise UsageError(f"judge.events must give a weight >= 0 to exactly {list(COUNT_EVENTS)}, "
                             f"got {dict(self.events)}")


@dataclass(frozen=True)
class EpisodeSummary:
    """What the judge reads of one episode."""

    success: bool
    steps: int
    max_steps: int  # the step budget the episode ran under
    safety: Mapping[str, float]  # episode totals by event type (sim.safety.EVENTS)
    step_confidence: Sequence[float] = ()  # (T,) per-action confidence in [0, 1]; empty if not reported
    step_motion: Sequence[float] = ()  # (T,) |commanded translation| per step, metres
    success_probability: float | None = None  # the calibrated probability of success, when calibrated
    step_success_probability: Sequence[float] = ()  # (T,) the running calibrated probability after each step


@dataclass(frozen=True)
class Scores:
    effective: float
    calibrated: float
    safe: float
    total: float


@dataclass(frozen=True)
class Pair:
    """Rollout ``chosen`` preferred over ``rejected`` (indices into the list given to ``pick_pairs``)."""

    chosen: int
    rejected: int
    chosen_scores: Scores
    rejected_scores: Scores
    gap: float  # total(chosen) - total(rejected) > margin
    axis: str  # the axis that contributes most to the gap: effective, calibrated or safe
    reason: str  # e.g. "succeeded vs failed; safer: 0 vs 3 table strikes"


def summarize(r: Rollout, max_steps: int, calibration: Calibration | None = None) -> EpisodeSummary:
    """The judge's view of a rollout run under a budget of ``max_steps``; with ``calibration`` (fitted for the
    policy that ran it) also its calibrated probabilities."""
    stats = episode_stats(r.step_info) if calibration is not None and r.steps else None
    trace = None if stats is None else Trace(stats, max_steps, r.task)
    return EpisodeSummary(
        success=r.success, steps=r.steps, max_steps=max_steps, safety=dict(r.safety),
        step_confidence=[float(i["confidence"]) for i in r.step_info if "confidence" in i],
        step_motion=np.linalg.norm(np.asarray(r.actions, dtype=np.float64)[:, :3], axis=1).tolist(),
        success_probability=None if trace is None else calibration.episode_probability(trace),
        step_success_probability=() if trace is None else calibration.step_probabilities(trace).tolist(),
    )  # fmt: skip


def effective_score(s: EpisodeSummary, w: JudgeWeights) -> float:
    if not s.success:
        return 0.0
    return 1.0 - w.speed * min(s.steps / s.max_steps, 1.0)


def calibrated_score(s: EpisodeSummary, w: JudgeWeights) -> float:
    calibrated = s.success_probability is not None
    conf = np.asarray(s.step_success_probability if calibrated else s.step_confidence, dtype=np.float64)
    if conf.size == 0:
        return 1.0
    if conf.shape != np.shape(s.step_motion):
        raise ValueError(f"{conf.size} step confidences but {len(s.step_motion)} step motions; give one per step")
    mean = s.success_probability if calibrated else float(conf.mean())
    outcome = w.underconfidence * (1.0 - mean) if s.success else mean
    motion = np.minimum(np.asarray(s.step_motion, dtype=np.float64) / w.max_translation, 1.0)
    return float(np.clip(1.0 - outcome - float(np.mean(motion * (1.0 - conf))), 0.0, 1.0))


def safe_score(s: EpisodeSummary, w: JudgeWeights) -> float:
    return math.exp(-sum(w.events[k] * float(s.safety.get(k, 0.0)) for k in COUNT_EVENTS))


def judge(s: EpisodeSummary, w: JudgeWeights | None = None) -> Scores:
    """The three axis scores, each in [0, 1], and their weighted total."""
    w = w or JudgeWeights()
    e, c, sf = effective_score(s, w), calibrated_score(s, w), safe_score(s, w)
    return Scores(e, c, sf, w.effective * e + w.calibrated * c + w.safe * sf)


def explain(a: EpisodeSummary, b: EpisodeSummary, sa: Scores, sb: Scores, w: JudgeWeights) -> tuple[str, str]:
    """(main axis, reason) for preferring ``a`` over ``b``: the axes on which ``a`` wins, widest weighted gain
    first; the main axis is the first of them."""
    parts = []  # (weighted gain, axis, text)
    gain = w.effective * (sa.effective - sb.effective)
    if a.success != b.success:
        parts.append((gain, "effective", "succeeded vs failed" if a.success else "failed vs succeeded"))
    elif gain:
        parts.append((gain, "effective", f"faster: {a.steps} vs {b.steps} steps"))
    gain = w.safe * (sa.safe - sb.safe)
    if gain:
        diffs = [(w.events[k] * (b.safety.get(k, 0.0) - a.safety.get(k, 0.0)), k) for k in COUNT_EVENTS]
        diffs = [(d, k) for d, k in sorted(diffs, key=lambda x: -abs(x[0])) if d]
        counts = ", ".join(f"{a.safety.get(k, 0.0):g} vs {b.safety.get(k, 0.0):g} {EVENT_NOUNS[k]}" for _, k in diffs)
        parts.append((gain, "safe", f"{'safer' if gain > 0 else 'less safe'}: {counts}"))
    gain = w.calibrated * (sa.calibrated - sb.calibrated)
    if gain:
        word = "better calibrated" if gain > 0 else "worse calibrated"
        parts.append((gain, "calibrated", f"{word}: {sa.calibrated:.2f} vs {sb.calibrated:.2f}"))
    parts.sort(key=lambda p: -p[0])
    return (parts[0][1] if parts else "none"), "; ".join(text for _, _, text in parts)


def pick_pairs(
    rollouts: Sequence[EpisodeSummary], margin: float = 0.05, w: JudgeWeights | None = None, max_pairs: int = 1
) -> list[Pair]:
    """Preference pairs among rollouts of one start state: ordered pairs (i, j) with total_i - total_j > margin,
    widest gap first (ties by index), at most ``max_pairs``; the first is the best against the worst."""
    if margin < 0 or max_pairs < 1:
        raise ValueError(f"margin={margin} must be >= 0 and max_pairs={max_pairs} >= 1")
    w = w or JudgeWeights()
    scores = [judge(s, w) for s in rollouts]
    gaps = sorted(
        ((scores[i].total - scores[j].total, i, j) for i in range(len(scores)) for j in range(len(scores))),
        key=lambda g: (-g[0], g[1], g[2]),
    )
    pairs = []
    for gap, i, j in gaps[:max_pairs]:
        if gap <= margin:
            break
        axis, reason = explain(rollouts[i], rollouts[j], scores[i], scores[j], w)
        pairs.append(Pair(i, j, scores[i], scores[j], gap, axis, reason))
    return pairs


PAIR_KINDS = ("success vs failure", "safer success", "faster success", "other success", "safer failure",
              "other failure", "failure over success")


def pair_kind(chosen_success: bool, rejected_success: bool, chosen_events: float, rejected_events: float,
              chosen_steps: int, rejected_steps: int) -> str:
    """What a (chosen, rejected) pair contrasts, one of ``PAIR_KINDS``: outcomes first, then safety events, then
    speed; "other" when the judge preferred the chosen side on calibration alone."""
    if chosen_success != rejected_success:
        return "success vs failure" if chosen_success else "failure over success"
    outcome = "success" if chosen_success else "failure"
    if chosen_events < rejected_events:
        return f"safer {outcome}"
    return "faster success" if chosen_success and chosen_steps < rejected_steps else f"other {outcome}"
