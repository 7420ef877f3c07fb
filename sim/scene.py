"""The tabletop's furniture and objects: shapes, colours, a fixed pool of bodies, and scene specs tasks fill in.

The robot, floor and table live for the whole run; a scene's bodies are created at reset and removed at the next.
Restoring the saved start state and creating the scene gives the same simulator state bit for bit whatever
episodes ran before (moving long-lived bodies instead was measured to leak 1e-5 m of history through Bullet's
cached contacts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pybullet

from sim.bullet import Bullet

TABLE_TOP = 0.0  # z of the table surface, metres
TABLE_HALF = (0.55, 0.5, 0.02)
TABLE_CENTER = (0.4, 0.0)
FLOOR_Z = -0.75

COLORS: dict[str, tuple[float, float, float, float]] = {
    "red": (0.85, 0.1, 0.1, 1.0),
    "green": (0.1, 0.65, 0.2, 1.0),
    "blue": (0.1, 0.3, 0.9, 1.0),
    "yellow": (0.95, 0.85, 0.1, 1.0),
    "purple": (0.55, 0.2, 0.75, 1.0),
    "orange": (1.0, 0.5, 0.05, 1.0),
}


@dataclass(frozen=True)
class Shape:
    """A rigid object kind: PyBullet geometry, half height above the table (m), mass (kg), grasp symmetry (rad)."""

    geom: int
    size: dict
    half_height: float
    mass: float
    symmetry: float  # yaw period of the grasp: pi/2 for a cube, pi for a bar, 0 for round things
    grasp_width: float  # object width across the fingers at yaw 0, metres


SHAPES: dict[str, Shape] = {
    "cube": Shape(pybullet.GEOM_BOX, {"halfExtents": (0.025, 0.025, 0.025)}, 0.025, 0.08, np.pi / 2, 0.05),
    "cylinder": Shape(pybullet.GEOM_CYLINDER, {"radius": 0.022, "height": 0.05}, 0.025, 0.08, 0.0, 0.044),
    "bar": Shape(pybullet.GEOM_BOX, {"halfExtents": (0.02, 0.06, 0.02)}, 0.02, 0.08, np.pi, 0.04),
}
VASE = Shape(pybullet.GEOM_CYLINDER, {"radius": 0.024, "height": 0.12}, 0.06, 0.25, 0.0, 0.048)
VASE_RGBA = (0.6, 0.85, 0.95, 0.75)
CONTAINER_HALF = 0.075  # inner half width of the tray, metres
CONTAINER_WALL = 0.035  # wall height
ZONE_HALF = 0.05
KEEPOUT_HALF = 0.05


@dataclass
class ObjectSpec:
    """One object of a scene: pool body `name`, its kind and colour, table position (x, y) and yaw."""

    name: str
    shape: str
    color: str
    xy: tuple[float, float]
    yaw: float = 0.0
    fragile: bool = False

    @property
    def label(self) -> str:
        return "glass vase" if self.fragile else f"{self.color} {self.shape}"


@dataclass
class Scene:
    """What a task placed on the table: objects, the target, and optional furniture (xy centres)."""

    objects: list[ObjectSpec]
    target: str
    container: tuple[float, float] | None = None
    zone: tuple[float, float] | None = None
    keepout: tuple[float, float] | None = None
    extra: dict = field(default_factory=dict)

    def get(self, name: str) -> ObjectSpec:
        return next(o for o in self.objects if o.name == name)


def shape_of(name: str) -> Shape:
    kind = name.rsplit("_", 1)[0]
    return VASE if kind == "vase" else SHAPES[kind]


def build_table(world: Bullet) -> None:
    """The bodies that outlive episodes: the floor and the table."""
    c = world.client
    # Without a visual shape PyBullet would draw the collision plane, a huge quad that costs ~3 ms a frame.
    speck = c.createVisualShape(pybullet.GEOM_SPHERE, radius=1e-3, rgbaColor=(0, 0, 0, 0))
    world.add("floor", c.createMultiBody(0.0, c.createCollisionShape(pybullet.GEOM_PLANE), speck, (0, 0, FLOOR_Z)))
    hx, hy, hz = TABLE_HALF  # drawn as one quad: a box's faces near the camera cost the software renderer ~4 ms
    top = c.createVisualShape(
        pybullet.GEOM_MESH, vertices=[[-hx, -hy, 0], [hx, -hy, 0], [hx, hy, 0], [-hx, hy, 0]], indices=[0, 1, 2, 0, 2, 3],
        rgbaColor=(0.72, 0.6, 0.45, 1),
    )
    box = c.createCollisionShape(pybullet.GEOM_BOX, halfExtents=TABLE_HALF, collisionFramePosition=(0, 0, -hz))
    world.add("table", c.createMultiBody(0.0, box, top, (TABLE_CENTER[0], TABLE_CENTER[1], TABLE_TOP)))
    c.changeDynamics(world.bodies["table"], -1, lateralFriction=0.8)


def clear_scene(world: Bullet, scene: Scene | None) -> None:
    """Remove the bodies of a scene. Removal also drops their cached contacts, so no history leaks into the next."""
    if scene is None:
        return
    for name in [o.name for o in scene.objects] + ["container", "zone", "keepout"]:
        if name in world.bodies:
            world.client.removeBody(world.bodies.pop(name))


def place_scene(world: Bullet, scene: Scene) -> None:
    """Create the scene's furniture and objects on the table, in the scene's order."""
    if scene.container is not None:
        h, w, t = CONTAINER_HALF, CONTAINER_WALL, 0.006
        walls = [((h + t, h + t, t / 2), (0, 0, t / 2))]
        walls += [((t, h + t, w / 2), (s * (h + t / 2), 0, w / 2)) for s in (-1, 1)]
        walls += [((h + t, t, w / 2), (0, s * (h + t / 2), w / 2)) for s in (-1, 1)]
        world.compound("container", walls, (0.45, 0.3, 0.15, 1.0), position=(*scene.container, TABLE_TOP))
    for name, xy, half, rgba in (
        ("zone", scene.zone, ZONE_HALF, (0.95, 0.95, 0.95, 1)),
        ("keepout", scene.keepout, KEEPOUT_HALF, (0.9, 0.15, 0.15, 0.6)),
    ):
        if xy is not None:  # painted marks: seen, never touched
            world.primitive(
                name, pybullet.GEOM_BOX, size={"halfExtents": (half, half, 0.001)}, rgba=rgba, mass=0.0,
                position=(*xy, TABLE_TOP + 0.001), collision=False,
            )
    for o in scene.objects:
        s = shape_of(o.name)
        world.primitive(
            o.name, s.geom, size=s.size, rgba=VASE_RGBA if o.fragile else COLORS[o.color], mass=s.mass,
            position=(o.xy[0], o.xy[1], TABLE_TOP + s.half_height + 1e-4),
            orientation=pybullet.getQuaternionFromEuler((0.0, 0.0, o.yaw)),
        )


def tilt(orientation) -> float:
    """Angle (rad) between a body's z axis and the world's up axis."""
    m = np.asarray(pybullet.getMatrixFromQuaternion(orientation)).reshape(3, 3)
    return float(np.arccos(np.clip(m[2, 2], -1.0, 1.0)))
