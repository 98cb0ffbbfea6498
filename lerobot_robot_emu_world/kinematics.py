"""The arms' kinematics, from the project's own MuJoCo models and IK (no second implementation).

- :class:`AlohaKinematics`: forward kinematics of both ViperX arms through an ``aloha_*`` task's model
  (:meth:`envs.aloha.AlohaEnv.ee_pose`), world frame of the ALOHA scene; for the workspace check.
- :class:`WidowXKinematics`: forward kinematics and the damped-least-squares IK of
  ``envs/widowx_pick_place.py`` (:meth:`WidowXPickPlaceEnv.solve_ik`, ``tcp_fk``), in the robot's base
  frame, and the task's action semantics (an end-effector delta applied to the commanded tool pose,
  clamped to the task's workspace and tilt) so a real WidowX moves as the simulated one does.

Each wraps a private env built without rendering; it only serves kinematics, on the env's private
``MjData`` (the simulation state is never touched).
"""

from __future__ import annotations

import numpy as np


class AlohaKinematics:
    """Tool centre points of the two ViperX arms (metres, ALOHA world frame)."""

    def __init__(self):
        from envs.aloha_transfer_cube import AlohaTransferCubeEnv

        self.env = AlohaTransferCubeEnv(render_mode=None, observe_pixels=False)

    def tcp_position(self, arm: str, joints: np.ndarray) -> np.ndarray:
        return self.env.ee_pose(arm, np.asarray(joints, dtype=np.float64))[0]


class WidowXKinematics:
    """The WidowX 250's tool pose for joints, joints for a tool pose (the project's IK), and the
    ``widowx_*`` tasks' 7-D end-effector-delta action turned into joint targets and back."""

    def __init__(self):
        from envs.widowx_pick_place import WidowXPickPlaceEnv

        self.env = WidowXPickPlaceEnv(render_mode=None, observe_pixels=False)
        self.action_low = self.env.action_space.low.astype(np.float64)
        self.action_high = self.env.action_space.high.astype(np.float64)

    def pose(self, joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tool centre point position (3,) and rotation (3, 3), base frame."""
        return self.env.tcp_fk(np.asarray(joints, dtype=np.float64))

    def tcp_position(self, arm: str, joints: np.ndarray) -> np.ndarray:
        return self.pose(joints)[0]

    def state(self, joints: np.ndarray, gripper: float) -> np.ndarray:
        """The tasks' 7-D ``agent_pos``: tool position, roll/pitch/yaw, gripper opening."""
        from envs.widowx_pick_place import mat_to_rpy

        pos, rot = self.pose(joints)
        return np.r_[pos, mat_to_rpy(rot), gripper]

    def joints_for_delta(self, delta: np.ndarray, target_pos: np.ndarray, target_rot: np.ndarray,
                         q_init: np.ndarray) -> np.ndarray:
        """Joint targets (6,) for the end-effector delta (6,) applied to the commanded tool pose, as the
        task applies it: position clamped to the task's workspace, roll and pitch to its tilt limit."""
        from envs.widowx_pick_place import (
            MAX_TILT,
            WORKSPACE_HIGH,
            WORKSPACE_LOW,
            mat_to_rpy,
            rpy_to_mat,
        )

        pos = np.clip(target_pos + delta[:3], WORKSPACE_LOW, WORKSPACE_HIGH)
        rpy = mat_to_rpy(rpy_to_mat(delta[3:6]) @ target_rot)
        rpy[:2] = np.clip(rpy[:2], -MAX_TILT, MAX_TILT)
        q, _ = self.env.solve_ik(pos, rpy_to_mat(rpy), q_init=np.asarray(q_init, dtype=np.float64))
        return q

    def delta_for_joints(self, joints: np.ndarray, target_pos: np.ndarray, target_rot: np.ndarray) -> np.ndarray:
        """The end-effector delta (6,) that takes the commanded tool pose to the pose of ``joints``."""
        from envs.widowx_pick_place import mat_to_rpy

        pos, rot = self.pose(joints)
        return np.r_[pos - target_pos, mat_to_rpy(rot @ np.asarray(target_rot).T)]
