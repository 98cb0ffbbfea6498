"""``emu_world_sim``: a robot whose arm and cameras are one of the project's MuJoCo tasks.

The same interface, action model and safety layer as the hardware (:class:`SafeRobot`), so the whole
hardware path (agent -> safety layer -> robot -> observations) runs without hardware: ALOHA tasks take
the 14-D joint command as the task's action; WidowX tasks solve the end-effector delta to joints with the
project's IK, filter the joints, and step the task with the delta that reaches the filtered joints (the
task re-solves it from its own commanded pose). Joint limits are the task model's own (its MJCF); the
other limits come from ``configs/robot/sim.yaml``. The task's ``info`` (success, subtask progress) is
available through :meth:`task_info`, which hardware cannot measure.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emu_world.safety import SafetyLayer
from lerobot_robot_emu_world.base import (
    EndEffectorActions,
    SafeRobot,
    aloha_command_space,
    widowx_command_space,
)
from lerobot_robot_emu_world.config import EmuSimConfig, embodiment
from lerobot_robot_emu_world.kinematics import AlohaKinematics, WidowXKinematics


class EmuSim(SafeRobot):
    """A simulated ALOHA or WidowX (``config.task``), behind the safety layer."""

    config_class = EmuSimConfig
    name = "emu_world_sim"

    def __init__(self, config: EmuSimConfig):
        import envs

        super().__init__(config)
        self.config = config
        self.kind = embodiment(config.task)
        env_cls = envs.task_spec(config.task).env_cls()
        self.action_names, self.state_names = tuple(env_cls.action_names), tuple(env_cls.state_names)
        self.fps = float(env_cls.control_hz)
        self._cameras = tuple(config.camera_names) or tuple(env_cls.default_cameras)
        unknown = [c for c in self._cameras if c not in env_cls.camera_names]
        if unknown:
            raise ValueError(f"robot=sim: task {config.task} has no camera {unknown}; choose from "
                             f"{list(env_cls.camera_names)}")
        self.realtime = config.realtime
        self.env = None
        self._obs: dict[str, Any] | None = None
        self._info: dict[str, Any] | None = None
        self.episode_over = False

    # -- LeRobot interface ---------------------------------------------------------------------
    @property
    def camera_names(self) -> tuple[str, ...]:
        return self._cameras

    @property
    def observation_features(self) -> dict[str, type | tuple]:
        size = int(self.config.image_size)
        return {**{n: float for n in self.state_names}, **{c: (size, size, 3) for c in self._cameras}}

    @property
    def is_connected(self) -> bool:
        return self.env is not None

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        """Nothing to calibrate in simulation."""

    def configure(self) -> None:
        """Nothing to configure in simulation."""

    def connect(self, calibrate: bool = True) -> None:
        """Build the task (rendering the observed cameras) and its safety layer; reset it with seed 0."""
        import envs

        steps = self.config.max_episode_steps or envs.task_spec(self.config.task).max_episode_steps
        self.env = envs.make(self.config.task, cameras=list(self._cameras), image_size=int(self.config.image_size),
                             max_episode_steps=int(steps))
        u = self.env.unwrapped
        if self.kind == "aloha":  # the left arm's MJCF limits (both arms are alike)
            from envs.aloha import ARM_JOINTS

            ranges = np.array([u.model.joint(f"vx300s_left/{j}").range for j in ARM_JOINTS], dtype=np.float64)
            space, kinematics = aloha_command_space(ranges[:, 0], ranges[:, 1]), AlohaKinematics()
        else:
            from envs.widowx_pick_place import ARM_JOINTS

            ranges = np.array([u.model.joint(j).range for j in ARM_JOINTS], dtype=np.float64)
            kinematics = WidowXKinematics()
            space = widowx_command_space(ranges[:, 0], ranges[:, 1])
            self.actions = EndEffectorActions(kinematics, target=u.ee_target)
        self.safety = SafetyLayer(space, self.config.safety, 1.0 / self.fps, kinematics)
        self.reset_episode(0)

    def disconnect(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    # -- episodes ------------------------------------------------------------------------------
    def reset_episode(self, seed: int | None = None) -> None:
        """Reset the task (seeded), forget the last command."""
        super().reset_episode(seed)
        self._obs, self._info = self.env.reset(seed=seed)
        self.episode_over = False

    def task_info(self) -> dict[str, Any] | None:
        return dict(self._info) if self._info is not None else None

    # -- hooks ---------------------------------------------------------------------------------
    def _measure(self) -> np.ndarray:
        u = self.env.unwrapped
        if self.kind == "aloha":
            return np.asarray(self._obs["agent_pos"], dtype=np.float64)
        return np.r_[u.arm_joints(), u.gripper_opening()]

    def _observe(self) -> dict[str, Any]:
        obs = {n: float(v) for n, v in zip(self.state_names, self._obs["agent_pos"])}
        obs.update({c: self._obs["pixels"][c] for c in self._cameras})
        return obs

    def _actuate(self, command: np.ndarray) -> None:
        action = self.actions.to_action(command).astype(np.float32)
        self._obs, _, terminated, truncated, self._info = self.env.step(action)
        self.episode_over = bool(terminated or truncated)
