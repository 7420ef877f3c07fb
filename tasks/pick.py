"""Pick: grasp the named object and lift it at least 5 cm."""

from __future__ import annotations

from dataclasses import dataclass


from sim.env import TabletopEnv
from tasks.base import BaseTask, Motion, grasp_yaw

LIFT = 0.05  # m above the start height


def grasp(env: TabletopEnv, m: Motion, name: str):
    """Approach from above with the fingers across the object's narrow side, descend, close."""
    obj = env.scene.get(name)
    pos, _ = env.object_pose(name)
    yaw = grasp_yaw(obj, m.yaw())
    yield from m.to(pos + (0, 0, 0.1), yaw, 1.0, tol=0.015, noisy=True)
    yield from m.to(pos + (0, 0, 0.1), yaw, 1.0, tol=0.006)
    yield from m.to(pos + (0, 0, 0.003), yaw, 1.0, tol=0.006)
    yield from m.hold(0.0, 4, yaw)


def lifted(env: TabletopEnv, name: str) -> bool:
    z = env.object_pose(name)[0][2]
    return bool(z - env.start_positions[name][2] >= LIFT and env.grasped(name))


@dataclass
class PickTask(BaseTask):
    name: str = "pick"
    max_steps: int = 60
    templates: tuple[str, ...] = (
        "pick up the {target}",
        "lift the {target}",
        "grab the {target} and raise it",
        "take the {target} off the table",
        "grasp the {target} and lift it up",
        "raise the {target} into the air",
    )

    def success(self, env: TabletopEnv) -> bool:
        return lifted(env, env.scene.target)

    def plan(self, env: TabletopEnv, m: Motion):
        yield from grasp(env, m, env.scene.target)
        pos = env.tip_position()
        yield from m.to(pos + (0, 0, 0.12), None, 0.0, tol=0.01)
