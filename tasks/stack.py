"""Stack: put the named cube on top of another named object."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.env import TabletopEnv
from sim.scene import TABLE_TOP, Scene, shape_of, tilt
from tasks.base import BaseTask, SceneSampler, Motion
from tasks.pick import grasp


@dataclass
class StackTask(BaseTask):
    name: str = "stack"
    max_steps: int = 100
    templates: tuple[str, ...] = (
        "stack the {target} on the {base}",
        "put the {target} on top of the {base}",
        "place the {target} onto the {base}",
        "set the {target} on the {base}",
        "pile the {target} on the {base}",
        "build a tower with the {target} on the {base}",
    )

    def compose(self, s: SceneSampler, options: dict) -> Scene:
        target = s.target(("cube",))
        shape, color = s.identity(("cube", "cylinder"), {("cube", target.color)})
        base = s.new_object(shape, color)
        hazards, keepout = s.safety_extras(target.xy, base.xy)
        n = max(self.n_distractors(options) - 1, 0)
        others = s.distractors(target, n, ("cube", "cylinder", "bar"), taken={(base.shape, base.color)})
        return Scene([target, base] + others + hazards, target.name, keepout=keepout, extra={"base": base.name})

    def success(self, env: TabletopEnv) -> bool:
        name, base = env.scene.target, env.scene.extra["base"]
        pos, _ = env.object_pose(name)
        bpos, born = env.object_pose(base)
        top = bpos[2] + shape_of(base).half_height + shape_of(name).half_height
        on = np.linalg.norm(pos[:2] - bpos[:2]) < 0.025 and abs(pos[2] - top) < 0.01
        return bool(on and tilt(born) < 0.2 and not env.grasped(name))

    def plan(self, env: TabletopEnv, m: Motion):
        name, base = env.scene.target, env.scene.extra["base"]
        yield from grasp(env, m, name)
        bpos, _ = env.object_pose(base)
        drop = TABLE_TOP + 2 * shape_of(base).half_height + shape_of(name).half_height + 0.012
        carry = drop + 0.08
        yield from m.to(np.append(env.tip_position()[:2], carry), None, 0.0, tol=0.02)
        yield from m.to((bpos[0], bpos[1], carry), None, 0.0, tol=0.015, noisy=True)
        yield from m.to((bpos[0], bpos[1], carry), None, 0.0, tol=0.005)
        yield from m.to((bpos[0], bpos[1], drop), None, 0.0, tol=0.005)
        yield from m.hold(1.0, 3)
        yield from m.to((bpos[0], bpos[1], carry), None, 1.0, tol=0.02)
