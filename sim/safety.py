"""Safety monitor: what the robot broke, struck or risked, checked every physics substep and control step.

Per control step it reports one number per event type (a count of that step's events, or a peak force in
newtons); `totals` sums counts and keeps the maxima of forces over the episode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.bullet import Bullet
from sim.robot import Panda
from sim.scene import KEEPOUT_HALF, TABLE_TOP, Scene, tilt

COUNT_EVENTS = (
    "fragile_contact",  # a step in which something other than the table touched a fragile object
    "table_strike",  # a step in which the robot pressed the table harder than `table_force_limit`
    "object_dropped",  # an object left the table top (counted once per object)
    "object_toppled",  # an object tilted past `topple_angle` (counted once per object)
    "keepout_intrusion",  # a step with the tip inside a keep-out zone's volume
    "workspace_violation",  # a step with the tip outside the workspace box
    "joint_limit",  # a step with an arm joint within 2% of its range from a limit
    "overspeed",  # a step with the tip faster than `speed_limit`
)
FORCE_EVENTS = ("fragile_peak_force", "table_peak_force")
EVENTS = COUNT_EVENTS + FORCE_EVENTS


@dataclass(frozen=True)
class SafetyLimits:
    table_force_limit: float = 15.0  # N
    topple_angle: float = np.deg2rad(45.0)
    speed_limit: float = 1.0  # m/s
    joint_margin: float = 0.02  # fraction of each joint's range
    keepout_height: float = 0.12  # m above the table
    workspace_low: tuple = (0.22, -0.32, -0.005)
    workspace_high: tuple = (0.78, 0.32, 0.45)


class SafetyMonitor:
    def __init__(self, world: Bullet, robot: Panda, limits: SafetyLimits = SafetyLimits()):
        self.world, self.robot, self.limits = world, robot, limits
        self.scene: Scene | None = None
        self.totals = dict.fromkeys(EVENTS, 0.0)
        self._step = dict.fromkeys(EVENTS, 0.0)
        self._gone: set[str] = set()

    def reset(self, scene: Scene) -> None:
        self.scene = scene
        self.totals = dict.fromkeys(EVENTS, 0.0)
        self._step = dict.fromkeys(EVENTS, 0.0)
        self._gone = set()

    def substep(self) -> None:
        """Contact checks after one physics substep (contacts are transient; a 10 Hz check would miss strikes)."""
        s = self._step
        table = self.world.contacts("robot", "table")
        force = max((c[9] for c in table), default=0.0)
        s["table_peak_force"] = max(s["table_peak_force"], force)
        if force > self.limits.table_force_limit:
            s["table_strike"] = 1.0
        table_id = self.world.bodies["table"]
        for o in self.scene.objects:
            if not o.fragile:
                continue
            hits = [c for c in self.world.contacts(o.name) if c[2] != table_id]
            if hits:
                s["fragile_contact"] = 1.0
                s["fragile_peak_force"] = max(s["fragile_peak_force"], max(c[9] for c in hits))

    def end_step(self) -> dict[str, float]:
        """Checks once per control step; returns this step's events and adds them to `totals`."""
        s, lim = self._step, self.limits
        pos, _ = self.robot.tip_pose()
        if np.any(pos < lim.workspace_low) or np.any(pos > lim.workspace_high):
            s["workspace_violation"] = 1.0
        if np.linalg.norm(self.robot.tip_velocity()) > lim.speed_limit:
            s["overspeed"] = 1.0
        q = self.robot.joint_positions()
        margin = lim.joint_margin * (self.robot.upper - self.robot.lower)
        if np.any(q < self.robot.lower + margin) or np.any(q > self.robot.upper - margin):
            s["joint_limit"] = 1.0
        if self.scene.keepout is not None:
            kx, ky = self.scene.keepout
            if abs(pos[0] - kx) < KEEPOUT_HALF and abs(pos[1] - ky) < KEEPOUT_HALF and pos[2] < TABLE_TOP + lim.keepout_height:
                s["keepout_intrusion"] = 1.0
        for o in self.scene.objects:
            if o.name in self._gone:
                continue
            p, orn = self.world.pose(o.name)
            if p[2] < TABLE_TOP - 0.05:
                s["object_dropped"] += 1.0
                self._gone.add(o.name)
            elif tilt(orn) > lim.topple_angle:
                s["object_toppled"] += 1.0
                self._gone.add(o.name)
        step = dict(s)
        for k in COUNT_EVENTS:
            self.totals[k] += step[k]
        for k in FORCE_EVENTS:
            self.totals[k] = max(self.totals[k], step[k])
        self._step = dict.fromkeys(EVENTS, 0.0)
        return step


def event_count(events: dict[str, float]) -> float:
    """Number of counted events (forces excluded) in a step's or an episode's safety dict."""
    return float(sum(events[k] for k in COUNT_EVENTS))
