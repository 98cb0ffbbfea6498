"""The real arms: ``emu_world_aloha`` (two ViperX 300 6DOF followers) and ``emu_world_widowx`` (a WidowX
250 6DOF), each arm a :class:`DynamixelArm` on its own serial port, cameras from LeRobot's camera classes.

ALOHA takes the ``aloha_*`` tasks' 14-D joint targets as they are; the WidowX takes the ``widowx_*`` tasks'
7-D end-effector deltas and solves them to joints with the project's IK (:class:`WidowXKinematics`), applied
to the commanded tool pose it keeps (the measured pose at connect and at each episode start). Both filter
every command through the safety layer (joint limits from the YAML, which are the MJCF's, forward
kinematics for the workspace box from the project's MuJoCo models).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
from lerobot.cameras.utils import make_cameras_from_configs

from emu_world.safety import CommandSpace, SafetyLayer
from lerobot_robot_emu_world.base import (
    EndEffectorActions,
    RobotNotConnectedError,
    SafeRobot,
    aloha_command_space,
    widowx_command_space,
)
from lerobot_robot_emu_world.config import (
    EmuAlohaConfig,
    EmuWidowXConfig,
    HardwareSettings,
)
from lerobot_robot_emu_world.dynamixel_arm import DynamixelArm
from lerobot_robot_emu_world.kinematics import AlohaKinematics, WidowXKinematics


class DynamixelRobot(SafeRobot):
    """Arms on Dynamixel buses plus cameras; subclasses say which arms and how commands split over them."""

    arm_names: tuple[str, ...]

    def __init__(self, config: EmuAlohaConfig | EmuWidowXConfig):
        super().__init__(config)
        self.config = config
        self.settings: HardwareSettings = config.settings
        self.fps = self.settings.fps
        single = self.arm_names == ("arm",)
        self.arms = {a: DynamixelArm(a, self.settings.ports[a], self.settings.arm, "port" if single else f"port_{a}",
                                     f"robot={self.settings.type}") for a in self.arm_names}
        self.cameras = make_cameras_from_configs(config.cameras)

    # -- hooks of subclasses -----------------------------------------------------------------------
    def _command_space(self) -> CommandSpace:
        raise NotImplementedError

    def _kinematics(self):
        raise NotImplementedError

    def _state(self, measured: np.ndarray) -> np.ndarray:
        """``observation.state`` from the measured command-space joints."""
        return measured

    # -- LeRobot interface ---------------------------------------------------------------------
    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(self.cameras)

    @cached_property
    def observation_features(self) -> dict[str, type | tuple]:
        cams = {c: (self.config.cameras[c].height, self.config.cameras[c].width, 3) for c in self.cameras}
        return {**{n: float for n in self.state_names}, **cams}

    @property
    def is_connected(self) -> bool:
        return all(a.is_connected for a in self.arms.values()) and all(c.is_connected for c in self.cameras.values())

    @property
    def is_calibrated(self) -> bool:
        return all(a.is_calibrated for a in self.arms.values())

    def connect(self, calibrate: bool = True) -> None:
        """Open every arm's port (a missing one is refused, naming its setting), check or write the
        calibration, configure the servos, connect the cameras, build the safety layer."""
        try:
            for arm in self.arms.values():
                arm.connect()
            if not self.is_calibrated:
                if not calibrate:
                    raise RobotNotConnectedError(
                        f"robot={self.settings.type}: the servos do not hold the calibration of "
                        f"{self.config.config_file} (homing offsets, position limits, drive modes); write it with "
                        f"`lerobot-calibrate --robot.type={self.name}`")
                self.calibrate()
            self.configure()
            for cam in self.cameras.values():
                cam.connect()
        except BaseException:
            self.disconnect()
            raise
        self.safety = SafetyLayer(self._command_space(), self.settings.safety, 1.0 / self.fps, self._kinematics())
        self.reset_episode()

    def calibrate(self) -> None:
        """Write the YAML's calibration to every arm (torque off) and save LeRobot's calibration file."""
        self.calibration = {}
        for label, arm in self.arms.items():
            for motor, cal in arm.calibrate().items():
                self.calibration[motor if label == "arm" else f"{label}_{motor}"] = cal
        self._save_calibration()

    def configure(self) -> None:
        for arm in self.arms.values():
            arm.configure()

    def disconnect(self) -> None:
        """Close the ports (torque stays on unless the YAML says otherwise: the arms would fall) and cameras."""
        for arm in self.arms.values():
            arm.disconnect(self.settings.disable_torque_on_disconnect)
        for cam in self.cameras.values():
            if cam.is_connected:
                cam.disconnect()

    # -- hooks ---------------------------------------------------------------------------------
    def _measure(self) -> np.ndarray:
        return np.concatenate([self.arms[a].read() for a in self.arm_names])

    def _observe(self) -> dict[str, Any]:
        obs: dict[str, Any] = dict(zip(self.state_names, self._state(self._measure()).tolist()))
        for name, cam in self.cameras.items():
            obs[name] = cam.read_latest()
        return obs

    def _actuate(self, command: np.ndarray) -> None:
        for i, arm in enumerate(self.arm_names):
            self.arms[arm].write(command[7 * i: 7 * i + 7])


class EmuAloha(DynamixelRobot):
    """Bimanual ALOHA: 14-D joint targets ``[left 6 joints (rad), left gripper (0..1), right ...]``."""

    config_class = EmuAlohaConfig
    name = "emu_world_aloha"
    arm_names = ("left", "right")

    def __init__(self, config: EmuAlohaConfig):
        from envs.aloha import ACTION_NAMES

        self.action_names = self.state_names = tuple(ACTION_NAMES)
        super().__init__(config)

    def _command_space(self) -> CommandSpace:
        return aloha_command_space(self.settings.arm.lower, self.settings.arm.upper)

    def _kinematics(self) -> AlohaKinematics:
        return AlohaKinematics()


class EmuWidowX(DynamixelRobot):
    """WidowX 250: ``[dx, dy, dz, droll, dpitch, dyaw, gripper]`` actions; observation.state is the tool pose
    ``[x, y, z, roll, pitch, yaw, gripper]`` (forward kinematics of the measured joints), as in the tasks."""

    config_class = EmuWidowXConfig
    name = "emu_world_widowx"
    arm_names = ("arm",)

    def __init__(self, config: EmuWidowXConfig):
        from envs.widowx_pick_place import WidowXPickPlaceEnv

        self.action_names = tuple(WidowXPickPlaceEnv.action_names)
        self.state_names = tuple(WidowXPickPlaceEnv.state_names)
        super().__init__(config)
        self.kinematics: WidowXKinematics | None = None

    def _command_space(self) -> CommandSpace:
        return widowx_command_space(self.settings.arm.lower, self.settings.arm.upper)

    def _kinematics(self) -> WidowXKinematics:
        if self.kinematics is None:
            self.kinematics = WidowXKinematics()
            self.actions = EndEffectorActions(self.kinematics)
        return self.kinematics

    def _state(self, measured: np.ndarray) -> np.ndarray:
        return self._kinematics().state(measured[:6], measured[6])

    def reset_episode(self, seed: int | None = None) -> None:
        """The commanded tool pose restarts from the measured one."""
        super().reset_episode(seed)
        self._kinematics()
        self.actions.start(self._measure())
