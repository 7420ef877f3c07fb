"""A scripted expert with noise it knows about: a cheap policy whose outcome varies and that reports token statistics.

``PerturbedExpert`` wraps a task's expert (``task.expert(env)``). At ``reset(seed)`` it draws the episode's noise
scale sigma log-uniformly from [``sigma_low``, ``sigma_high``] metres per step (from the seed alone). Each step it
reads the expert's action a, draws its translation (dx, dy, dz) from N(a, sigma^2) per dimension and quantizes it the
way a VLA does: 256 uniform bins per dimension over the action bounds (+-``MAX_TRANSLATION``, the edge bins take the tails),
the action being the chosen bin's centre. Like ``vla.policy.VLAPolicy`` it reports, per step:

    token_ids  (7,) int64: the chosen bin of every dimension
    probs      (7,) float32: the probability of the chosen bin under the policy's own N(a, sigma^2) (1 for the
               rotations and the gripper, which it does not perturb)
    confidence the geometric mean of probs
    log_probs  the sum of log probs

So its confidence tracks its noise, as a VLA's token probabilities are meant to track its uncertainty, and a larger
sigma fails more often (a grasp shoved sideways, a touch that misses). It gives the calibration machinery
(``tasks.calibration``) a policy with a wide range of outcomes at the cost of the simulator alone; what it measures is
the machinery, not a learned policy.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr

from sim.env import MAX_TRANSLATION

N_BINS = 256
SIGMA_LOW, SIGMA_HIGH = 0.002, 0.04  # metres per step; the expert moves up to 0.035 m a step


class PerturbedExpert:
    """``reset(seed)`` / ``act(obs) -> (action, info)`` around an expert, with per-episode Gaussian noise."""

    def __init__(self, expert, sigma_low: float = SIGMA_LOW, sigma_high: float = SIGMA_HIGH, seed: int = 0) -> None:
        if not 0 < sigma_low <= sigma_high:
            raise ValueError(f"need 0 < sigma_low <= sigma_high, got {sigma_low} and {sigma_high}")
        self.expert, self.sigma_low, self.sigma_high, self.seed = expert, sigma_low, sigma_high, seed
        self.edges = np.linspace(-MAX_TRANSLATION, MAX_TRANSLATION, N_BINS + 1)  # (257,) bin edges, metres
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        seed = self.seed if seed is None else seed
        self.expert.reset(seed=seed)
        self.rng = np.random.default_rng([seed, 20])  # a stream of its own, apart from the expert's and the scene's
        self.sigma = math.exp(self.rng.uniform(math.log(self.sigma_low), math.log(self.sigma_high)))

    def act(self, obs) -> tuple[np.ndarray, dict]:
        action, _ = self.expert.act(obs)
        action = np.asarray(action, dtype=np.float32).copy()
        mean = action[:3].astype(np.float64)
        draw = mean + self.rng.normal(0.0, self.sigma, 3)
        bins = np.clip(np.searchsorted(self.edges, draw, side="right") - 1, 0, N_BINS - 1)  # (3,)
        low = np.where(bins == 0, -np.inf, self.edges[bins])
        high = np.where(bins == N_BINS - 1, np.inf, self.edges[bins + 1])
        p = ndtr((high - mean) / self.sigma) - ndtr((low - mean) / self.sigma)
        action[:3] = (self.edges[bins] + self.edges[bins + 1]) / 2
        probs = np.ones(7, dtype=np.float32)
        probs[:3] = np.clip(p, 1e-45, 1.0)
        token_ids = np.zeros(7, dtype=np.int64)
        token_ids[:3] = bins
        log_probs = float(np.log(probs.astype(np.float64)).sum())
        return action, {"token_ids": token_ids, "probs": probs, "confidence": np.float32(math.exp(log_probs / 7)),
                        "log_probs": log_probs}
