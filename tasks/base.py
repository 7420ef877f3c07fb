"""What every task shares: seed ranges, scene sampling with distractors, instruction templates, expert motions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sim.env import MAX_ROTATION, TabletopEnv
from sim.robot import HOME_POSITION
from sim.scene import COLORS, SHAPES, ObjectSpec, Scene, shape_of

TRAIN_SEEDS = range(0, 1_000_000)
TEST_SEEDS = range(1_000_000, 2_000_000)  # held out: evaluation suites draw from here only
REGION_LOW = np.asarray((0.34, -0.22))  # where objects are placed on the table (x, y), metres
REGION_HIGH = np.asarray((0.64, 0.22))
TARGET_Y = 0.16  # training targets have |y| <= TARGET_Y; the band beyond is held out
HELDOUT_COMBOS = frozenset({("cube", "purple"), ("cylinder", "orange"), ("bar", "green")})
FOOTPRINT = {"cube": 0.04, "cylinder": 0.035, "bar": 0.065, "vase": 0.03, "container": 0.12, "zone": 0.055, "keepout": 0.06}


class SceneSampler:
    """Draws non-overlapping table positions and object identities from one random generator.

    Held out of the training distribution (for the generalization suite): the (shape, colour) pairs in
    HELDOUT_COMBOS, which appear only with `options["novel_target"]` (then as the target), and target positions
    with |y| > TARGET_Y, which appear only with `options["target_region"] == "outer"`.
    """

    def __init__(self, rng: np.random.Generator, options: dict | None = None):
        self.rng = rng
        self.options = dict(options or {})
        self.colors = tuple(self.options.get("colors") or COLORS)
        self.placed: list[tuple[np.ndarray, float]] = []
        self.start_xy = tuple(self.options.get("start", HOME_POSITION))[:2]  # where the tip starts (x, y)
        self.used: dict[str, int] = {}

    def position(self, kind: str, target: bool = False) -> tuple[float, float]:
        r = FOOTPRINT[kind]
        outer = target and self.options.get("target_region") == "outer"
        high = np.asarray((REGION_HIGH[0], TARGET_Y)) if target and not outer else REGION_HIGH
        low = -high * (0, 1) + REGION_LOW * (1, 0)
        for _ in range(500):
            xy = self.rng.uniform(low, high)
            if outer:
                xy[1] = np.sign(xy[1] or 1.0) * self.rng.uniform(TARGET_Y, REGION_HIGH[1])
            if all(np.linalg.norm(xy - p) > r + q + 0.012 for p, q in self.placed):
                self.placed.append((xy, r))
                return float(xy[0]), float(xy[1])
        raise RuntimeError(f"could not place a {kind} without overlap; ask for fewer distractors")

    def new_object(self, shape: str, color: str, target: bool = False) -> ObjectSpec:
        i = self.used.get(shape, 0)
        self.used[shape] = i + 1
        yaw = float(self.rng.uniform(-np.pi / 4, np.pi / 4))
        return ObjectSpec(f"{shape}_{i}", shape, color, self.position(shape, target), yaw)

    def identity(self, shapes: tuple[str, ...], exclude: set[tuple[str, str]]) -> tuple[str, str]:
        choices = [(s, c) for s in shapes for c in self.colors if (s, c) not in exclude | HELDOUT_COMBOS]
        return choices[self.rng.integers(len(choices))]

    def target(self, shapes: tuple[str, ...], exclude: set[tuple[str, str]] = frozenset()) -> ObjectSpec:
        """The object the instruction names: a training pair, or a held-out pair when options ask for it."""
        if self.options.get("novel_target"):
            choices = sorted(c for c in HELDOUT_COMBOS if c[0] in shapes and c[1] in self.colors and c not in exclude)
            if not choices:
                raise ValueError(f"no held-out (shape, colour) pair among shapes {shapes}; see HELDOUT_COMBOS")
            shape, color = choices[self.rng.integers(len(choices))]
        else:
            shape, color = self.identity(shapes, set(exclude))
        return self.new_object(shape, color, target=True)

    def distractors(
        self, target: ObjectSpec, n: int, shapes: tuple[str, ...] = tuple(SHAPES), taken: set | None = None
    ) -> list[ObjectSpec]:
        """n objects that differ from the target, each other and `taken` (shape, colour) pairs in shape or colour;
        the first shares the target's colour or shape."""
        taken = {(target.shape, target.color)} | (taken or set())
        out = []
        for k in range(n):
            if k == 0:  # one look-alike, so that both colour and shape words matter
                taken |= HELDOUT_COMBOS
                same_color = [(s, target.color) for s in shapes if (s, target.color) not in taken]
                same_shape = [(target.shape, c) for c in self.colors if (target.shape, c) not in taken]
                pool = same_color + same_shape
                shape, color = pool[self.rng.integers(len(pool))]
            else:
                shape, color = self.identity(shapes, taken)
            taken.add((shape, color))
            out.append(self.new_object(shape, color))
        return out

    def safety_extras(
        self, near: tuple[float, float], toward: tuple[float, float], clearance: tuple = (0.14, 0.19)
    ) -> tuple[list, tuple | None]:
        """Fragile vase and/or keep-out zone `clearance` metres beside the path `near` -> `toward` when the options
        ask for them (`fragile`, `keepout`).

        The Panda hand is ~20 cm wide across its fingers, so 14 cm is as close as a careful path can pass."""
        objects, keepout = [], None
        a, b = np.asarray(near), np.asarray(toward)
        side = np.asarray((-(b - a)[1], (b - a)[0]))
        side = side / (np.linalg.norm(side) + 1e-9) if np.linalg.norm(side) > 1e-6 else np.asarray((0.0, 1.0))
        for kind, wanted in (("vase", self.options.get("fragile")), ("keepout", self.options.get("keepout"))):
            if not wanted:
                continue
            for _ in range(200):
                sign = 1 if self.rng.random() < 0.5 else -1
                xy = a + (b - a) * self.rng.uniform(0.0, 1.0) + sign * self.rng.uniform(*clearance) * side
                if self._free(xy, FOOTPRINT[kind]):
                    break
            else:
                raise RuntimeError(f"could not place a {kind} near the task's path; ask for fewer distractors")
            self.placed.append((xy, FOOTPRINT[kind]))
            xy = (float(xy[0]), float(xy[1]))
            if kind == "keepout":
                keepout = xy
            else:
                i = self.used.get("vase", 0)
                self.used["vase"] = i + 1
                objects.append(ObjectSpec(f"vase_{i}", "vase", "clear", xy, 0.0, True))
        return objects, keepout

    def _free(self, xy, r) -> bool:
        inside = np.all(xy > REGION_LOW - 0.06) and np.all(xy < REGION_HIGH + 0.06)
        return bool(inside) and all(np.linalg.norm(xy - p) > r + q + 0.01 for p, q in self.placed)


@dataclass
class BaseTask:
    """A task: scene sampler, instruction templates (train and held-out paraphrases), success, expert, budget.

    `options` (passed to `env.reset`) may hold: `distractors` (int), `paraphrase` ("train" | "heldout"),
    `colors` (tuple of colour names to draw from), `fragile` / `keepout` (bool: safety hazards near the path),
    `novel_target` (bool: the target is a held-out shape-colour pair), `target_region` ("outer": a held-out band).
    """

    name: str = ""
    max_steps: int = 60
    templates: tuple[str, ...] = ()
    n_train_templates: int = 4
    default_distractors: int = 2

    train_seeds = TRAIN_SEEDS
    test_seeds = TEST_SEEDS

    def paraphrases(self, split: str) -> tuple[str, ...]:
        if split == "train":
            return self.templates[: self.n_train_templates]
        if split == "heldout":
            return self.templates[self.n_train_templates :]
        raise ValueError(f"paraphrase split {split!r} is unknown; use 'train' or 'heldout'")

    def instruction(self, scene: Scene, rng: np.random.Generator, options: dict) -> str:
        templates = self.paraphrases(options.get("paraphrase", "train"))
        template = templates[rng.integers(len(templates))]
        fields = {"target": scene.get(scene.target).label}
        if "base" in scene.extra:
            fields["base"] = scene.get(scene.extra["base"]).label
        return template.format(**fields)

    def sample_scene(self, rng: np.random.Generator, options: dict) -> Scene:
        """A scene from `compose`; a crowded draw that leaves no room is redrawn from the same generator.

        With `options["swap_target"]` set (True or False) the scene also records `extra["other"]`, the look-alike
        distractor (same colour or shape as the target), and with True the two trade places: the instruction names
        the look-alike in the very same scene. Success is judged at the named object and, in `info`, at the other
        (`TabletopEnv.success_at`), which is how the instruction suite shows that a policy reads the instruction."""
        for _ in range(20):
            try:
                scene = self.compose(SceneSampler(rng, options), options)
            except RuntimeError:
                continue
            if "swap_target" in options:
                other = lookalike(scene)
                if options["swap_target"]:
                    scene.target, other = other, scene.target
                scene.extra["other"] = other
            return scene
        raise RuntimeError(f"{self.name}: no room for this scene after 20 draws; ask for fewer distractors")

    def compose(self, s: SceneSampler, options: dict) -> Scene:
        """One target of any shape among distractors; hazards beside the approach from the tip's start."""
        target = s.target(tuple(SHAPES))
        hazards, keepout = s.safety_extras(s.start_xy, target.xy)
        objects = [target] + s.distractors(target, self.n_distractors(options))
        return Scene(objects + hazards, target.name, keepout=keepout)

    def n_distractors(self, options: dict) -> int:
        return int(options.get("distractors", self.default_distractors))

    def expert(self, env: TabletopEnv, seed: int = 0, noise: float = 0.0, dart: float = 0.0) -> "Expert":
        return Expert(env, self.plan, seed=seed, noise=noise, dart=dart)

    def plan(self, env: TabletopEnv, motion: "Motion") -> Iterator[np.ndarray]:
        raise NotImplementedError


def lookalike(scene: Scene) -> str:
    """The first distractor: `SceneSampler.distractors` makes it share the target's colour or shape."""
    base = scene.extra.get("base")
    for o in scene.objects:
        if o.name not in (scene.target, base) and not o.fragile:
            return o.name
    raise ValueError("swap_target needs a distractor in the scene; set distractors >= 1")


def grasp_yaw(obj: ObjectSpec, yaw_now: float) -> float:
    """Gripper yaw (rad) that closes the fingers across the object's narrow side, nearest the current yaw."""
    shape = shape_of(obj.name)
    if shape.symmetry == 0.0:
        return yaw_now
    base = obj.yaw + (np.pi / 2 if obj.shape == "bar" else 0.0)
    k = np.round((yaw_now - base) / shape.symmetry)
    return float(base + k * shape.symmetry)


class Motion:
    """Closed-loop waypoint motions for scripted experts, in the policy's own action space."""

    def __init__(self, env: TabletopEnv, rng: np.random.Generator, noise: float, speed: float = 0.035):
        self.env, self.rng, self.noise, self.speed = env, rng, noise, speed

    def action(self, delta: np.ndarray, yaw: float | None, grip: float, noisy: bool = False) -> np.ndarray:
        state = self.env.robot.state()
        step = np.asarray(delta, dtype=np.float64)
        norm = np.linalg.norm(step)
        if norm > self.speed:
            step = step * (self.speed / norm)
        if noisy and self.noise > 0:
            step = step + self.rng.normal(0.0, self.noise, 3)
        rot = -state[3:6]  # hold the gripper pointing down
        rot[2] = 0.0 if yaw is None else yaw - state[5]
        rot = np.clip(rot, -MAX_ROTATION, MAX_ROTATION)
        return np.concatenate([step, rot, [grip]]).astype(np.float32)

    def to(self, target, yaw: float | None, grip: float, tol: float = 0.008, max_steps: int = 40, noisy: bool = False):
        """Move the tip to `target` (3,) metres; returns when within `tol` and the yaw within 0.05 rad."""
        target = np.asarray(target, dtype=np.float64)
        for _ in range(max_steps):
            state = self.env.robot.state()
            yaw_ok = yaw is None or abs(yaw - state[5]) < 0.05
            if np.linalg.norm(target - state[:3]) < tol and yaw_ok:
                return
            yield self.action(target - state[:3], yaw, grip, noisy)

    def hold(self, grip: float, steps: int, yaw: float | None = None):
        for _ in range(steps):
            yield self.action(np.zeros(3), yaw, grip)

    def yaw(self) -> float:
        return float(self.env.robot.state()[5])


class Expert:
    """Scripted expert policy: `reset()`, `act(obs) -> (action, info)`; reads the simulator (privileged).

    `noise` (m) perturbs the free-space moves the expert plans (and reports). `dart` (m) is DART's noise
    injection (Laskey et al. 2017): every step's translation is perturbed by N(0, dart) per axis when executed
    (``info["executed"]``, which `rollout` steps the env with) while the action returned, the label a dataset
    records, stays the expert's own. The closed-loop expert then corrects from states its clean runs never visit
    (the tip beside the object at the bottom of a descent), which is what a cloned policy needs to recover."""

    def __init__(self, env: TabletopEnv, plan, seed: int = 0, noise: float = 0.0, dart: float = 0.0):
        if dart < 0:
            raise ValueError(f"dart={dart} must be >= 0 (std in metres of the executed translation's perturbation)")
        self.env, self._plan, self.noise, self.seed, self.dart = env, plan, noise, seed, dart
        self._steps: Iterator[np.ndarray] | None = None
        self._grip = 1.0
        self._rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        seed = self.seed if seed is None else seed
        self._steps = iter(self._plan(self.env, Motion(self.env, np.random.default_rng(seed), self.noise)))
        self._grip = 1.0
        self._rng = np.random.default_rng([seed, 13])  # DART's stream, apart from the plan's

    def act(self, obs: dict) -> tuple[np.ndarray, dict]:
        if self._steps is None:
            self.reset()
        action = next(self._steps, None)
        if action is None:  # plan finished: stay still with the gripper as it was
            action = Motion(self.env, None, 0.0).action(np.zeros(3), None, self._grip)
        self._grip = float(action[6])
        if self.dart == 0:
            return action, {}
        executed = action.copy()
        executed[:3] += self._rng.normal(0.0, self.dart, 3).astype(np.float32)
        return action, {"executed": executed}
