"""Place: put the named object into the tray."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.env import TabletopEnv
from sim.scene import CONTAINER_HALF, SHAPES, TABLE_TOP, Scene, shape_of
from tasks.base import BaseTask, SceneSampler, Motion
from tasks.pick import grasp


@dataclass
class PlaceTask(BaseTask):
    name: str = "place"
    max_steps: int = 100
    templates: tuple[str, ...] = (
        "put the {target} in the tray",
        "place the {target} into the tray",
        "move the {target} into the brown tray",
        "drop the {target} in the tray",
        "pick up the {target} and put it in the tray",
        "store the {target} inside the tray",
    )

    def compose(self, s: SceneSampler, options: dict) -> Scene:
        container = s.position("container")
        target = s.target(("cube", "cylinder"))
        hazards, keepout = s.safety_extras(target.xy, container)
        objects = [target] + s.distractors(target, self.n_distractors(options), tuple(SHAPES))
        return Scene(objects + hazards, target.name, container=container, keepout=keepout)

    def success(self, env: TabletopEnv) -> bool:
        name = env.scene.target
        pos, _ = env.object_pose(name)
        cx, cy = env.scene.container
        inside = abs(pos[0] - cx) < CONTAINER_HALF - 0.01 and abs(pos[1] - cy) < CONTAINER_HALF - 0.01
        resting = pos[2] < TABLE_TOP + shape_of(name).half_height + 0.02
        return bool(inside and resting and not env.grasped(name))

    def plan(self, env: TabletopEnv, m: Motion):
        name = env.scene.target
        yield from grasp(env, m, name)
        cx, cy = env.scene.container
        carry = TABLE_TOP + 0.14
        yield from m.to(np.append(env.tip_position()[:2], carry), None, 0.0, tol=0.02)
        yield from m.to((cx, cy, carry), None, 0.0, tol=0.015, noisy=True)
        yield from m.to((cx, cy, carry), None, 0.0, tol=0.006)
        yield from m.to((cx, cy, TABLE_TOP + shape_of(name).half_height + 0.03), None, 0.0, tol=0.008)
        yield from m.hold(1.0, 3)
        yield from m.to((cx, cy, carry), None, 1.0, tol=0.02)
