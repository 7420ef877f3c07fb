"""A calibrated probability of success from a policy's own token statistics: Platt scaling on a few features.

A policy that decodes action tokens (``vla.policy.VLAPolicy``, ``tasks.perturbed.PerturbedExpert``) reports with
each action ``probs`` (D,), the probability of each chosen action token, and ``log_probs``, the summed log-probability
of every emitted token (a planning model's P plan tokens first). Per step t:

    log_confidence  l_t = mean_d log p_{t,d}                          (the log of the step's confidence)
    min_log_prob    m_t = min_d log p_{t,d}                           (its least certain action token)
    plan_log_prob   q_t = (log_probs_t - sum_d log p_{t,d}) / P       (planning models only)

Features of the steps 1..t so far, each an average so that a longer episode does not drift them by length alone:

    mean_log_confidence = mean_{s<=t} l_s       mean_min_log_prob = mean_{s<=t} m_s
    std_log_confidence  = std_{s<=t} l_s        (dispersion over steps, population std; 0 at t = 1)
    mean_plan_log_prob  = mean_{s<=t} q_s       (when every calibration episode has plan tokens)
    task=<name>         = 1 for episodes of that task, else 0, for every calibrated task but the first (alphabetical)
                          when there are several: the tasks' base rates differ, and the instruction says the task
    step_fraction       = t / max_steps         (the running model only)

Two logistic models on standardized features z = (f - mean) / scale (mean and scale from the fitting rows):

    running  p_t = sigmoid(b + w . z(f_t)): the probability that the episode ends in success, given that it is still
             running after step t's action was decoded and the statistics so far. Fitted on every prefix of every
             calibration episode, labelled with that episode's outcome and weighted 1/T so each episode counts once.
             It is what stop-and-ask reads (``SuccessMonitor``).
    episode  p = sigmoid(b' + w' . z(f_T)) without step_fraction, one row per episode: the episode's calibrated
             probability in reports and in the judge. Step fraction stays out because at the end of an episode it
             would tell a run that used up its budget (a failure) from one that stopped on success by length alone.

Both are fitted by ``fit_logistic``: L2-penalized maximum likelihood (the intercept unpenalized) by Newton's method.
A ``Calibration`` is stored as JSON (``CALIBRATION_FILE``) with the policy it belongs to (a digest of its weights and
its decoding settings), the tasks it covers and how it was fitted; ``check`` refuses any other policy and
``check_tasks`` any other task. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.special import expit

from store.errors import UsageError
from store.files import write_json
from store.intact import read_json, reading

CALIBRATION_FILE = "calibration.json"
VERSION = 1
EPISODE_FEATURES = ("mean_log_confidence", "mean_min_log_prob", "std_log_confidence")
PLAN_FEATURE = "mean_plan_log_prob"
STEP_FEATURE = "step_fraction"
# settings that change the token statistics or what is executed
DECODING = ("temperature", "top_p", "unnorm_key", "chunk_execution", "binarize_gripper")
FITTED_BEFORE = {"binarize_gripper": False}  # what a calibration fitted before the setting existed ran with


class Trace(NamedTuple):
    """What a calibration reads of one episode (so far)."""

    stats: Mapping[str, Sequence[float]]  # step statistics as columns {name: (T,)} (``episode_stats``)
    max_steps: int  # the step budget it runs under
    task: str
    success: bool | None = None  # the outcome, for fitting

    @classmethod
    def of_row(cls, row: Mapping) -> Trace:
        """The trace of an evaluation row (``tasks.evaluation``: step_stats, max_steps, task, success)."""
        return cls(row["step_stats"], row["max_steps"], row["task"], row["success"])


def step_stats(info: Mapping) -> dict[str, float] | None:
    """One step's token statistics from what the policy returned with its action; None when it reports no probs."""
    if "probs" not in info:
        return None
    logp = np.log(np.clip(np.asarray(info["probs"], dtype=np.float64), 1e-45, None))  # (D,)
    out = {"log_confidence": float(logp.mean()), "min_log_prob": float(logp.min())}
    plan = len(np.atleast_1d(info.get("token_ids", ()))) - logp.size
    if plan > 0 and "log_probs" in info:
        out["plan_log_prob"] = (float(info["log_probs"]) - float(logp.sum())) / plan
    return out


def episode_stats(step_infos: Sequence[Mapping]) -> dict[str, list[float]] | None:
    """An episode's step statistics as columns {name: (T,)}; None when a step lacks them."""
    steps = [step_stats(i) for i in step_infos]
    if any(s is None for s in steps):
        return None
    names = set.intersection(*(set(s) for s in steps)) if steps else {"log_confidence", "min_log_prob"}
    return {k: [s[k] for s in steps] for k in sorted(names)}


def prefix_features(trace: Trace, names: Sequence[str]) -> np.ndarray:
    """(T, F) features of every prefix 1..t of an episode, in the order of ``names`` (module docstring)."""
    stats = trace.stats
    l = np.asarray(stats["log_confidence"], dtype=np.float64)  # noqa: E741
    t = np.arange(1, len(l) + 1)
    mean = np.cumsum(l) / t
    cols = []
    for name in names:
        if name == "mean_log_confidence":
            cols.append(mean)
        elif name == "mean_min_log_prob":
            cols.append(np.cumsum(np.asarray(stats["min_log_prob"], dtype=np.float64)) / t)
        elif name == "std_log_confidence":
            cols.append(np.sqrt(np.maximum(np.cumsum(l * l) / t - mean * mean, 0.0)))
        elif name == PLAN_FEATURE:
            cols.append(np.cumsum(np.asarray(stats["plan_log_prob"], dtype=np.float64)) / t)
        elif name == STEP_FEATURE:
            cols.append(t / trace.max_steps)
        elif name.startswith("task="):
            cols.append(np.full(len(l), float(name == f"task={trace.task}")))
        else:
            raise ValueError(f"unknown calibration feature {name!r}")
    return np.stack(cols, axis=1) if cols else np.zeros((len(l), 0))


def fit_logistic(X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None, l2: float = 1.0,
                 max_iter: int = 100, tol: float = 1e-10) -> tuple[np.ndarray, float]:
    """Weights (F,) and intercept b minimising sum_i s_i [log(1 + e^eta_i) - y_i eta_i] + l2/2 |w|^2 with
    eta = b + X w: Newton's method (iteratively reweighted least squares) with a backtracking line search, the
    intercept unpenalized (scikit-learn's LogisticRegression(C=1/l2) with sample_weight=s minimises the same)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    s = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if X.ndim != 2 or y.shape != (len(X),) or s.shape != y.shape or l2 < 0:
        raise ValueError(f"need X (n, F), y (n,) and weights (n,) and l2 >= 0; got {X.shape}, {y.shape}, {s.shape}")
    if not (s[y == 1].sum() > 0 and s[y == 0].sum() > 0):
        raise ValueError("a calibration needs both successes and failures among its episodes")
    A = np.c_[np.ones(len(X)), X]  # (n, 1 + F): intercept first
    penalty = np.r_[0.0, np.full(X.shape[1], l2)]

    def objective(theta: np.ndarray) -> float:
        eta = A @ theta
        return float(s @ (np.logaddexp(0.0, eta) - y * eta) + 0.5 * penalty @ theta**2)

    theta = np.zeros(A.shape[1])
    for _ in range(max_iter):
        p = expit(A @ theta)
        grad = A.T @ (s * (p - y)) + penalty * theta
        hess = (A * (s * p * (1 - p))[:, None]).T @ A + np.diag(penalty) + 1e-12 * np.eye(A.shape[1])
        step = np.linalg.solve(hess, grad)
        decrement = float(grad @ step)
        if decrement / 2 < tol:
            break
        rate, now = 1.0, objective(theta)
        while objective(theta - rate * step) > now - 1e-4 * rate * decrement and rate > 1e-10:
            rate /= 2
        theta = theta - rate * step
    return theta[1:], float(theta[0])


@dataclass
class LogisticModel:
    """p = sigmoid(bias + weights . (f - mean) / scale) over the named features."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float

    @classmethod
    def fit(cls, F: np.ndarray, y: np.ndarray, names: Sequence[str], weight: np.ndarray | None = None,
            l2: float = 1.0) -> LogisticModel:
        w = np.ones(len(y)) if weight is None else np.asarray(weight, dtype=np.float64)
        mean = np.average(F, axis=0, weights=w)
        scale = np.sqrt(np.average((F - mean) ** 2, axis=0, weights=w))
        scale = np.where(scale > 1e-12, scale, 1.0)  # a constant feature keeps weight 0
        coef, bias = fit_logistic((F - mean) / scale, y, w, l2)
        return cls(list(names), mean.tolist(), scale.tolist(), coef.tolist(), bias)

    def predict(self, F: np.ndarray) -> np.ndarray:
        """(n, F) features -> (n,) probabilities."""
        z = (np.asarray(F, dtype=np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        return expit(self.bias + z @ np.asarray(self.weights))


@dataclass
class Calibration:
    """Both models, the policy they belong to ({name, digest, temperature, top_p, unnorm_key}) and how they were
    fitted (command, seeds, counts, cross-validated figures)."""

    running: LogisticModel
    episode: LogisticModel
    policy: dict
    tasks: list[str]
    fit: dict = field(default_factory=dict)
    version: int = VERSION

    def step_probabilities(self, trace: Trace) -> np.ndarray:
        """(T,) running probability of success after each step of an episode (module docstring)."""
        self.check_tasks([trace.task])
        if not len(trace.stats["log_confidence"]):
            return np.zeros(0)
        return self.running.predict(prefix_features(trace, self.running.features))

    def episode_probability(self, trace: Trace) -> float | None:
        """The episode's calibrated probability of success; None for an episode without steps."""
        self.check_tasks([trace.task])
        if not len(trace.stats["log_confidence"]):
            return None
        return float(self.episode.predict(prefix_features(trace, self.episode.features)[-1:])[0])

    def check_tasks(self, tasks: Sequence[str]) -> None:
        """Refuse tasks that the calibration episodes did not cover."""
        other = sorted(set(tasks) - set(self.tasks))
        if other:
            raise UsageError(f"the calibration covers tasks {self.tasks}, not {other}; refit it with those tasks "
                             "(scripts/calibrate.py task=...)")

    def decoding_differences(self, policy: Mapping) -> dict[str, tuple]:
        """{setting: (policy's value, fitted value)} for the DECODING settings where ``policy`` (a
        ``PolicySpec.identity``) differs; a setting the policy has and the calibration predates counts as the
        value it ran with then (FITTED_BEFORE)."""
        fitted = {k: self.policy.get(k, FITTED_BEFORE.get(k) if k in policy else None) for k in DECODING}
        return {k: (policy.get(k), fitted[k]) for k in DECODING if policy.get(k) != fitted[k]}

    def check(self, policy: Mapping, where: str = CALIBRATION_FILE) -> None:
        """Refuse to apply this calibration to another policy: other weights or other decoding settings."""
        if policy["digest"] != self.policy["digest"]:
            raise UsageError(f"{where} was fitted for weights {self.policy['digest'][:12]} ({self.policy['name']}), "
                             f"not for {policy['name']} ({policy['digest'][:12]}); refit it with scripts/calibrate.py "
                             "or pass calibration=none")
        wrong = [f"{k}={now} (fitted at {then})" for k, (now, then) in self.decoding_differences(policy).items()]
        if wrong:
            raise UsageError(f"{where} was fitted under other decoding settings: {', '.join(wrong)}; refit it with "
                             "those settings or pass calibration=none")

    def save(self, path: str | Path) -> None:
        write_json(Path(path), asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        fix = "fit it again with scripts/calibrate.py"
        data = read_json(path, fix)
        with reading(path, fix, (AttributeError, KeyError, TypeError)):
            if data.get("version") != VERSION:
                raise UsageError(f"{path} is calibration version {data.get('version')}, this code reads {VERSION}; "
                                 "refit it with scripts/calibrate.py")
            return cls(LogisticModel(**data["running"]), LogisticModel(**data["episode"]), data["policy"],
                       data["tasks"], data["fit"])


def fit_calibration(traces: Sequence[Trace], policy: dict, l2: float = 1.0, fit: dict | None = None) -> Calibration:
    """Both models from calibration episodes with their outcomes (episodes without a step are left out)."""
    traces = [e for e in traces if len(e.stats["log_confidence"])]
    tasks = sorted({e.task for e in traces})
    names = list(EPISODE_FEATURES) + ([PLAN_FEATURE] if all("plan_log_prob" in e.stats for e in traces) else [])
    names += [f"task={t}" for t in tasks[1:]]
    y = np.asarray([float(e.success) for e in traces])
    last = np.stack([prefix_features(e, names)[-1] for e in traces])  # (n, F)
    prefixes = [prefix_features(e, names + [STEP_FEATURE]) for e in traces]
    rows = np.concatenate(prefixes)  # (sum T, F + 1)
    labels = np.concatenate([np.full(len(f), ok) for f, ok in zip(prefixes, y)])
    weight = np.concatenate([np.full(len(f), 1.0 / len(f)) for f in prefixes])
    return Calibration(LogisticModel.fit(rows, labels, names + [STEP_FEATURE], weight, l2),
                       LogisticModel.fit(last, y, names, None, l2), dict(policy), tasks, dict(fit or {}))


def hold_action(gripper: float) -> np.ndarray:
    """The safe hold: no translation, no rotation, the gripper left as last commanded (1 = open)."""
    return np.asarray([0.0] * 6 + [gripper], dtype=np.float32)


class SuccessMonitor:
    """One episode's running calibrated probability, updated as each action is decoded, and stop-and-ask.

    ``monitor(action, info) -> (action, info)`` before the action is executed: info gains ``success_probability``
    (p_t); when ``abstain_below`` is set and p_t < abstain_below, the action becomes the hold (``hold_action``) and
    info gains ``abstain: True``, which ``tasks.rollout.rollout_batch`` reads as the end of the episode (the hold is
    what a loop that ignores the flag would execute)."""

    def __init__(self, calibration: Calibration, max_steps: int, task: str, abstain_below: float | None = None) -> None:
        self.calibration, self.max_steps, self.task, self.abstain_below = calibration, max_steps, task, abstain_below
        self.stats: dict[str, list[float]] = {}
        self.gripper, self.probability, self.abstained = 1.0, None, False  # the robot starts with the gripper open

    def __call__(self, action: np.ndarray, info: dict) -> tuple[np.ndarray, dict]:
        stats = step_stats(info)
        if stats is None:
            raise ValueError("stop-and-ask needs a policy that reports action-token probabilities (info['probs'])")
        for k, v in stats.items():
            self.stats.setdefault(k, []).append(v)
        trace = Trace(self.stats, self.max_steps, self.task)
        self.probability = float(self.calibration.step_probabilities(trace)[-1])
        info = {**info, "success_probability": self.probability}
        if self.abstain_below is not None and self.probability < self.abstain_below:
            self.abstained = True
            return hold_action(self.gripper), {**info, "abstain": True}
        self.gripper = float(np.asarray(action)[6])
        return action, info


@dataclass
class StopAndAsk:
    """Picklable for worker processes: ``StopAndAsk(calibration, abstain_below)(env)`` is a fresh episode's monitor."""

    calibration: Calibration
    abstain_below: float | None = None

    def __call__(self, env) -> SuccessMonitor:
        task = env.unwrapped.task
        return SuccessMonitor(self.calibration, task.max_steps, task.name, self.abstain_below)
