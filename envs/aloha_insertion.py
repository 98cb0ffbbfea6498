"""ALOHA insertion: gym-aloha's ``AlohaInsertion-v0`` re-hosted on :class:`AlohaEnv`.

Task: the right arm picks up a red peg (12 x 2 x 2 cm), the left arm a blue socket (a 12 cm
square tube, 3.6 cm inside, with a 2 x 2 cm red pin in its middle), and the peg is inserted into
the socket until it touches the pin.

Kept from gym-aloha (``gym_aloha/tasks/sim.py``, ``gym_aloha/utils.py``):

- the scene, ``bimanual_viperx_insertion.xml`` from gym-aloha's assets, loaded unchanged;
- the initial state: both arms at START_ARM_POSE; peg at x ~ U[0.1, 0.2], y ~ U[0.4, 0.6],
  socket at x ~ U[-0.2, -0.1], y ~ U[0.4, 0.6], both at z = 0.05 m (they drop onto the table)
  with identity orientation; peg drawn first, then socket;
- the reward, from contact pairs: 1 the left finger touches the socket and the right finger the
  peg, 2 ... and neither touches the table, 3 the peg touches the socket and neither touches the
  table, 4 the peg touches the pin. Success is reward 4; ``info["subtask_progress"]`` is that reward.

Departures: poses are sampled from the env's own ``np_random`` (deterministic ``reset(seed=s)``);
contact pairs are matched in both geom orders; one fast 128x128 camera by default.

The scripted expert (:class:`AlohaInsertionExpert`) is our own: both grippers grasp top-down
with the fingers on the objects' +-y faces (the right one near the peg's +x end so that its -x end
sticks out, the left one at the socket's middle), lift, and carry the objects to a pre-insertion
pose with the peg on the socket's axis, 3 cm outside it. There the right arm's targets are
corrected from the measured peg and socket poses (the objects shift in the fingers when grasped),
and the peg is pushed slowly along the socket's axis onto the pin.
"""

from __future__ import annotations

from typing import Sequence

import mujoco
import numpy as np

from envs.aloha import (
    ALOHA_ASSETS,
    ARMS,
    START_GRIPPER,
    AlohaEnv,
    BimanualWaypointExpert,
    Waypoint,
    rot_from_axes,
)

# gym-aloha's sample_insertion_pose ranges (metres, world frame).
PEG_POS_LOW = np.array([0.1, 0.4, 0.05])
PEG_POS_HIGH = np.array([0.2, 0.6, 0.05])
SOCKET_POS_LOW = np.array([-0.2, 0.4, 0.05])
SOCKET_POS_HIGH = np.array([-0.1, 0.6, 0.05])

PEG_HALF_LENGTH = 0.06  # along the peg body's x axis
PEG_HALF_HEIGHT = 0.01
SOCKET_HALF_HEIGHT = 0.022  # outer half height of the tube (walls at +-0.02, 2 mm thick)
PIN_HALF_LENGTH = 0.04  # the pin's end faces are this far from the socket centre along x

PEG_GEOM = "red_peg"
PIN_GEOM = "pin"
TABLE_GEOM = "table"
SOCKET_GEOMS = ("socket-1", "socket-2", "socket-3", "socket-4")
LEFT_FINGER_GEOM = "vx300s_left/10_left_gripper_finger"
RIGHT_FINGER_GEOM = "vx300s_right/10_right_gripper_finger"


class AlohaInsertionEnv(AlohaEnv):
    """Insert a peg held by the right arm into a socket held by the left arm (gym-aloha's insertion)."""

    task = "insert the red peg into the blue socket"
    subtasks = (
        "grasp the peg with the right gripper and the socket with the left gripper",
        "lift the peg and the socket",
        "align the peg with the socket",
        "insert the peg into the socket",
    )

    def __init__(self, render_mode: str | None = "rgb_array", cameras: Sequence[str] | None = None,
                 image_size: int | Sequence[int] = 128, observe_pixels: bool = True):
        model = mujoco.MjModel.from_xml_path(str(ALOHA_ASSETS / "bimanual_viperx_insertion.xml"))
        super().__init__(model, render_mode=render_mode, cameras=cameras, image_size=image_size,
                         observe_pixels=observe_pixels)
        self._peg_qpos_adr = int(model.jnt_qposadr[model.joint("red_peg_joint").id])
        self._socket_qpos_adr = int(model.jnt_qposadr[model.joint("blue_socket_joint").id])

    def _randomize(self, rng: np.random.Generator, options: dict) -> None:
        mujoco.mj_resetData(self.model, self.data)
        self.reset_robot()
        for adr, low, high in ((self._peg_qpos_adr, PEG_POS_LOW, PEG_POS_HIGH),
                               (self._socket_qpos_adr, SOCKET_POS_LOW, SOCKET_POS_HIGH)):
            self.data.qpos[adr: adr + 3] = rng.uniform(low, high)
            self.data.qpos[adr + 3: adr + 7] = (1.0, 0.0, 0.0, 0.0)
        mujoco.mj_forward(self.model, self.data)

    def peg_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Peg centre (3,) in metres and orientation (3, 3) (its long axis is column 0), world frame."""
        return self.body_pose("peg")

    def socket_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Socket centre (3,) in metres and orientation (3, 3) (the tube's axis is column 0), world frame."""
        return self.body_pose("socket")

    def _evaluate(self) -> tuple[bool, int]:
        pairs = self.contact_pairs()
        touch_right = (PEG_GEOM, RIGHT_FINGER_GEOM) in pairs
        touch_left = any((s, LEFT_FINGER_GEOM) in pairs for s in SOCKET_GEOMS)
        peg_on_table = (PEG_GEOM, TABLE_GEOM) in pairs
        socket_on_table = any((s, TABLE_GEOM) in pairs for s in SOCKET_GEOMS)
        peg_touches_socket = any((PEG_GEOM, s) in pairs for s in SOCKET_GEOMS)
        lifted = not peg_on_table and not socket_on_table
        reward = 0
        if touch_left and touch_right:  # both touched
            reward = 1
        if touch_left and touch_right and lifted:  # both grasped and lifted
            reward = 2
        if peg_touches_socket and lifted:  # peg and socket touching in the air
            reward = 3
        if (PEG_GEOM, PIN_GEOM) in pairs:  # inserted
            reward = 4
        return reward == 4, reward


DOWN_Y = rot_from_axes((0, 0, -1), (0, 1, 0))  # pointing down, fingers on the +-y faces
OPEN, CLOSED = 1.0, 0.0
GRASP_TCP_HEIGHT = 0.05  # tool centre point above the table when grasping (fingertips 6 mm up)
PEG_GRASP_OFFSET = 0.03  # right grasp this far (+x, along the peg) from the peg centre
MEET_SOCKET = np.array([-0.06, 0.5, 0.22])  # socket centre at the pre-insertion pose
SOCKET_HALF_LENGTH = 0.06  # the socket's mouth is this far (+x) from its centre
PRE_INSERT_GAP = 0.03  # peg end outside the socket mouth at the pre-insertion pose
INSERT_DEPTH = 0.035  # peg end inside the socket mouth at the end of the push (pin at 0.02)
CORRECT_EVERY = 5  # steps between corrections of the right arm from the measured poses


class AlohaInsertionExpert(BimanualWaypointExpert):
    """Top-down grasps, lift, carry to a pre-insertion pose, push the peg along the socket's
    axis onto the pin, correcting the right arm from the measured peg and socket poses.

    The peg and the socket shift in the fingers when grasped and the arms sag a little under
    position control, so the open-loop plan misses the 8 mm clearance around the peg. Every
    ``CORRECT_EVERY`` steps from ``T_SETTLED`` the peg's -x end is compared with where the plan
    wants it on the socket's axis and the right arm's remaining waypoints are shifted by the
    error: in 3-D while the peg is held outside the mouth, across the axis only once it moves in.
    """

    # step schedule (50 Hz)
    T_ABOVE, T_DOWN, T_CLOSED = 60, 90, 105
    T_LIFTED, T_MEET = 130, 200
    T_SETTLED, T_ALIGNED, T_INSERTED = 215, 235, 295
    T_END = 400

    def plan(self, obs: dict, info: dict) -> tuple[dict[str, list[Waypoint]], list[int]]:
        peg, _ = self.env.peg_pose()
        socket, _ = self.env.socket_pose()
        start = {arm: self.env.ee_pose(arm) for arm in ARMS}
        peg_grasp = np.array([peg[0] + PEG_GRASP_OFFSET, peg[1], GRASP_TCP_HEIGHT])
        socket_grasp = np.array([socket[0], socket[1], GRASP_TCP_HEIGHT])
        # objects hang below the tool centre point by (grasp height - resting centre height)
        left_meet = MEET_SOCKET + np.array([0.0, 0.0, GRASP_TCP_HEIGHT - SOCKET_HALF_HEIGHT])
        # right tool position minus the peg's -x end, for the planned grasp
        tool_from_end = np.array([PEG_HALF_LENGTH + PEG_GRASP_OFFSET, 0.0,
                                        GRASP_TCP_HEIGHT - PEG_HALF_HEIGHT])
        mouth = MEET_SOCKET + np.array([SOCKET_HALF_LENGTH, 0.0, 0.0])
        right_meet = mouth + np.array([PRE_INSERT_GAP, 0.0, 0.0]) + tool_from_end
        up = np.array([0.0, 0.0, 0.08])
        waypoints = {}
        for arm, grasp, meet in (("left", socket_grasp, left_meet), ("right", peg_grasp, right_meet)):
            waypoints[arm] = [
                Waypoint(0, start[arm][0], start[arm][1], START_GRIPPER),
                Waypoint(self.T_ABOVE, grasp + up, DOWN_Y, OPEN),
                Waypoint(self.T_DOWN, grasp, DOWN_Y, OPEN),
                Waypoint(self.T_CLOSED, grasp, DOWN_Y, CLOSED),
                Waypoint(self.T_LIFTED, grasp + up, DOWN_Y, CLOSED),
                Waypoint(self.T_MEET, meet, DOWN_Y, CLOSED),
            ]
        waypoints["left"].append(Waypoint(self.T_END, left_meet, DOWN_Y, CLOSED))
        # the push, one waypoint per correction period so that corrections act at once
        push = [Waypoint(t, mouth - [self._depth(t), 0.0, 0.0] + tool_from_end, DOWN_Y, CLOSED)
                for t in range(self.T_SETTLED, self.T_INSERTED + 1, CORRECT_EVERY)]
        waypoints["right"] += [*push, Waypoint(self.T_END, push[-1].pos, DOWN_Y, CLOSED)]
        ends = [self.T_CLOSED, self.T_LIFTED, self.T_ALIGNED, self.T_END]
        return waypoints, ends

    def _depth(self, t: int) -> float:
        """Planned depth (m) of the peg end inside the socket mouth at step ``t`` (negative: outside)."""
        frac = np.clip((t - self.T_ALIGNED) / (self.T_INSERTED - self.T_ALIGNED), 0.0, 1.0)
        return float(-PRE_INSERT_GAP + frac * (INSERT_DEPTH + PRE_INSERT_GAP))

    def _correction(self) -> np.ndarray:
        """World shift (3,) that moves the measured peg end onto its planned place on the
        measured socket axis (across the axis only once the push has started)."""
        peg, peg_rot = self.env.peg_pose()
        socket, socket_rot = self.env.socket_pose()
        axis = socket_rot[:, 0]  # the socket's axis, out of its +x mouth
        peg_axis = peg_rot[:, 0] if peg_rot[:, 0] @ axis > 0 else -peg_rot[:, 0]
        end = peg - PEG_HALF_LENGTH * peg_axis
        wanted = socket + (SOCKET_HALF_LENGTH - self._depth(self.t)) * axis
        error = wanted - end
        if self.t > self.T_ALIGNED:
            error -= (error @ axis) * axis
        return error

    def act(self, obs: dict, info: dict) -> np.ndarray:
        if self.T_SETTLED <= self.t <= self.T_INSERTED and (self.t - self.T_SETTLED) % CORRECT_EVERY == 0:
            shift = self._correction()
            self.waypoints["right"] = [
                w if w.t <= self.t else Waypoint(w.t, w.pos + shift, w.rot, w.gripper)
                for w in self.waypoints["right"]
            ]
        return super().act(obs, info)
