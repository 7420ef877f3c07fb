"""TabletopEnv: the Gymnasium environment that composes the Panda, the tabletop world and a task.

The env holds no task logic: a task (see `tasks/`) samples the scene from `self.np_random`, writes the instruction,
judges success and provides a scripted expert. Observations are
`{"image": (S, S, 3) uint8, "state": (7,) float32, "instruction": str}` (+ `"wrist_image"` when enabled); the
instruction is also in `info`. One control step (10 Hz) is 24 physics substeps (240 Hz).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from sim.bullet import Bullet, Camera
from sim.robot import HOME_POSITION, Panda
from sim.safety import SafetyLimits, SafetyMonitor
from sim.scene import Scene, build_table, clear_scene, place_scene
from sim.spaces import InstructionSpace

CONTROL_HZ = 10
SUBSTEPS = 24
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
STATE_NAMES = ("x", "y", "z", "roll", "pitch", "yaw", "gripper_width")
MAX_TRANSLATION = 0.05  # m per step
MAX_ROTATION = 0.3  # rad per step
TARGET_LOW = np.asarray((0.15, -0.45, -0.02))  # the commanded tip target is clipped to this box
TARGET_HIGH = np.asarray((0.85, 0.45, 0.6))
INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " .,'-?!"
FRONT_CAMERA = Camera(eye=(0.95, 0.0, 0.6), target=(0.47, 0.0, 0.04), fov=42.0)
STATE_LOW = np.asarray((-2, -2, -2, -np.pi, -np.pi, -np.pi, 0.0), dtype=np.float32)
STATE_HIGH = np.asarray((2, 2, 2, np.pi, np.pi, np.pi, 0.1), dtype=np.float32)
FLY_AWAY_SPEED = 4.0  # m/s: an object this fast means the physics blew up
# Each episode starts with the tip drawn uniformly within +- this (m) of HOME_POSITION (unless options["start"]
# sets it): from one fixed start, where the gripper has moved to already tells a policy where it is going, and a
# VLA trained so learns to continue the motion instead of finding the named object.
START_SPREAD = (0.07, 0.1, 0.03)


class Task(Protocol):
    """What TabletopEnv needs from a task (implemented in `tasks/`)."""

    name: str
    max_steps: int

    def sample_scene(self, rng: np.random.Generator, options: dict) -> Scene: ...

    def instruction(self, scene: Scene, rng: np.random.Generator, options: dict) -> str: ...

    def success(self, env: "TabletopEnv") -> bool: ...


class TabletopEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(
        self,
        task: Task,
        *,
        render_mode: str | None = None,
        image_size: int = 96,
        render_size: int = 256,
        wrist_camera: bool = False,
        simple_meshes: bool = True,
        terminate_on_success: bool = True,
        safety_limits: SafetyLimits = SafetyLimits(),
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r} is not supported; use one of {self.metadata['render_modes']} or None")
        if image_size < 16:
            raise ValueError(f"image_size={image_size} is too small to see anything; use 64 or more")
        self.task = task
        self.render_mode = render_mode
        self.image_size, self.render_size = image_size, render_size
        self.wrist_camera = wrist_camera
        self.terminate_on_success = terminate_on_success
        self.world = Bullet()
        self.robot = Panda(self.world, simple_meshes=simple_meshes)
        build_table(self.world)
        self.monitor = SafetyMonitor(self.world, self.robot, safety_limits)
        self._start_state = self.world.save_state()
        self.camera = FRONT_CAMERA
        self.scene: Scene | None = None
        self.instruction = ""
        self.steps = 0
        self.start_positions: dict[str, np.ndarray] = {}

        high = np.asarray([MAX_TRANSLATION] * 3 + [MAX_ROTATION] * 3 + [1.0], dtype=np.float32)
        low = -high.copy()
        low[6] = 0.0
        self.action_space = spaces.Box(low, high, dtype=np.float32)
        obs = {
            "image": spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            "state": spaces.Box(STATE_LOW, STATE_HIGH, dtype=np.float32),
            "instruction": InstructionSpace(max_length=256, min_length=1, charset=INSTRUCTION_CHARSET),
        }
        if wrist_camera:
            obs["wrist_image"] = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = spaces.Dict(obs)

    # --- Gymnasium API -------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        clear_scene(self.world, self.scene)
        self.world.restore_state(self._start_state)
        if "start" not in options:
            spread = np.asarray(START_SPREAD)
            options["start"] = tuple(float(v) for v in HOME_POSITION + self.np_random.uniform(-spread, spread))
        self.robot.start_at(options["start"])
        self.scene = self.task.sample_scene(self.np_random, options)
        place_scene(self.world, self.scene)
        self._sample_view(options)
        self.instruction = self.task.instruction(self.scene, self.np_random, options)
        self.world.step(SUBSTEPS)  # let the objects settle onto the table
        self.start_positions = {o.name: self.world.pose(o.name)[0] for o in self.scene.objects}
        self.monitor.reset(self.scene)
        self.steps = 0
        info = {"instruction": self.instruction, "task": self.task.name, "is_success": False, "error": None}
        return self._obs(), info

    def step(self, action):
        action = np.asarray(action, dtype=np.float32)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action has shape {action.shape}; expected {self.action_space.shape} {ACTION_NAMES}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action {action.tolist()} is not finite; the policy produced NaN or inf")
        action = np.clip(action, self.action_space.low, self.action_space.high)
        self.robot.apply(action, TARGET_LOW, TARGET_HIGH)
        for _ in range(SUBSTEPS):
            self.world.client.stepSimulation()
            self.monitor.substep()
        events = self.monitor.end_step()
        self.steps += 1
        error = self._physics_error()
        success = error is None and bool(self.task.success(self))
        terminated = error is not None or (success and self.terminate_on_success)
        info = {
            "instruction": self.instruction,
            "task": self.task.name,
            "is_success": success,
            "safety": events,
            "safety_total": dict(self.monitor.totals),
            "error": error,
        }
        if "other" in self.scene.extra:
            info["other_success"] = error is None and self.success_at(self.scene.extra["other"])
        return self._obs(), float(success), terminated, False, info

    def render(self):
        if self.render_mode == "rgb_array":
            return self.world.render(self.camera, self.render_size)
        return None

    def close(self):
        self.world.close()

    # --- helpers -------------------------------------------------------------------------------------------------
    def _sample_view(self, options: dict) -> None:
        """Camera pose and light, jittered when `options` asks for it (generalization suites)."""
        jitter = float(options.get("camera_jitter", 0.0))
        eye = np.asarray(FRONT_CAMERA.eye) + (self.np_random.uniform(-jitter, jitter, 3) if jitter else 0.0)
        self.camera = Camera(eye=tuple(eye), target=FRONT_CAMERA.target, fov=FRONT_CAMERA.fov)
        self.world.set_light(options.get("light_direction", (0.6, -0.4, 1.0)))

    def _obs(self) -> dict[str, Any]:
        obs = {
            "image": self.world.render(self.camera, self.image_size),
            "state": self.robot.state(),
            "instruction": self.instruction,
        }
        if self.wrist_camera:
            pos, orn = self.robot.tip_pose()
            m = np.asarray(self.world.client.getMatrixFromQuaternion(orn)).reshape(3, 3)
            eye = pos - 0.1 * m[:, 2] + 0.05 * m[:, 0]
            cam = Camera(eye=tuple(eye), target=tuple(pos + 0.1 * m[:, 2]), up=tuple(m[:, 0]), fov=70.0, near=0.01)
            obs["wrist_image"] = self.world.render(cam, self.image_size)
        return obs

    def _physics_error(self) -> str | None:
        """A non-finite state or an object flying away: the episode ends as an error, never as data."""
        if not np.all(np.isfinite(self.robot.state())):
            return "non-finite robot state (physics blow-up)"
        for o in self.scene.objects:
            pos, _ = self.world.pose(o.name)
            lin, _ = self.world.velocity(o.name)
            if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(lin))):
                return f"non-finite state of {o.name}"
            if np.linalg.norm(lin) > FLY_AWAY_SPEED:
                return f"{o.name} flew away at {np.linalg.norm(lin):.1f} m/s"
        return None

    # --- queries used by tasks and experts ------------------------------------------------------------------------
    def object_pose(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.world.pose(name)

    def success_at(self, name: str) -> bool:
        """Would the task count as done had the instruction named object `name`? (The task reads scene.target.)"""
        scene = self.scene
        self.scene = dataclasses.replace(scene, target=name)
        try:
            return bool(self.task.success(self))
        finally:
            self.scene = scene

    def tip_position(self) -> np.ndarray:
        return self.robot.tip_pose()[0]

    def grasped(self, name: str) -> bool:
        """Both fingers touch the object."""
        fingers = {c[3] for c in self.world.contacts("robot", name)}
        return {9, 10} <= fingers

    def touching(self, a: str, b: str) -> bool:
        return bool(self.world.contacts(a, b))

