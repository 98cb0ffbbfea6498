"""The bimanual ALOHA (two ViperX 300 6-DoF arms) shared by every ``aloha_*`` task.

The MJCF comes from gym-aloha's assets (``gym_aloha/assets``), loaded straight into MuJoCo
(no dm_control, no 480x640 three-camera rendering) and rendered through
:class:`envs.base.FastRenderer`.

Action and ``agent_pos`` follow the gym-aloha / ACT convention (14-D)::

    [left waist, shoulder, elbow, forearm_roll, wrist_angle, wrist_rotate, left gripper,
     right waist, shoulder, elbow, forearm_roll, wrist_angle, wrist_rotate, right gripper]

Joints are absolute positions in radians; the gripper is normalised (0 closed, 1 open) and
drives both finger slides (left finger +x, right finger -x) exactly as gym-aloha does.
Control runs at 50 Hz (10 physics steps of 2 ms).

Experts use :meth:`AlohaEnv.ee_pose` and :meth:`AlohaEnv.solve_ik` (damped least squares on a
private ``MjData``, so planning never disturbs the simulation) to follow end-effector waypoints.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import gym_aloha
import mujoco
import numpy as np

from envs.base import ScriptedExpert, TaskEnv, solve_ik

ALOHA_ASSETS = Path(gym_aloha.__file__).resolve().parent / "assets"

ARMS = ("left", "right")
ARM_JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
ACTION_NAMES = tuple(
    f"{arm}_arm_{j}" for arm in ARMS for j in (*ARM_JOINTS, "gripper")
)

# gym-aloha's puppet gripper normalisation (finger slide position in metres).
GRIPPER_POSITION_OPEN = 0.05800
GRIPPER_POSITION_CLOSE = 0.01844
# gym-aloha's START_ARM_POSE for one arm (6 joints); the fingers start nearly closed.
START_ARM_JOINTS = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0])
START_GRIPPER = 0.1  # normalised
# Tool centre point: between the finger pads, in the gripper_link frame (x along the gripper).
TOOL_OFFSET = np.array([0.11, 0.0, 0.0])


def gripper_unnormalize(g: np.ndarray | float) -> np.ndarray | float:
    return g * (GRIPPER_POSITION_OPEN - GRIPPER_POSITION_CLOSE) + GRIPPER_POSITION_CLOSE


def gripper_normalize(x: np.ndarray | float) -> np.ndarray | float:
    return (x - GRIPPER_POSITION_CLOSE) / (GRIPPER_POSITION_OPEN - GRIPPER_POSITION_CLOSE)


class AlohaEnv(TaskEnv):
    """Base for ALOHA tasks. Subclasses pass a compiled model and implement the task parts."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}
    control_hz: ClassVar[float] = 50.0
    camera_names: ClassVar[tuple[str, ...]] = (
        "top", "angle", "left_pillar", "right_pillar", "front_close", "left_wrist", "right_wrist",
    )
    default_cameras: ClassVar[tuple[str, ...]] = ("top",)
    action_names: ClassVar[tuple[str, ...]] = ACTION_NAMES
    state_names: ClassVar[tuple[str, ...]] = ACTION_NAMES
    # 0.25 rad per 20 ms (12.5 rad/s) per joint and a full gripper swing per step.
    max_action_step: ClassVar[np.ndarray | None] = np.array(([0.25] * 6 + [1.0]) * 2)

    def __init__(self, model: mujoco.MjModel, render_mode: str | None = "rgb_array",
                 cameras: Sequence[str] | None = None, image_size=128, observe_pixels: bool = True):
        super().__init__(render_mode=render_mode, cameras=cameras, image_size=image_size,
                         observe_pixels=observe_pixels)
        self.model = model
        self.data = mujoco.MjData(model)
        self._ik_data = mujoco.MjData(model)
        self.n_substeps = int(round(1.0 / (self.control_hz * model.opt.timestep)))

        self._arm_qpos_adr: dict[str, np.ndarray] = {}
        self._arm_dof_adr: dict[str, np.ndarray] = {}
        self._arm_ctrl: dict[str, np.ndarray] = {}
        self._finger_qpos_adr: dict[str, int] = {}
        self._finger_ctrl: dict[str, tuple[int, int]] = {}
        self._gripper_body: dict[str, int] = {}
        self._arm_range: dict[str, np.ndarray] = {}
        for arm in ARMS:
            prefix = f"vx300s_{arm}/"
            jids = [model.joint(prefix + j).id for j in ARM_JOINTS]
            self._arm_qpos_adr[arm] = np.array([model.jnt_qposadr[j] for j in jids])
            self._arm_dof_adr[arm] = np.array([model.jnt_dofadr[j] for j in jids])
            self._arm_range[arm] = model.jnt_range[jids].copy()
            self._arm_ctrl[arm] = np.array([model.actuator(self._actuator_for(prefix + j)).id
                                            for j in ARM_JOINTS])
            self._finger_qpos_adr[arm] = int(model.jnt_qposadr[model.joint(prefix + "left_finger").id])
            self._finger_ctrl[arm] = (
                model.actuator(self._actuator_for(prefix + "left_finger")).id,
                model.actuator(self._actuator_for(prefix + "right_finger")).id,
            )
            self._gripper_body[arm] = model.body(prefix + "gripper_link").id

        low = np.concatenate([np.r_[self._arm_range[a][:, 0], 0.0] for a in ARMS])
        high = np.concatenate([np.r_[self._arm_range[a][:, 1], 1.0] for a in ARMS])
        self._setup(low, high)

    def _actuator_for(self, joint_name: str) -> int:
        jid = self.model.joint(joint_name).id
        for i in range(self.model.nu):
            if self.model.actuator_trntype[i] == mujoco.mjtTrn.mjTRN_JOINT and self.model.actuator_trnid[i, 0] == jid:
                return i
        raise KeyError(f"no actuator drives joint {joint_name}")

    # -- the robot --------------------------------------------------------------------------
    def reset_robot(self, arm_joints: np.ndarray | None = None, gripper: float = START_GRIPPER) -> None:
        """Put both arms at the start pose (qpos and ctrl), gripper nearly closed."""
        q = START_ARM_JOINTS if arm_joints is None else arm_joints
        for arm in ARMS:
            self.data.qpos[self._arm_qpos_adr[arm]] = q
            self.data.qvel[self._arm_dof_adr[arm]] = 0
            fa = self._finger_qpos_adr[arm]
            pos = gripper_unnormalize(gripper)
            self.data.qpos[fa] = pos
            self.data.qpos[fa + 1] = -pos
        self.data.ctrl[:] = 0
        self._write_ctrl(self._state())

    def _write_ctrl(self, action: np.ndarray) -> None:
        for i, arm in enumerate(ARMS):
            a = action[7 * i: 7 * i + 7]
            self.data.ctrl[self._arm_ctrl[arm]] = a[:6]
            pos = gripper_unnormalize(a[6])
            lf, rf = self._finger_ctrl[arm]
            self.data.ctrl[lf] = pos
            self.data.ctrl[rf] = -pos

    def _apply_action(self, action: np.ndarray) -> None:
        self._write_ctrl(action)
        mujoco.mj_step(self.model, self.data, nstep=self.n_substeps)

    def _state(self) -> np.ndarray:
        parts = []
        for arm in ARMS:
            parts.append(self.data.qpos[self._arm_qpos_adr[arm]])
            parts.append([gripper_normalize(self.data.qpos[self._finger_qpos_adr[arm]])])
        return np.concatenate(parts)

    def _current_targets(self) -> np.ndarray:
        return self._state()

    # -- public kinematics for experts -------------------------------------------------------
    def arm_joints(self, arm: str) -> np.ndarray:
        return self.data.qpos[self._arm_qpos_adr[arm]].copy()

    def ee_pose(self, arm: str, joints: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tool centre point position (3,) and rotation matrix (3, 3) in the world frame."""
        d = self.data
        if joints is not None:
            d = self._ik_data
            d.qpos[:] = self.data.qpos
            d.qpos[self._arm_qpos_adr[arm]] = joints
            mujoco.mj_kinematics(self.model, d)
        b = self._gripper_body[arm]
        rot = d.xmat[b].reshape(3, 3).copy()
        return d.xpos[b] + rot @ TOOL_OFFSET, rot

    def solve_ik(self, arm: str, pos: np.ndarray, rot: np.ndarray | None = None,
                 q_init: np.ndarray | None = None, **kwargs) -> tuple[np.ndarray, float]:
        """Joints (6,) that put the tool centre point at ``pos`` (and the gripper frame at
        ``rot``), solved on a private ``MjData``; returns ``(joints, position_error_m)``."""
        self._ik_data.qpos[:] = self.data.qpos
        q0 = self.arm_joints(arm) if q_init is None else q_init
        return solve_ik(self.model, self._ik_data, self._gripper_body[arm], TOOL_OFFSET,
                        self._arm_qpos_adr[arm], self._arm_dof_adr[arm], self._arm_range[arm],
                        q0, pos, rot, **kwargs)

    def body_pose(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """World position (3,) and rotation matrix (3, 3) of a named body (objects, cloth)."""
        b = self.model.body(name).id
        return self.data.xpos[b].copy(), self.data.xmat[b].reshape(3, 3).copy()

    # -- contacts, as gym-aloha's reward functions use them -----------------------------------
    def contact_pairs(self) -> set[tuple[str, str]]:
        """Names of geom pairs in contact, both orders."""
        pairs: set[tuple[str, str]] = set()
        for c in self.data.contact[: self.data.ncon]:
            a = self.model.geom(c.geom1).name
            b = self.model.geom(c.geom2).name
            pairs.add((a, b))
            pairs.add((b, a))
        return pairs


# -- scripted experts: end-effector waypoints, interpolated and solved by IK every step -------
@dataclass(frozen=True)
class Waypoint:
    """A tool pose one arm reaches at control step ``t``.

    ``rot`` is the gripper_link frame (x along the fingers) in world coordinates; ``gripper``
    is normalised (0 closed, 1 open).
    """

    t: int
    pos: np.ndarray
    rot: np.ndarray
    gripper: float


def rot_from_axes(x_axis: Sequence[float], y_axis: Sequence[float]) -> np.ndarray:
    """Rotation (3, 3) whose columns are the gripper frame axes: x along the fingers, y the
    direction the fingers close along; z completes a right-handed frame."""
    x = np.asarray(x_axis, dtype=np.float64)
    y = np.asarray(y_axis, dtype=np.float64)
    x = x / np.linalg.norm(x)
    y = y - x * (x @ y)
    y = y / np.linalg.norm(y)
    return np.column_stack([x, y, np.cross(x, y)])


def rot_to_quat(rot: np.ndarray) -> np.ndarray:
    q = np.zeros(4)
    mujoco.mju_mat2Quat(q, np.asarray(rot, dtype=np.float64).reshape(-1))
    return q


def quat_to_rot(q: np.ndarray) -> np.ndarray:
    m = np.zeros(9)
    mujoco.mju_quat2Mat(m, q)
    return m.reshape(3, 3)


def slerp(q0: np.ndarray, q1: np.ndarray, frac: float) -> np.ndarray:
    """Spherical interpolation of unit quaternions (w, x, y, z), shortest path."""
    dot = float(np.dot(q0, q1))
    if dot < 0:
        q1, dot = -q1, -dot
    if dot > 0.9995:
        q = q0 + frac * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = np.arccos(dot)
    return (np.sin((1 - frac) * theta) * q0 + np.sin(frac * theta) * q1) / np.sin(theta)


def interpolate(waypoints: Sequence[Waypoint], t: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Pose and gripper at step ``t`` along a time-sorted waypoint list (held after the end)."""
    if t <= waypoints[0].t:
        w = waypoints[0]
        return w.pos, w.rot, w.gripper
    for a, b in zip(waypoints[:-1], waypoints[1:]):
        if a.t <= t <= b.t:
            frac = (t - a.t) / max(b.t - a.t, 1e-9)
            pos = (1 - frac) * a.pos + frac * b.pos
            rot = quat_to_rot(slerp(rot_to_quat(a.rot), rot_to_quat(b.rot), frac))
            return pos, rot, (1 - frac) * a.gripper + frac * b.gripper
    w = waypoints[-1]
    return w.pos, w.rot, w.gripper


class BimanualWaypointExpert(ScriptedExpert):
    """An ALOHA expert that plans tool waypoints for both arms at reset and tracks them.

    Subclasses implement :meth:`plan`, returning the waypoints of each arm and the step at
    which each subtask ends (``subtask_ends[i]`` is the last step of subtask ``i``). Each
    ``act`` interpolates the poses (linear position, slerp rotation, linear gripper) and
    solves IK warm-started from the previous solution, like ACT's scripted policies but on
    joint-position control.
    """

    env: AlohaEnv

    @abc.abstractmethod
    def plan(self, obs: dict, info: dict) -> tuple[dict[str, list[Waypoint]], list[int]]: ...

    def reset(self, obs: dict, info: dict) -> None:
        self.waypoints, self.subtask_ends = self.plan(obs, info)
        if len(self.subtask_ends) != len(self.subtasks):
            raise AssertionError("plan() must give one end step per subtask")
        self.t = 0
        self.subtask_index = 0
        self._q = {arm: self.env.arm_joints(arm) for arm in ARMS}

    def act(self, obs: dict, info: dict) -> np.ndarray:
        parts = []
        for arm in ARMS:
            pos, rot, grip = interpolate(self.waypoints[arm], self.t)
            q, _ = self.env.solve_ik(arm, pos, rot, q_init=self._q[arm])
            self._q[arm] = q
            parts.append(np.r_[q, grip])
        self.subtask_index = next(
            (i for i, end in enumerate(self.subtask_ends) if self.t <= end), len(self.subtask_ends) - 1
        )
        self.t += 1
        return np.concatenate(parts)
