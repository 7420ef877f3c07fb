"""The policy protocol: what evaluation, preference collection and demo generation ask of a policy.

The scripted experts (``task.expert(env)``), ``RandomPolicy`` below and ``vla.policy.VLAPolicy`` all satisfy it,
so they are interchangeable (LeRobot's ``select_action`` / ``reset``). ``rollout_batch`` steps several episodes in
one call when their shared policy is also a ``BatchPolicy``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

Observation = Mapping[str, Any]  # {"image": (H, W, 3) uint8, "state": (7,) float32, "instruction": str}


@runtime_checkable
class Policy(Protocol):
    def reset(self, seed: int | None = None) -> None:
        """Start an episode; ``seed`` reseeds any randomness (None: the policy's own seed)."""

    def act(self, obs: Observation) -> tuple[np.ndarray, dict[str, Any]]:
        """One observation -> an action (7,) float32 and what the policy reports about it (``confidence``, ...)."""


@runtime_checkable
class BatchPolicy(Policy, Protocol):
    def act_batch(self, observations: Sequence[Observation]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """N observations -> actions (N, 7) float32 and info arrays with a leading N axis."""


class RandomPolicy:
    """Uniform random actions in [low, high] per dimension, for baselines; the gripper dimension draws 0 or 1.

    A ``BatchPolicy``; ``reset(seed)`` reseeds (with the constructor's seed when None).
    """

    def __init__(self, low: Sequence[float], high: Sequence[float], seed: int = 0, gripper_dim: int | None = 6) -> None:
        self.low, self.high = np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)
        if self.low.ndim != 1 or self.low.shape != self.high.shape or (self.low > self.high).any():
            raise ValueError(f"low and high must be 1-D, of equal length and low <= high, got {low} and {high}")
        if gripper_dim is not None and not 0 <= gripper_dim < self.low.shape[0]:
            raise ValueError(f"gripper_dim={gripper_dim} does not index the {self.low.shape[0]} action dimensions")
        self.seed, self.gripper_dim = seed, gripper_dim
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(self.seed if seed is None else seed)

    def act(self, obs: Observation) -> tuple[np.ndarray, dict[str, Any]]:
        actions, _ = self.act_batch([obs])
        return actions[0], {}

    def act_batch(self, observations: Sequence[Observation]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """N observations (ignored) -> actions (N, D) float32."""
        actions = self.rng.uniform(self.low, self.high, size=(len(observations), self.low.shape[0]))
        if self.gripper_dim is not None:
            actions[:, self.gripper_dim] = self.rng.integers(0, 2, size=len(observations))
        return actions.astype(np.float32), {}
