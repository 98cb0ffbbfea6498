"""ALOHA transfer cube: gym-aloha's ``AlohaTransferCube-v0`` re-hosted on :class:`AlohaEnv`.

Task: the right arm picks up a 4 cm red cube from the table and hands it over to the left arm.

Kept from gym-aloha (``gym_aloha/tasks/sim.py``, ``gym_aloha/utils.py``), so that numbers compare
with published ACT results:

- the scene, ``bimanual_viperx_transfer_cube.xml`` from gym-aloha's assets, loaded unchanged;
- the initial state: both arms at START_ARM_POSE, the cube at x ~ U[0, 0.2], y ~ U[0.4, 0.6],
  z = 0.05 m (it drops 3 cm onto the table in the first steps), identity orientation;
- the reward, from contact pairs: 1 right finger touches the cube, 2 ... and the cube is off
  the table, 3 the left finger touches the cube, 4 ... and the cube is off the table.
  Success is reward 4; ``info["subtask_progress"]`` is that reward.

Departures: the cube pose is sampled from the env's own ``np_random`` (``reset(seed=s)`` is
deterministic; gym-aloha draws it from a separate ``RandomState``); contact pairs are matched in
both geom orders (gym-aloha matches only the order MuJoCo happens to report); rendering is one
fast 128x128 camera by default (gym-aloha renders three 480x640 cameras with shadows).

The scripted expert (:class:`AlohaTransferCubeExpert`) is our own: a vertical top-down grasp with
the right gripper (fingers on the cube's +-y faces), a lift that turns the gripper horizontal so
the cube points at the left arm, then a horizontal approach of the left gripper rolled by 90
degrees (fingers on the cube's +-z faces, clear of the right fingers). The left arm's approach is
re-planned from the measured cube pose once the cube is at the meeting point.
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

# gym-aloha's sample_box_pose ranges (metres, world frame).
CUBE_POS_LOW = np.array([0.0, 0.4, 0.05])
CUBE_POS_HIGH = np.array([0.2, 0.6, 0.05])
CUBE_HALF_SIZE = 0.02

CUBE_GEOM = "red_box"
TABLE_GEOM = "table"
LEFT_FINGER_GEOM = "vx300s_left/10_left_gripper_finger"
RIGHT_FINGER_GEOM = "vx300s_right/10_right_gripper_finger"


class AlohaTransferCubeEnv(AlohaEnv):
    """Hand a cube over from the right arm to the left arm (gym-aloha's transfer cube)."""

    task = "pick up the red cube with the right arm and hand it over to the left arm"
    subtasks = (
        "reach and grasp the cube with the right gripper",
        "lift the cube",
        "bring the cube to the left gripper",
        "grasp the cube with the left gripper",
    )

    def __init__(self, render_mode: str | None = "rgb_array", cameras: Sequence[str] | None = None,
                 image_size: int | Sequence[int] = 128, observe_pixels: bool = True):
        model = mujoco.MjModel.from_xml_path(str(ALOHA_ASSETS / "bimanual_viperx_transfer_cube.xml"))
        super().__init__(model, render_mode=render_mode, cameras=cameras, image_size=image_size,
                         observe_pixels=observe_pixels)
        self._cube_qpos_adr = int(model.jnt_qposadr[model.joint("red_box_joint").id])

    def _randomize(self, rng: np.random.Generator, options: dict) -> None:
        mujoco.mj_resetData(self.model, self.data)
        self.reset_robot()
        adr = self._cube_qpos_adr
        self.data.qpos[adr: adr + 3] = rng.uniform(CUBE_POS_LOW, CUBE_POS_HIGH)
        self.data.qpos[adr + 3: adr + 7] = (1.0, 0.0, 0.0, 0.0)
        mujoco.mj_forward(self.model, self.data)

    def cube_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Cube centre (3,) in metres and orientation (3, 3), world frame."""
        return self.body_pose("box")

    def _evaluate(self) -> tuple[bool, int]:
        pairs = self.contact_pairs()
        touch_left = (CUBE_GEOM, LEFT_FINGER_GEOM) in pairs
        touch_right = (CUBE_GEOM, RIGHT_FINGER_GEOM) in pairs
        touch_table = (CUBE_GEOM, TABLE_GEOM) in pairs
        reward = 0
        if touch_right:
            reward = 1
        if touch_right and not touch_table:  # lifted by the right arm
            reward = 2
        if touch_left:  # transfer attempted
            reward = 3
        if touch_left and not touch_table:  # transferred
            reward = 4
        return reward == 4, reward


# Gripper orientations (world frame), see rot_from_axes.
RIGHT_DOWN = rot_from_axes((0, 0, -1), (0, -1, 0))  # pointing down, fingers on the +-y faces
RIGHT_TO_LEFT = rot_from_axes((-1, 0, 0), (0, -1, 0))  # pointing at the left arm (-x)
LEFT_ROLLED = rot_from_axes((1, 0, 0), (0, 0, 1))  # pointing +x, fingers on the +-z faces

OPEN, CLOSED = 1.0, 0.0
GRASP_TCP_HEIGHT = 0.05  # right tool centre point above the table when grasping (fingertips 6 mm up)
MEET_POINT = np.array([0.0, 0.5, 0.25])  # where the cube is handed over
LEFT_GRASP_BEHIND = 0.01  # left tool centre point this far (-x) behind the cube centre
LEFT_STANDOFF = 0.10  # the left gripper waits this far (-x) from its grasp pose


class AlohaTransferCubeExpert(BimanualWaypointExpert):
    """Right arm: top-down grasp, lift, turn horizontal at the meeting point. Left arm: wait
    rolled by 90 degrees, approach along +x when the cube has arrived (re-planned from the
    measured cube pose), close. Success comes when the left finger touches the lifted cube."""

    # step schedule (50 Hz)
    T_ABOVE, T_DOWN, T_CLOSED = 60, 90, 105
    T_LIFTED, T_MEET = 130, 190
    T_LEFT_START, T_LEFT_AT, T_LEFT_CLOSED = 200, 235, 255
    T_END = 300

    def plan(self, obs: dict, info: dict) -> tuple[dict[str, list[Waypoint]], list[int]]:
        cube, _ = self.env.cube_pose()
        grasp = np.array([cube[0], cube[1], GRASP_TCP_HEIGHT])
        # the cube centre hangs (GRASP_TCP_HEIGHT - cube z) beyond the tool centre point
        hang = GRASP_TCP_HEIGHT - CUBE_HALF_SIZE
        right_meet = MEET_POINT + np.array([hang, 0.0, 0.0])
        start = {arm: self.env.ee_pose(arm) for arm in ARMS}
        right = [
            Waypoint(0, start["right"][0], start["right"][1], START_GRIPPER),
            Waypoint(self.T_ABOVE, grasp + [0, 0, 0.08], RIGHT_DOWN, OPEN),
            Waypoint(self.T_DOWN, grasp, RIGHT_DOWN, OPEN),
            Waypoint(self.T_CLOSED, grasp, RIGHT_DOWN, CLOSED),
            Waypoint(self.T_LIFTED, grasp + [0, 0, 0.08], RIGHT_DOWN, CLOSED),
            Waypoint(self.T_MEET, right_meet, RIGHT_TO_LEFT, CLOSED),
            Waypoint(self.T_END, right_meet, RIGHT_TO_LEFT, CLOSED),
        ]
        wait = MEET_POINT - np.array([LEFT_GRASP_BEHIND + LEFT_STANDOFF, 0.0, 0.0])
        left = [
            Waypoint(0, start["left"][0], start["left"][1], START_GRIPPER),
            Waypoint(self.T_ABOVE, wait, LEFT_ROLLED, OPEN),
            Waypoint(self.T_LEFT_START, wait, LEFT_ROLLED, OPEN),
            *self._left_approach(MEET_POINT),
        ]
        ends = [self.T_CLOSED, self.T_LIFTED, self.T_LEFT_START, self.T_END]
        return {"left": left, "right": right}, ends

    def _left_approach(self, cube: np.ndarray) -> list[Waypoint]:
        """Left waypoints after T_LEFT_START: move in to the cube at ``cube`` (3,), close."""
        at = cube - np.array([LEFT_GRASP_BEHIND, 0.0, 0.0])
        return [
            Waypoint(self.T_LEFT_AT, at, LEFT_ROLLED, OPEN),
            Waypoint(self.T_LEFT_CLOSED, at, LEFT_ROLLED, CLOSED),
            Waypoint(self.T_END, at, LEFT_ROLLED, CLOSED),
        ]

    def act(self, obs: dict, info: dict) -> np.ndarray:
        if self.t == self.T_LEFT_START:  # aim the left grasp at where the cube really is
            cube, _ = self.env.cube_pose()
            kept = [w for w in self.waypoints["left"] if w.t <= self.T_LEFT_START]
            self.waypoints["left"] = kept + self._left_approach(cube)
        return super().act(obs, info)
