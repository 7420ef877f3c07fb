"""A thin owner of one private PyBullet physics client: named bodies, primitive shapes, state save/restore, camera."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from sim.quiet import quiet

with quiet(2):  # PyBullet prints its build time to stderr when first imported, and sim/ imports it here first
    import pybullet
    import pybullet_data
    from pybullet_utils.bullet_client import BulletClient


@dataclass(frozen=True)
class Camera:
    """A pinhole camera looking from `eye` at `target`; `fov` in degrees, images (size, size, 3) uint8."""

    eye: tuple[float, float, float]
    target: tuple[float, float, float]
    fov: float = 50.0
    up: tuple[float, float, float] = (0.0, 0.0, 1.0)
    near: float = 0.02
    far: float = 3.0


def _disconnect(client: BulletClient) -> None:
    if client._client >= 0:
        client.disconnect()


class Bullet:
    """One DIRECT-mode physics client (never the module-global one), with bodies addressed by name."""

    def __init__(self, timestep: float = 1.0 / 240.0, solver_iterations: int = 20):
        with quiet(1):  # every connect prints "argv[0]=" to stdout
            self.client = BulletClient(connection_mode=pybullet.DIRECT)
        # Disconnects on close(), on garbage collection, or at interpreter exit while the modules still exist:
        # BulletClient's own __del__, run during module teardown, prints "Exception ignored ... TypeError".
        self._disconnect = weakref.finalize(self, _disconnect, self.client)
        self.client.setAdditionalSearchPath(pybullet_data.getDataPath())
        self.client.setGravity(0.0, 0.0, -9.81)
        self.client.setTimeStep(timestep)
        # 20 solver iterations (PyBullet's default is 50) halve the cost of a substep; grasps stay firm (tested).
        self.client.setPhysicsEngineParameter(deterministicOverlappingPairs=1, numSolverIterations=solver_iterations)
        self.timestep = timestep
        self.bodies: dict[str, int] = {}
        self._shapes: dict[tuple, tuple[int, int]] = {}
        self._light = (0.6, -0.4, 1.0)

    def close(self) -> None:
        """Disconnect the physics client; calling it again does nothing."""
        self._disconnect()

    def add(self, name: str, body_id: int) -> int:
        if name in self.bodies:
            raise ValueError(f"a body named {name!r} already exists")
        self.bodies[name] = body_id
        return body_id

    def primitive(
        self,
        name: str,
        geom: int,
        *,
        size: dict,
        rgba: tuple[float, float, float, float],
        mass: float,
        position=(0.0, 0.0, 0.0),
        orientation=(0.0, 0.0, 0.0, 1.0),
        collision: bool = True,
        friction: float = 1.0,
    ) -> int:
        """Create one box/cylinder body. `size` holds halfExtents, or radius and height for a cylinder."""
        c = self.client
        key = (geom, tuple(sorted(size.items())), collision)
        if key not in self._shapes:  # one shape per kind for the whole run; colour is set per body
            vis_size = {("length" if k == "height" else k): v for k, v in size.items()}
            col = c.createCollisionShape(geom, **size) if collision else -1
            self._shapes[key] = (col, c.createVisualShape(geom, **vis_size))
        col, vis = self._shapes[key]
        body = c.createMultiBody(mass, col, vis, basePosition=position, baseOrientation=orientation)
        c.changeVisualShape(body, -1, rgbaColor=list(rgba))
        if collision:
            c.changeDynamics(body, -1, lateralFriction=friction, spinningFriction=0.001, rollingFriction=0.0005)
        return self.add(name, body)

    def compound(self, name: str, boxes: list[tuple[tuple, tuple]], rgba, position=(0.0, 0.0, 0.0)) -> int:
        """A static body made of boxes, each (half_extents, offset)."""
        c = self.client
        key = ("compound", tuple(boxes), tuple(rgba))
        if key not in self._shapes:
            halves = [list(h) for h, _ in boxes]
            offsets = [list(o) for _, o in boxes]
            geoms = [pybullet.GEOM_BOX] * len(boxes)
            self._shapes[key] = (
                c.createCollisionShapeArray(geoms, halfExtents=halves, collisionFramePositions=offsets),
                c.createVisualShapeArray(geoms, halfExtents=halves, visualFramePositions=offsets, rgbaColors=[rgba] * len(boxes)),
            )
        col, vis = self._shapes[key]
        return self.add(name, c.createMultiBody(0.0, col, vis, basePosition=position))

    def pose(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Base position (3,) in metres and orientation quaternion (4,) xyzw."""
        pos, orn = self.client.getBasePositionAndOrientation(self.bodies[name])
        return np.asarray(pos), np.asarray(orn)

    def velocity(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        lin, ang = self.client.getBaseVelocity(self.bodies[name])
        return np.asarray(lin), np.asarray(ang)

    def set_pose(self, name: str, position, orientation=(0.0, 0.0, 0.0, 1.0)) -> None:
        body = self.bodies[name]
        self.client.resetBasePositionAndOrientation(body, position, orientation)
        self.client.resetBaseVelocity(body, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))

    def contacts(self, a: str, b: str | None = None) -> list:
        """Contact points of body `a` (with body `b` if given); each has its normal force at index 9."""
        if b is None:
            return self.client.getContactPoints(bodyA=self.bodies[a])
        return self.client.getContactPoints(bodyA=self.bodies[a], bodyB=self.bodies[b])

    def save_state(self) -> int:
        return self.client.saveState()

    def restore_state(self, state_id: int) -> None:
        self.client.restoreState(stateId=state_id)

    def step(self, substeps: int) -> None:
        for _ in range(substeps):
            self.client.stepSimulation()

    def set_light(self, direction) -> None:
        self._light = tuple(float(x) for x in direction)

    def render(self, camera: Camera, size: int) -> np.ndarray:
        """RGB image (size, size, 3) uint8 from the software renderer (works headless, deterministic)."""
        c = self.client
        view = c.computeViewMatrix(camera.eye, camera.target, camera.up)
        proj = c.computeProjectionMatrixFOV(camera.fov, 1.0, camera.near, camera.far)
        _, _, rgba, _, _ = c.getCameraImage(
            size,
            size,
            view,
            proj,
            renderer=pybullet.ER_TINY_RENDERER,
            flags=pybullet.ER_NO_SEGMENTATION_MASK,
            shadow=0,
            lightDirection=list(self._light),
        )
        return np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[:, :, :3].copy()
