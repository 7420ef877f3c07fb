"""Run one episode of any policy (`reset()`, `act(obs) -> (action, info)`) in a TabletopEnv and record it."""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from sim.env import TabletopEnv


@dataclass
class Rollout:
    """One episode: per-step observations and actions (T frames), outcome and safety totals."""

    task: str
    seed: int
    instruction: str
    images: np.ndarray  # (T, H, W, 3) uint8: the observation each action was chosen from
    states: np.ndarray  # (T, 7) float32
    actions: np.ndarray  # (T, 7) float32
    success: bool
    steps: int
    safety: dict[str, float]
    error: str | None = None
    step_info: list[dict] = field(default_factory=list)  # what the policy returned with each action
    frames: list[np.ndarray] = field(default_factory=list)  # env.render() per step when recording video

    @property
    def confidence(self) -> float | None:
        """Episode confidence: the mean over steps of the policy's per-action confidence (None if not reported).

        The one definition used by evaluation (calibration) and the preference judge."""
        values = [i["confidence"] for i in self.step_info if "confidence" in i]
        return float(np.mean(values)) if values else None


def rollout(
    env: TabletopEnv | gym.Env, policy, seed: int, options: dict | None = None, max_steps: int | None = None, record_video: bool = False
) -> Rollout:
    """Reset `env` and `policy` with `seed` (env with `options`), then step until success, error or the budget."""
    core = env.unwrapped
    obs, info = env.reset(seed=seed, options=options)
    policy.reset(seed=seed)
    budget = max_steps or core.task.max_steps
    images, states, actions, step_info, frames = [], [], [], [], []
    success, error, steps = False, None, 0
    safety = dict(core.monitor.totals)
    if record_video:
        frames.append(env.render())
    while steps < budget:
        action, pinfo = policy.act(obs)
        images.append(obs["image"])
        states.append(obs["state"])
        actions.append(np.asarray(action, dtype=np.float32))
        step_info.append(pinfo)
        obs, _, terminated, truncated, info = env.step(action)
        steps += 1
        if record_video:
            frames.append(env.render())
        success, error, safety = info["is_success"], info["error"], info["safety_total"]
        if terminated or truncated:
            break
    return Rollout(
        task=core.task.name, seed=seed, instruction=core.instruction, images=np.stack(images), states=np.stack(states),
        actions=np.stack(actions), success=bool(success), steps=steps, safety=safety, error=error,
        step_info=step_info, frames=frames,
    )
