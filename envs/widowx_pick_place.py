"""``widowx_pick_place``: a WidowX 250 6-DoF arm puts a block into a bowl (Bridge-style).

The scene (``assets/widowx/scene.xml``) is a table whose top is the plane z = 0, a 35 mm cube
and a mesh-free bowl (a base disk and a ring of 16 wall boxes, inner radius 70 mm, rim 40 mm
high), both free bodies whose poses are sampled per episode from ``self.np_random`` (within
reach, never overlapping). The arm (``assets/widowx/wx250s.xml``) is our primitive-shape MJCF
of the Interbotix wx250s with the URDF's kinematics, limits and masses; it is attached at the
origin, so the robot base frame is the world frame. ``robot_xml=<path>`` swaps in another
wx250s MJCF with the same joint, body and actuator names, e.g. a local mujoco_menagerie
``trossen_wx250s/wx250s.xml`` checkout (its keyframes are dropped; nothing is downloaded).

Action (7-D, Bridge / Open-X convention, one action per 0.2 s control step, 5 Hz)::

    [dx, dy, dz,            metres, tool-centre-point (TCP) position delta, base frame, |.| <= 0.05
     droll, dpitch, dyaw,   radians, TCP orientation delta, |.| <= 0.25
     gripper]               absolute, 1 = open .. 0 = closed (Bridge's continuous convention)

The env keeps a commanded TCP pose. Each step moves it by the delta (the rotation delta
``R(droll, dpitch, dyaw)``, ZYX Euler angles, is applied on the left, i.e. about base-frame
axes through the TCP), clamps it to a workspace box and to |roll|, |pitch| <= 1 rad, solves
damped-least-squares IK (:func:`envs.base.solve_ik`, on a private ``MjData``, warm-started from
the previous solution), clips the joints to their limits and then resets the commanded pose to
the forward kinematics of that solution (so an unreachable command cannot wind up). The joint
targets are ramped from the previous ones over the first 60 % of the control period and then
held; the physics runs at 2 ms with gravity-compensated links and position actuators. As the
action is a delta, the base class's absolute step limit does not apply (``max_action_step`` is
None): the action-space bounds are the step limit.

``agent_pos`` (observation.state, 7-D): TCP position (3, m, base frame), TCP orientation as
roll, pitch, yaw (3, rad, ZYX Euler: ``R = Rz(yaw) Ry(pitch) Rx(roll)``) and the gripper opening
normalised to 0 (closed) .. 1 (open). The TCP frame sits between the finger pads and is
rotated so that roll = pitch = yaw = 0 is the gripper pointing straight down with the fingers
closing along the base y axis (TCP x = base x, z = base z); this keeps the Euler angles far from
their singularity (pitch = +-pi/2 would be a horizontal gripper).

Subtasks (expert annotations) and ``subtask_progress`` (from geometry, highest stage that holds):
1 the TCP is within 3 cm of the block, 2 the block is held (both finger pads touch it),
3 the block is over the bowl (inside its inner radius, off the table), 4 success: the block
rests inside the bowl (centre within 61 mm, the inner radius less half a block half-edge, of
the bowl's axis, below the rim, slower than 5 cm/s) and the gripper does not hold it.

Departures from Bridge / the real robot: a primitive-shape arm, our own IK controller instead
of Interbotix's, TCP orientation angles as defined above (Bridge's own end-effector frame and
angle conventions differ), and no camera noise or lighting randomisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Sequence

import mujoco
import numpy as np

from envs.base import ScriptedExpert, TaskEnv, solve_ik

ASSETS = Path(__file__).resolve().parent / "assets" / "widowx"
SCENE_XML = ASSETS / "scene.xml"
ROBOT_XML = ASSETS / "wx250s.xml"

ARM_JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
GRIPPER_BODY = "wx250s/gripper_link"
FINGER_JOINT = "left_finger"  # the right finger follows through the joint equality
FINGER_BODIES = ("wx250s/left_finger_link", "wx250s/right_finger_link")
FINGER_CLOSED, FINGER_OPEN = 0.015, 0.037  # left finger slide (m), the wx250s URDF limits

# TCP: between the finger pads, 35 mm from the finger slide origin along the gripper x axis
# (gripper_link frame); its frame is the gripper frame pitched by -90 deg about y (see above).
TCP_OFFSET = np.array([0.101, 0.0, 0.0])
TCP_QUAT = np.array([np.sqrt(0.5), 0.0, -np.sqrt(0.5), 0.0])  # (w, x, y, z) in gripper_link

CONTROL_HZ = 5.0
RAMP_FRACTION = 0.6  # joint targets reach the new IK solution after this part of the period
MAX_DPOS = 0.05  # m per step
MAX_DROT = 0.25  # rad per step
MAX_TILT = 1.0  # rad, |roll| and |pitch| of the commanded TCP
WORKSPACE_LOW = np.array([0.12, -0.32, 0.012])  # m, commanded TCP box (base frame)
WORKSPACE_HIGH = np.array([0.48, 0.32, 0.30])
HOME_TCP = np.array([0.22, 0.0, 0.16])  # m, start pose: gripper down, yaw 0, open
HOME_JOINTS_GUESS = np.array([0.0, -0.3, 0.6, 0.0, 1.27, 0.0])  # rad, IK seed for HOME_TCP

BLOCK_HALF = 0.0175  # m, half edge of the cube
BOWL_INNER_RADIUS = 0.070  # m
BOWL_OUTER_RADIUS = 0.075
BOWL_FLOOR = 0.005  # m, top of the bowl's base disk above the table
BOWL_RIM = 0.040  # m, top of the wall above the table
# sampling regions (base frame, m) and the minimum centre distance between block and bowl
BLOCK_REGION = (np.array([0.22, -0.17]), np.array([0.38, 0.17]))
BOWL_REGION = (np.array([0.22, -0.20]), np.array([0.38, 0.20]))
MIN_SEPARATION = BOWL_OUTER_RADIUS + np.sqrt(2) * BLOCK_HALF + 0.04

NEAR_BLOCK = 0.03  # m, "reached" distance TCP - block centre
AT_REST_SPEED = 0.05  # m/s


# -- rotations -----------------------------------------------------------------------------
def rpy_to_mat(rpy: np.ndarray) -> np.ndarray:
    """ZYX Euler angles (roll, pitch, yaw) to a rotation matrix Rz(yaw) Ry(pitch) Rx(roll)."""
    r, p, y = rpy
    cr, sr, cp, sp, cy, sy = np.cos(r), np.sin(r), np.cos(p), np.sin(p), np.cos(y), np.sin(y)
    return np.array([
        [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
        [-sp, cp * sr, cp * cr],
    ])


def mat_to_rpy(rot: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rpy_to_mat` (pitch in [-pi/2, pi/2]): (3,) radians."""
    pitch = np.arcsin(np.clip(-rot[2, 0], -1.0, 1.0))
    roll = np.arctan2(rot[2, 1], rot[2, 2])
    yaw = np.arctan2(rot[1, 0], rot[0, 0])
    return np.array([roll, pitch, yaw])


def wrap_angle(a: float | np.ndarray) -> float | np.ndarray:
    """Wrap to [-pi, pi)."""
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def quat_to_mat(quat: np.ndarray) -> np.ndarray:
    m = np.zeros(9)
    mujoco.mju_quat2Mat(m, np.asarray(quat, dtype=np.float64))
    return m.reshape(3, 3)


# -- model ---------------------------------------------------------------------------------
def build_model(robot_xml: str | Path | None = None) -> mujoco.MjModel:
    """Compile the scene with the arm attached at the origin and a ``tcp`` site added."""
    robot_path = Path(robot_xml) if robot_xml is not None else ROBOT_XML
    if not robot_path.is_file():
        raise FileNotFoundError(
            f"robot_xml {robot_path} does not exist; pass a wx250s MJCF file (e.g. "
            "mujoco_menagerie/trossen_wx250s/wx250s.xml) or None for the built-in arm"
        )
    scene = mujoco.MjSpec.from_file(str(SCENE_XML))
    robot = mujoco.MjSpec.from_file(str(robot_path))
    for key in list(robot.keys):  # keyframes of the arm alone do not fit the scene's qpos
        robot.delete(key)
    gripper = robot.body(GRIPPER_BODY)
    if gripper is None:
        raise ValueError(f"{robot_path} has no body {GRIPPER_BODY!r}: it is not a wx250s MJCF")
    gripper.add_site(name="tcp", pos=TCP_OFFSET, quat=TCP_QUAT, size=[0.004] * 3,
                     rgba=[0, 1, 0, 0.0], group=4)
    mount = scene.worldbody.add_frame(pos=[0, 0, 0])
    scene.attach(robot, frame=mount, prefix="")
    return scene.compile()


class WidowXPickPlaceEnv(TaskEnv):
    """Put the red block in the blue bowl with a WidowX 250, 7-D EE-delta actions at 5 Hz.

    ``robot_xml``: path of another wx250s MJCF to use instead of ours (see the module doc).
    ``reset(options=...)`` may fix ``block_xy`` (2,), ``block_yaw`` (rad) and ``bowl_xy`` (2,).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": int(CONTROL_HZ)}
    task: ClassVar[str] = "put the red block in the blue bowl"
    subtasks: ClassVar[tuple[str, ...]] = (
        "reach the red block",
        "grasp the red block",
        "lift the block and carry it over the blue bowl",
        "lower the block into the bowl and release it",
    )
    camera_names: ClassVar[tuple[str, ...]] = ("front", "overhead")
    default_cameras: ClassVar[tuple[str, ...]] = ("front",)
    control_hz: ClassVar[float] = CONTROL_HZ
    action_names: ClassVar[tuple[str, ...]] = (
        "dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper",
    )
    state_names: ClassVar[tuple[str, ...]] = (
        "ee_x", "ee_y", "ee_z", "ee_roll", "ee_pitch", "ee_yaw", "gripper",
    )
    max_action_step: ClassVar[np.ndarray | None] = None  # deltas: the action bounds limit a step

    block_half: ClassVar[float] = BLOCK_HALF
    bowl_inner_radius: ClassVar[float] = BOWL_INNER_RADIUS
    bowl_floor: ClassVar[float] = BOWL_FLOOR
    bowl_rim: ClassVar[float] = BOWL_RIM
    workspace_low: ClassVar[np.ndarray] = WORKSPACE_LOW
    workspace_high: ClassVar[np.ndarray] = WORKSPACE_HIGH

    def __init__(self, render_mode: str | None = "rgb_array", cameras: Sequence[str] | None = None,
                 image_size: int | Sequence[int] = 128, observe_pixels: bool = True,
                 robot_xml: str | Path | None = None):
        super().__init__(render_mode=render_mode, cameras=cameras, image_size=image_size,
                         observe_pixels=observe_pixels)
        m = self.model = build_model(robot_xml)
        self.data = mujoco.MjData(m)
        self._ik_data = mujoco.MjData(m)
        self.n_substeps = int(round(1.0 / (CONTROL_HZ * m.opt.timestep)))
        self._ramp_substeps = max(1, int(round(RAMP_FRACTION * self.n_substeps)))

        jids = [m.joint(j).id for j in ARM_JOINTS]
        self._arm_qpos = np.array([m.jnt_qposadr[j] for j in jids])
        self._arm_dof = np.array([m.jnt_dofadr[j] for j in jids])
        self._arm_range = m.jnt_range[jids].copy()  # (6, 2) rad
        self._arm_ctrl = np.array([self._actuator_for(jid) for jid in jids])
        finger = m.joint(FINGER_JOINT).id
        self._finger_qpos = int(m.jnt_qposadr[finger])
        self._finger_pair_qpos = int(m.jnt_qposadr[m.joint("right_finger").id])
        self._gripper_ctrl = self._actuator_for(finger)
        self._gripper_body = m.body(GRIPPER_BODY).id
        self._tcp = m.site("tcp").id
        self._tcp_rot_in_gripper = quat_to_mat(TCP_QUAT)  # (3, 3)
        self._finger_bodies = {m.body(b).id for b in FINGER_BODIES}
        self._block_body = m.body("block").id
        self._bowl_body = m.body("bowl").id
        self._block_qpos = int(m.jnt_qposadr[m.joint("block").id])
        self._block_dof = int(m.jnt_dofadr[m.joint("block").id])
        self._bowl_qpos = int(m.jnt_qposadr[m.joint("bowl").id])
        self._bowl_dof = int(m.jnt_dofadr[m.joint("bowl").id])
        self._table_geom = m.geom("table_top").id

        self._home_q = self._solve_home()
        self._q_cmd = self._home_q.copy()  # (6,) current joint targets
        self._target_pos = np.zeros(3)  # commanded TCP position (m)
        self._target_rot = np.eye(3)  # commanded TCP rotation

        low = np.r_[[-MAX_DPOS] * 3, [-MAX_DROT] * 3, 0.0]
        high = np.r_[[MAX_DPOS] * 3, [MAX_DROT] * 3, 1.0]
        self._setup(low, high)

    def _actuator_for(self, joint_id: int) -> int:
        m = self.model
        for i in range(m.nu):
            if m.actuator_trntype[i] == mujoco.mjtTrn.mjTRN_JOINT and m.actuator_trnid[i, 0] == joint_id:
                return i
        raise KeyError(f"no actuator drives joint {m.joint(joint_id).name!r}")

    def _solve_home(self) -> np.ndarray:
        q, err = self.solve_ik(HOME_TCP, np.eye(3), q_init=HOME_JOINTS_GUESS, iters=200)
        if err > 1e-3:
            raise RuntimeError(f"cannot reach the home TCP pose {HOME_TCP} (IK error {err:.4f} m)")
        return q

    # -- public kinematics and object poses (used by the expert) ------------------------------
    def ee_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Measured TCP position (3,) m and rotation (3, 3), base frame."""
        return self.data.site_xpos[self._tcp].copy(), self.data.site_xmat[self._tcp].reshape(3, 3).copy()

    def ee_target(self) -> tuple[np.ndarray, np.ndarray]:
        """Commanded TCP position (3,) and rotation (3, 3) that the next delta applies to."""
        return self._target_pos.copy(), self._target_rot.copy()

    def arm_joints(self) -> np.ndarray:
        """Measured arm joint positions (6,) rad."""
        return self.data.qpos[self._arm_qpos].copy()

    def gripper_opening(self) -> float:
        """Finger opening normalised to 0 (closed) .. 1 (open)."""
        x = self.data.qpos[self._finger_qpos]
        return float((x - FINGER_CLOSED) / (FINGER_OPEN - FINGER_CLOSED))

    def block_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Block centre (3,) m and rotation (3, 3)."""
        b = self._block_body
        return self.data.xpos[b].copy(), self.data.xmat[b].reshape(3, 3).copy()

    def bowl_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Bowl frame (centre of its base, on the table) (3,) m and rotation (3, 3)."""
        b = self._bowl_body
        return self.data.xpos[b].copy(), self.data.xmat[b].reshape(3, 3).copy()

    def block_held(self) -> bool:
        """Both finger pads touch the block."""
        touching = set()
        for c in self.data.contact[: self.data.ncon]:
            b1, b2 = self.model.geom_bodyid[c.geom1], self.model.geom_bodyid[c.geom2]
            if b1 == self._block_body and b2 in self._finger_bodies:
                touching.add(b2)
            elif b2 == self._block_body and b1 in self._finger_bodies:
                touching.add(b1)
        return len(touching) == 2

    def solve_ik(self, pos: np.ndarray, rot: np.ndarray, q_init: np.ndarray | None = None,
                 **kwargs) -> tuple[np.ndarray, float]:
        """Arm joints (6,) putting the TCP at ``pos`` with rotation ``rot`` (base frame),
        solved on a private ``MjData``; returns ``(joints, position_error_m)``."""
        self._ik_data.qpos[:] = self.data.qpos
        q0 = self.arm_joints() if q_init is None else q_init
        body_rot = rot @ self._tcp_rot_in_gripper.T  # gripper_link rotation
        kwargs.setdefault("rot_weight", 0.5)
        return solve_ik(self.model, self._ik_data, self._gripper_body, TCP_OFFSET, self._arm_qpos,
                        self._arm_dof, self._arm_range, q0, pos, body_rot, **kwargs)

    def tcp_fk(self, joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """TCP position (3,) and rotation (3, 3) for arm joints (6,), on the private data."""
        d = self._ik_data
        d.qpos[self._arm_qpos] = joints
        mujoco.mj_kinematics(self.model, d)
        return d.site_xpos[self._tcp].copy(), d.site_xmat[self._tcp].reshape(3, 3).copy()

    # -- TaskEnv ------------------------------------------------------------------------------
    def _randomize(self, rng: np.random.Generator, options: dict) -> None:
        """Home arm, open gripper; block and bowl sampled in front of the robot.

        ``options`` may fix ``block_xy`` (2,), ``block_yaw`` (rad) and ``bowl_xy`` (2,).
        """
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        block_xy, bowl_xy = self._sample_layout(rng, options)
        block_yaw = float(options.get("block_yaw", rng.uniform(-np.pi, np.pi)))
        d.qpos[self._block_qpos:self._block_qpos + 7] = np.r_[
            block_xy, BLOCK_HALF, np.cos(block_yaw / 2), 0.0, 0.0, np.sin(block_yaw / 2)]
        d.qpos[self._bowl_qpos:self._bowl_qpos + 7] = np.r_[bowl_xy, 0.0, 1.0, 0.0, 0.0, 0.0]

        d.qpos[self._arm_qpos] = self._home_q
        d.qpos[self._finger_qpos] = FINGER_OPEN
        d.qpos[self._finger_pair_qpos] = -FINGER_OPEN
        self._q_cmd = self._home_q.copy()
        d.ctrl[self._arm_ctrl] = self._home_q
        d.ctrl[self._gripper_ctrl] = FINGER_OPEN
        mujoco.mj_forward(m, d)
        self._target_pos, self._target_rot = self.tcp_fk(self._home_q)

    @staticmethod
    def _sample_layout(rng: np.random.Generator, options: dict) -> tuple[np.ndarray, np.ndarray]:
        fixed_block = options.get("block_xy")
        fixed_bowl = options.get("bowl_xy")
        for _ in range(1000):
            block = np.asarray(fixed_block, float) if fixed_block is not None else rng.uniform(*BLOCK_REGION)
            bowl = np.asarray(fixed_bowl, float) if fixed_bowl is not None else rng.uniform(*BOWL_REGION)
            if np.linalg.norm(block - bowl) >= MIN_SEPARATION:
                return block, bowl
            if fixed_block is not None and fixed_bowl is not None:
                break
        raise ValueError(
            f"block {fixed_block} and bowl {fixed_bowl} must be >= {MIN_SEPARATION:.3f} m apart"
        )

    def _apply_action(self, action: np.ndarray) -> None:
        m, d = self.model, self.data
        pos = np.clip(self._target_pos + action[:3], WORKSPACE_LOW, WORKSPACE_HIGH)
        rpy = mat_to_rpy(rpy_to_mat(action[3:6]) @ self._target_rot)
        rpy[:2] = np.clip(rpy[:2], -MAX_TILT, MAX_TILT)
        q, _ = self.solve_ik(pos, rpy_to_mat(rpy), q_init=self._q_cmd)
        q = np.clip(q, self._arm_range[:, 0], self._arm_range[:, 1])  # joint limits (rad)
        self._target_pos, self._target_rot = self.tcp_fk(q)

        d.ctrl[self._gripper_ctrl] = FINGER_CLOSED + action[6] * (FINGER_OPEN - FINGER_CLOSED)
        q_prev = self._q_cmd
        for k in range(1, self._ramp_substeps + 1):
            d.ctrl[self._arm_ctrl] = q_prev + (q - q_prev) * (k / self._ramp_substeps)
            mujoco.mj_step(m, d)
        mujoco.mj_step(m, d, nstep=self.n_substeps - self._ramp_substeps)
        self._q_cmd = q

    def _state(self) -> np.ndarray:
        pos, rot = self.ee_pose()
        return np.r_[pos, mat_to_rpy(rot), self.gripper_opening()]

    def block_in_bowl(self) -> bool:
        """Block centre inside the bowl's inner radius and below its rim."""
        block, _ = self.block_pose()
        bowl, _ = self.bowl_pose()
        return bool(np.linalg.norm(block[:2] - bowl[:2]) < BOWL_INNER_RADIUS - BLOCK_HALF * 0.5
                    and block[2] < bowl[2] + BOWL_RIM)

    def _evaluate(self) -> tuple[bool, int]:
        block, _ = self.block_pose()
        bowl, _ = self.bowl_pose()
        held = self.block_held()
        speed = float(np.linalg.norm(self.data.qvel[self._block_dof:self._block_dof + 3]))
        if self.block_in_bowl() and not held and speed < AT_REST_SPEED:
            return True, 4
        over_bowl = np.linalg.norm(block[:2] - bowl[:2]) < BOWL_INNER_RADIUS
        if over_bowl and block[2] > BLOCK_HALF + 0.002:
            return False, 3
        if held:
            return False, 2
        tcp, _ = self.ee_pose()
        return False, int(np.linalg.norm(tcp - block) < NEAR_BLOCK)


# -- scripted expert -------------------------------------------------------------------------
HOVER_HEIGHT = 0.07  # m above the block centre before descending
GRASP_DEPTH = 0.004  # m, TCP this far above the block centre when closing
CARRY_HEIGHT = 0.12  # m, TCP height while carrying (block bottom well above the rim)
RELEASE_CLEARANCE = 0.012  # m, block bottom above the bowl floor when the gripper opens
EXPERT_DPOS = 0.03  # m, largest position delta the expert commands (action bound 0.05)
POS_TOL = 0.008  # m, a waypoint is reached when the measured TCP is this close
CLOSE_STEPS = 3  # control steps spent closing the gripper (0.6 s)
OPEN_STEPS = 2
# expert phase -> index into WidowXPickPlaceEnv.subtasks
PHASE_SUBTASK = {"hover": 0, "descend": 0, "close": 1, "lift": 2, "carry": 2,
                 "lower": 3, "open": 3, "retreat": 3}


def nearest_grasp_yaw(block_rot: np.ndarray, current_yaw: float) -> float:
    """The TCP yaw aligning the fingers with a pair of block faces, closest to ``current_yaw``."""
    block_yaw = float(np.arctan2(block_rot[1, 0], block_rot[0, 0]))
    k = np.round((current_yaw - block_yaw) / (np.pi / 2))
    return float(wrap_angle(block_yaw + k * np.pi / 2))


class WidowXPickPlaceExpert(ScriptedExpert):
    """Closed-loop waypoint expert: hover over the block, descend, close, lift, carry over the
    bowl, lower, open.

    Each step it reads the block and bowl poses and the commanded TCP pose
    (:meth:`WidowXPickPlaceEnv.ee_target`), and returns the delta towards the current waypoint
    (capped at 3 cm, yaw capped at 0.25 rad) with roll and pitch driven back to zero. It moves on
    to the next waypoint when the measured TCP is within 8 mm of it. A block that slips while
    lifting or carrying sends the expert back to hovering over it; the subtask index then stays
    at "carry" (it never decreases), so such rare retries are annotated coarsely.
    """

    env: WidowXPickPlaceEnv

    def reset(self, obs: dict, info: dict) -> None:
        self.subtask_index = 0
        self.phase = "hover"
        self.phase_steps = 0
        self.grasp_yaw = 0.0
        self.lift_xy = np.zeros(2)

    def _goto(self, goal: np.ndarray, yaw: float, gripper: float) -> np.ndarray:
        pos, rot = self.env.ee_target()
        dpos = goal - pos
        n = float(np.linalg.norm(dpos))
        if n > EXPERT_DPOS:
            dpos *= EXPERT_DPOS / n
        rpy = mat_to_rpy(rot)
        drpy = np.clip([-rpy[0], -rpy[1], wrap_angle(yaw - rpy[2])], -MAX_DROT, MAX_DROT)
        return np.r_[dpos, drpy, gripper].astype(np.float32)

    def _reached(self, goal: np.ndarray) -> bool:
        tcp, _ = self.env.ee_pose()
        return bool(np.linalg.norm(tcp - goal) < POS_TOL)

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self.phase_steps = 0

    def act(self, obs: dict, info: dict) -> np.ndarray:
        env = self.env
        block, block_rot = env.block_pose()
        bowl, _ = env.bowl_pose()
        _, target_rot = env.ee_target()
        hover = block + np.array([0.0, 0.0, HOVER_HEIGHT])
        grasp = block + np.array([0.0, 0.0, GRASP_DEPTH])
        over_bowl = np.r_[bowl[:2], CARRY_HEIGHT]
        release = np.r_[bowl[:2], bowl[2] + env.bowl_floor + env.block_half + RELEASE_CLEARANCE
                        + GRASP_DEPTH]

        # phase transitions (checked before acting, so each action belongs to one phase)
        if self.phase == "hover":
            self.grasp_yaw = nearest_grasp_yaw(block_rot, float(mat_to_rpy(target_rot)[2]))
            if self._reached(hover):
                self._set_phase("descend")
        if self.phase == "descend" and self._reached(grasp):
            self._set_phase("close")
        if self.phase == "close" and self.phase_steps >= CLOSE_STEPS:
            self._set_phase("lift")
            self.lift_xy = env.ee_target()[0][:2]
        if self.phase in ("lift", "carry") and not env.block_held():
            self._set_phase("hover")  # dropped it: try again
        if self.phase == "lift" and self._reached(np.r_[self.lift_xy, CARRY_HEIGHT]):
            self._set_phase("carry")
        if self.phase == "carry" and self._reached(over_bowl):
            self._set_phase("lower")
        if self.phase == "lower" and self._reached(release):
            self._set_phase("open")
        if self.phase == "open" and self.phase_steps >= OPEN_STEPS:
            self._set_phase("retreat")

        if self.phase == "hover":
            action = self._goto(hover, self.grasp_yaw, 1.0)
        elif self.phase == "descend":
            action = self._goto(grasp, self.grasp_yaw, 1.0)
        elif self.phase == "close":
            action = self._goto(env.ee_target()[0], self.grasp_yaw, 0.0)
        elif self.phase == "lift":
            action = self._goto(np.r_[self.lift_xy, CARRY_HEIGHT], self.grasp_yaw, 0.0)
        elif self.phase == "carry":
            action = self._goto(over_bowl, self.grasp_yaw, 0.0)
        elif self.phase == "lower":
            action = self._goto(release, self.grasp_yaw, 0.0)
        elif self.phase == "open":
            action = self._goto(env.ee_target()[0], self.grasp_yaw, 1.0)
        else:  # retreat: straight up, open
            action = self._goto(np.r_[release[:2], CARRY_HEIGHT], self.grasp_yaw, 1.0)
        self.phase_steps += 1

        self.subtask_index = max(self.subtask_index, PHASE_SUBTASK[self.phase])
        return action
