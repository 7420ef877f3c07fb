"""The simulated world: a private PyBullet client, the Franka Panda, the tabletop and its safety monitor."""

from sim.env import ACTION_NAMES, STATE_NAMES, TabletopEnv
from sim.safety import COUNT_EVENTS, EVENTS, SafetyLimits

__all__ = ["ACTION_NAMES", "COUNT_EVENTS", "EVENTS", "STATE_NAMES", "SafetyLimits", "TabletopEnv"]
