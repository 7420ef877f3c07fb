"""Franka Panda with 7-DoF end-effector delta control (OpenVLA's action convention), converted by iterated IK."""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import pybullet
import pybullet_data

from sim.bullet import Bullet

ARM_JOINTS = tuple(range(7))
FINGER_JOINTS = (9, 10)
TIP_LINK = 11  # panda_grasptarget: between the fingertips
ARM_FORCES = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)
FINGER_FORCE = 20.0
FINGER_OPEN = 0.04  # metres per finger
# Rest posture for IK null space: elbow up, gripper pointing down over the table.
REST_POSE = (0.0, -0.25, 0.0, -2.2, 0.0, 1.95, 0.785)
# The gripper points straight down; yaw 0 puts the fingers' closing axis along world y.
HOME_ORIENTATION = np.asarray(pybullet.getQuaternionFromEuler((np.pi, 0.0, 0.0)))
HOME_POSITION = np.asarray((0.45, 0.0, 0.22))


@functools.cache
def simple_mesh_urdf() -> str:
    """Path of a copy of the stock Panda URDF whose visuals are its collision meshes (5-10x cheaper to render)."""
    root = os.path.join(pybullet_data.getDataPath(), "franka_panda")
    with open(os.path.join(root, "panda.urdf")) as f:
        text = f.read()
    text = text.replace("meshes/visual/", "meshes/collision/").replace("package://", root + "/")
    fd, path = tempfile.mkstemp(prefix="panda_simple_", suffix=".urdf")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _quat_mul(a, b) -> np.ndarray:
    return np.asarray(pybullet.multiplyTransforms((0, 0, 0), a, (0, 0, 0), b)[1])


def relative_euler(orientation) -> np.ndarray:
    """(roll, pitch, yaw) of the world-frame rotation taking HOME_ORIENTATION to `orientation`, radians (3,)."""
    inv_home = pybullet.invertTransform((0, 0, 0), HOME_ORIENTATION)[1]
    return np.asarray(pybullet.getEulerFromQuaternion(_quat_mul(orientation, inv_home)))


class Panda:
    """The robot: reads its tip pose and applies delta actions `(dx, dy, dz, droll, dpitch, dyaw, gripper)`.

    Translations are metres, rotations radians (world frame, applied to the current tip pose), gripper in
    [0 = closed, 1 = open] mapped to the finger opening.
    """

    def __init__(self, world: Bullet, *, simple_meshes: bool = True, ik_iterations: int = 30):
        self.world = world
        c = world.client
        path = simple_mesh_urdf() if simple_meshes else os.path.join(pybullet_data.getDataPath(), "franka_panda/panda.urdf")
        flags = pybullet.URDF_ENABLE_CACHED_GRAPHICS_SHAPES | pybullet.URDF_USE_SELF_COLLISION_EXCLUDE_PARENT
        self.body = world.add("robot", c.loadURDF(path, (0, 0, 0), useFixedBase=True, flags=flags))
        if simple_meshes:  # the collision meshes carry no material: paint the Panda's white-and-black look
            for link in (-1, 0, 1, 2, 3, 4, 5):
                c.changeVisualShape(self.body, link, rgbaColor=(0.92, 0.92, 0.92, 1))
            for link in (6, 7, 8, 9, 10):
                c.changeVisualShape(self.body, link, rgbaColor=(0.2, 0.2, 0.22, 1))
        info = [c.getJointInfo(self.body, j) for j in ARM_JOINTS]
        self.lower = np.asarray([i[8] for i in info])
        self.upper = np.asarray([i[9] for i in info])
        self.ik_iterations = ik_iterations
        for link in FINGER_JOINTS:
            c.changeDynamics(self.body, link, lateralFriction=1.5, spinningFriction=0.01)
        self.home_joints = self._solve_home()

    def _solve_home(self) -> np.ndarray:
        """Joint angles that put the tip at HOME_POSITION pointing down (found once, by repeated IK + reset)."""
        q = np.asarray(REST_POSE)
        for _ in range(20):
            self.reset_joints(q)
            q = self._ik(HOME_POSITION, HOME_ORIENTATION)
        self.reset_joints(q)
        return q

    def start_at(self, position) -> None:
        """Put the tip at `position` (3,) pointing down, gripper open, at rest, and command that posture (motor
        targets are not part of a saved state): IK from the home posture, refined by reset + IK (deterministic: the
        same position gives the same joints)."""
        q = self.home_joints
        for _ in range(6):
            self.reset_joints(q)
            q = self._ik(np.asarray(position, dtype=np.float64), HOME_ORIENTATION)
        self.reset_joints(q)

    def reset_joints(self, q) -> None:
        c = self.world.client
        for j, angle in zip(ARM_JOINTS, q):
            c.resetJointState(self.body, j, float(angle))
        for j in FINGER_JOINTS:
            c.resetJointState(self.body, j, FINGER_OPEN)
        self._command(np.asarray(q), 1.0)

    def _ik(self, position, orientation) -> np.ndarray:
        ranges = (self.upper - self.lower).tolist()
        q = self.world.client.calculateInverseKinematics(
            self.body,
            TIP_LINK,
            list(position),
            list(orientation),
            lowerLimits=self.lower.tolist() + [0.0, 0.0],
            upperLimits=self.upper.tolist() + [FINGER_OPEN, FINGER_OPEN],
            jointRanges=ranges + [FINGER_OPEN, FINGER_OPEN],
            restPoses=list(REST_POSE) + [FINGER_OPEN, FINGER_OPEN],
            maxNumIterations=self.ik_iterations,
            residualThreshold=1e-5,
        )
        return np.clip(np.asarray(q[:7]), self.lower, self.upper)

    def _command(self, q: np.ndarray, gripper: float) -> None:
        c = self.world.client
        c.setJointMotorControlArray(
            self.body, ARM_JOINTS, pybullet.POSITION_CONTROL, targetPositions=q.tolist(), forces=ARM_FORCES
        )
        width = float(np.clip(gripper, 0.0, 1.0)) * FINGER_OPEN
        c.setJointMotorControlArray(
            self.body, FINGER_JOINTS, pybullet.POSITION_CONTROL, targetPositions=[width, width], forces=[FINGER_FORCE] * 2
        )

    def tip_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Tip position (3,) metres and orientation (4,) xyzw quaternion."""
        s = self.world.client.getLinkState(self.body, TIP_LINK, computeForwardKinematics=True)
        return np.asarray(s[4]), np.asarray(s[5])

    def tip_velocity(self) -> np.ndarray:
        s = self.world.client.getLinkState(self.body, TIP_LINK, computeLinkVelocity=True, computeForwardKinematics=True)
        return np.asarray(s[6])

    def joint_positions(self) -> np.ndarray:
        return np.asarray([s[0] for s in self.world.client.getJointStates(self.body, ARM_JOINTS)])

    def gripper_width(self) -> float:
        return float(sum(s[0] for s in self.world.client.getJointStates(self.body, FINGER_JOINTS)))

    def state(self) -> np.ndarray:
        """Proprio state (7,) float32: tip x, y, z (m), roll, pitch, yaw relative to pointing down (rad), width (m)."""
        pos, orn = self.tip_pose()
        return np.concatenate([pos, relative_euler(orn), [self.gripper_width()]]).astype(np.float32)

    def apply(self, action: np.ndarray, workspace_low, workspace_high) -> None:
        """Set joint targets for one control step from a delta action (7,); the tip target stays in the workspace."""
        pos, orn = self.tip_pose()
        target_pos = np.clip(pos + action[:3], workspace_low, workspace_high)
        delta = pybullet.getQuaternionFromEuler(action[3:6].tolist())
        target_orn = _quat_mul(delta, orn)
        self._command(self._ik(target_pos, target_orn), float(action[6]))
