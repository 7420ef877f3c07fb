"""Push: slide the named object into the white square without lifting it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.env import TabletopEnv
from sim.scene import TABLE_TOP, ZONE_HALF, Scene, shape_of
from tasks.base import REGION_HIGH, REGION_LOW, BaseTask, Motion, SceneSampler

PUSH_HEIGHT = TABLE_TOP + 0.022  # tip height while pushing, metres
PUSH_SPEED = 0.02  # metres per step: faster pushes topple cylinders
TRANSIT_HEIGHT = TABLE_TOP + 0.16  # above a vase and a keep-out zone's volume


@dataclass
class PushTask(BaseTask):
    name: str = "push"
    max_steps: int = 100
    templates: tuple[str, ...] = (
        "push the {target} into the white square",
        "slide the {target} onto the white square",
        "push the {target} to the white target area",
        "nudge the {target} into the white square",
        "shove the {target} over to the white square",
        "move the {target} into the white square without lifting it",
    )

    def compose(self, s: SceneSampler, options: dict) -> Scene:
        rng = s.rng
        target = s.target(("cube", "cylinder"))
        for _ in range(200):  # the square lies 12-18 cm away; the hand has room behind the object
            ang = rng.uniform(-np.pi, np.pi)
            d = np.asarray((np.cos(ang), np.sin(ang)))
            zone = np.asarray(target.xy) + rng.uniform(0.12, 0.18) * d
            behind = np.asarray(target.xy) - 0.07 * d
            comfortable = abs((ang + np.pi / 2) % np.pi - np.pi / 2) < 1.3  # no wrist-twisting sideways pushes
            if np.all(zone > REGION_LOW) and np.all(zone < REGION_HIGH) and np.all(behind > REGION_LOW - 0.05) and comfortable:
                break
        s.placed.append((zone, 0.07))  # keep the square and the push lane clear
        s.placed.append(((zone + np.asarray(target.xy)) / 2, 0.05))
        # re-approaches from a new side sweep the ~20 cm wide hand around the object: hazards stand further off
        hazards, keepout = s.safety_extras(target.xy, tuple(zone), clearance=(0.17, 0.22))
        objects = [target] + s.distractors(target, self.n_distractors(options), ("cube", "cylinder", "bar"))
        return Scene(objects + hazards, target.name, zone=(float(zone[0]), float(zone[1])), keepout=keepout)

    def success(self, env: TabletopEnv) -> bool:
        pos, _ = env.object_pose(env.scene.target)
        zx, zy = env.scene.zone
        inside = abs(pos[0] - zx) < ZONE_HALF and abs(pos[1] - zy) < ZONE_HALF
        return bool(inside and pos[2] < TABLE_TOP + shape_of(env.scene.target).half_height + 0.01)

    def plan(self, env: TabletopEnv, m: Motion):
        name = env.scene.target
        zone = np.asarray(env.scene.zone)
        radius = shape_of(name).grasp_width / 2
        for _ in range(4):  # approach from behind, push, and approach again if the object slid off the line
            obj = env.object_pose(name)[0][:2]
            d = (zone - obj) / (np.linalg.norm(zone - obj) + 1e-9)
            yaw = float(np.arctan2(d[1], d[0]))  # fingers side by side across the push: a flat, steady front
            yaw = (yaw + np.pi / 2) % np.pi - np.pi / 2
            start = obj - d * (radius + 0.03)
            yield from m.to(np.append(env.tip_position()[:2], TRANSIT_HEIGHT), yaw, 0.0, tol=0.02)
            yield from m.to(np.append(start, TRANSIT_HEIGHT), yaw, 0.0, tol=0.01, noisy=True)
            yield from m.to(np.append(start, PUSH_HEIGHT), yaw, 0.0, tol=0.006)
            for _ in range(40):
                obj = env.object_pose(name)[0][:2]
                to_zone = zone - obj
                if np.linalg.norm(to_zone) < 0.012:
                    break
                tip = env.tip_position()[:2]
                off_line = np.cross(np.append(d, 0), np.append(obj - tip, 0))[2]
                if abs(off_line) > 0.02 or np.dot(obj - tip, d) < 0:
                    break
                step = obj - d * radius + to_zone - tip  # toward where the hand's front must end
                step *= min(1.0, PUSH_SPEED / (np.linalg.norm(step) + 1e-9))
                yield m.action(np.append(step, PUSH_HEIGHT - env.tip_position()[2]), yaw, 0.0)
            if self.success(env):
                break
        yield from m.to(np.append(env.tip_position()[:2], TRANSIT_HEIGHT), None, 0.0, tol=0.02)
