"""Run episodes of any policy (``tasks.policy.Policy``) in TabletopEnvs and record them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from sim.env import TabletopEnv
from tasks.policy import BatchPolicy, Policy

Monitor = Callable[[np.ndarray, dict], tuple[np.ndarray, dict]]  # one episode's (action, info) -> (action, info)


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
    other_success: bool | None = None  # with scene.extra["other"]: was the task ever done at that other object
    step_info: list[dict] = field(default_factory=list)  # what the policy returned with each action
    objects: list[str] = field(default_factory=list)  # the scene's object labels ("red cube"), scene order
    object_positions: np.ndarray | None = None  # (T, N, 3) float32: each object's position (m) at each frame
    target_index: int | None = None  # which of `objects` the instruction names
    frames: list[np.ndarray] = field(default_factory=list)  # env.render() per step when recording video
    abstained: bool = False  # a monitor declined the next action (stop-and-ask): the episode ended there

    @property
    def confidence(self) -> float | None:
        """Episode confidence: the mean over steps of the policy's per-action confidence (None if not reported).

        The one definition used by evaluation (calibration) and the preference judge."""
        values = [i["confidence"] for i in self.step_info if "confidence" in i]
        return float(np.mean(values)) if values else None


def rollout(
    env: TabletopEnv | gym.Env, policy: Policy, seed: int, options: dict | None = None, max_steps: int | None = None,
    record_video: bool = False, monitor: Monitor | None = None,
) -> Rollout:
    """Reset `env` and `policy` with `seed` (env with `options`), then step until success, error or the budget."""
    return rollout_batch([env], [policy], [seed], [options], max_steps, [record_video], [monitor])[0]


def rollout_batch(
    envs: list, policies: list[Policy], seeds: list[int], options: list[dict | None], max_steps: int | None = None,
    record_video: list[bool] | None = None, monitors: list[Monitor | None] | None = None,
) -> list[Rollout]:
    """Run one episode in each env in lockstep. When every env has the same policy object and it is a
    ``BatchPolicy`` (the VLA, the random policy), each step is one batched call over the episodes still running;
    otherwise (scripted experts, one per env) each policy acts on its own env. A shared policy is reset once, with
    seeds[0]. ``monitors[i]``, made fresh for episode i, sees each (action, info) of it before it is executed and
    returns the pair to use; an info with ``abstain`` true ends the episode there, the action not executed
    (``tasks.calibration.SuccessMonitor``: stop-and-ask). An info with ``executed`` (an expert's DART noise) steps
    the env with that action while the record keeps the action returned."""
    n = len(envs)
    record_video = record_video or [False] * n
    monitors = monitors or [None] * n
    abstained = [False] * n
    shared = n > 1 and all(p is policies[0] for p in policies) and isinstance(policies[0], BatchPolicy)
    for policy, seed in zip(policies[:1] if shared else policies, seeds):
        policy.reset(seed=seed)
    obs = [env.reset(seed=s, options=o)[0] for env, s, o in zip(envs, seeds, options)]
    firsts = list(obs)  # shapes for an episode that ends before its first action
    cores = [env.unwrapped for env in envs]
    budget = [max_steps or c.task.max_steps for c in cores]
    logs = [{"images": [], "states": [], "actions": [], "step_info": [], "frames": [], "objects": []} for _ in envs]
    outcome = [{"success": False, "error": None, "safety": dict(c.monitor.totals), "other": None} for c in cores]
    running = list(range(n))
    for i in running:
        if record_video[i]:
            logs[i]["frames"].append(envs[i].render())
    while running:
        if shared:
            actions, batch_info = policies[0].act_batch([obs[i] for i in running])
            step = [(actions[j], {k: v[j] for k, v in batch_info.items()}) for j in range(len(running))]
        else:
            step = [policies[i].act(obs[i]) for i in running]
        still = []
        for i, (action, pinfo) in zip(running, step):
            if monitors[i] is not None:
                action, pinfo = monitors[i](action, pinfo)
                if pinfo.get("abstain"):
                    abstained[i] = True
                    continue
            log = logs[i]
            log["images"].append(obs[i]["image"])
            log["states"].append(obs[i]["state"])
            log["objects"].append([cores[i].object_pose(o.name)[0] for o in cores[i].scene.objects])
            log["actions"].append(np.asarray(action, dtype=np.float32))
            log["step_info"].append(pinfo)
            obs[i], _, terminated, truncated, info = envs[i].step(pinfo.get("executed", action))
            if record_video[i]:
                log["frames"].append(envs[i].render())
            other = info.get("other_success")
            outcome[i] = {"success": info["is_success"], "error": info["error"], "safety": info["safety_total"],
                          "other": None if other is None else bool(other or outcome[i]["other"])}
            if not (terminated or truncated or len(log["actions"]) >= budget[i]):
                still.append(i)
        if shared and len(still) < len(running) and hasattr(policies[0], "keep_rows"):
            policies[0].keep_rows([j for j, i in enumerate(running) if i in still])  # a chunked VLA keeps its chunks
        running = still
    return [
        Rollout(
            task=c.task.name, seed=s, instruction=c.instruction,
            images=np.asarray(log["images"], dtype=np.uint8).reshape(-1, *first["image"].shape),
            states=np.asarray(log["states"], dtype=np.float32).reshape(-1, *first["state"].shape),
            actions=np.asarray(log["actions"], dtype=np.float32).reshape(-1, *c.action_space.shape),
            success=bool(out["success"]),
            steps=len(log["actions"]), safety=out["safety"], error=out["error"], other_success=out["other"],
            step_info=log["step_info"], frames=log["frames"],
            objects=[o.label for o in c.scene.objects],
            object_positions=np.asarray(log["objects"], dtype=np.float32).reshape(-1, len(c.scene.objects), 3),
            target_index=[o.name for o in c.scene.objects].index(c.scene.target), abstained=stop,
        )
        for c, s, log, out, first, stop in zip(cores, seeds, logs, outcome, firsts, abstained)
    ]
