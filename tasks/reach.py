"""Reach: touch the named object with the fingertips."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.env import TabletopEnv
from sim.scene import shape_of
from tasks.base import BaseTask, Motion

TOUCH_RADIUS = 0.03  # m between the fingertip centre and the top centre of the target


@dataclass
class ReachTask(BaseTask):
    name: str = "reach"
    max_steps: int = 40
    templates: tuple[str, ...] = (
        "touch the {target}",
        "reach for the {target}",
        "put your gripper on the {target}",
        "go to the {target}",
        "move the gripper to the {target}",
        "tap the top of the {target}",
    )

    @staticmethod
    def top(env: TabletopEnv) -> np.ndarray:
        pos, _ = env.object_pose(env.scene.target)
        return pos + (0.0, 0.0, shape_of(env.scene.target).half_height)

    def success(self, env: TabletopEnv) -> bool:
        return bool(np.linalg.norm(env.tip_position() - self.top(env)) < TOUCH_RADIUS)

    def plan(self, env: TabletopEnv, m: Motion):
        top = self.top(env)
        yield from m.to(top + (0, 0, 0.08), None, 0.0, tol=0.02, noisy=True)
        yield from m.to(top + (0, 0, 0.01), None, 0.0, tol=0.005)
