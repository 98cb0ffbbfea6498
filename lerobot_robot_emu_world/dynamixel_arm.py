"""One Interbotix arm (ViperX 300 / WidowX 250 6DOF) on one Dynamixel bus, through LeRobot's
``DynamixelMotorsBus``, in the tasks' units (joints in radians, gripper normalised 0 closed .. 1 open).

Positions are read and written raw (``normalize=False``) and converted with the arm's spec
(:class:`ArmSpec`: 0 rad at ``zero_tick``, 4096 ticks per turn), so the numbers are the Interbotix SDK's
joint angles, the same as the MuJoCo models'. Shoulder and elbow have a shadow servo that follows its
joint's goal through the Secondary_ID register; goals go to the driving servos and the gripper only.
Calibration (homing offsets, position-limit registers, shadows' reversed drive mode) comes from the YAML
and is written to the servos' EEPROM by :meth:`DynamixelArm.calibrate`; the limit registers make the
servos refuse positions outside the joint limits too (position mode), below the safety layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lerobot_robot_emu_world.base import RobotNotConnectedError
from lerobot_robot_emu_world.spec import ArmSpec

POSITION_MODE = 3  # Dynamixel Operating_Mode: position control within the limit registers
CURRENT_POSITION_MODE = 5  # current-based position control: the gripper squeezes with bounded force


class DynamixelArm:
    """One arm: ``label`` names it in messages, ``setting`` is the config key of its port."""

    def __init__(self, label: str, port: str, spec: ArmSpec, setting: str, robot: str):
        try:
            from lerobot.motors import Motor, MotorNormMode
            from lerobot.motors.dynamixel import DynamixelMotorsBus
        except ImportError as e:  # dynamixel-sdk is lerobot's "dynamixel" extra
            raise ImportError(f"{robot} needs the Dynamixel SDK: pip install 'lerobot[dynamixel]' ({e})") from e
        self.label, self.port, self.spec, self.setting, self.robot = label, port, spec, setting, robot
        self.joint_motors = [j.name for j in spec.joints]
        motors = {name: Motor(motor_id, model, MotorNormMode.DEGREES)
                  for name, (motor_id, model) in spec.motors().items()}
        self.bus = DynamixelMotorsBus(port=port, motors=motors, calibration=self.expected_calibration())

    # -- connection ----------------------------------------------------------------------------
    @property
    def is_connected(self) -> bool:
        return self.bus.is_connected

    def connect(self) -> None:
        """Open the port and ping every servo; a missing port or a silent servo is refused with the fix."""
        arm = "arm" if self.label == "arm" else f"{self.label} arm"
        where = f"{self.robot}: the {arm}'s serial port {self.port}"
        if not Path(self.port).exists():
            raise RobotNotConnectedError(
                f"{where} does not exist (no robot connected?). Plug in the arm's U2D2 and set "
                f"robot.{self.setting}=<port> (lerobot: --robot.{self.setting}=<port>; `lerobot-find-port` "
                f"lists ports), or rehearse without hardware with robot=sim")
        try:
            self.bus.connect()
        except (ConnectionError, RuntimeError) as e:
            if self.bus.is_connected:
                self.bus.port_handler.closePort()
            raise RobotNotConnectedError(
                f"{where} opened, but the servos did not answer as configs/robot expects (ids and models): "
                f"{str(e).strip()}. Check the arm's power and robot.{self.setting}") from e

    def disconnect(self, disable_torque: bool) -> None:
        if self.bus.is_connected:
            self.bus.disconnect(disable_torque)

    # -- calibration and configuration --------------------------------------------------------
    def expected_calibration(self) -> dict:
        """The calibration the servos must hold (LeRobot's ``MotorCalibration`` per motor)."""
        from lerobot.motors import MotorCalibration

        shadows = self.spec.shadows()
        return {name: MotorCalibration(id=motor_id, drive_mode=int(name in shadows),
                                       homing_offset=int(self.spec.homing_offsets.get(name, 0)),
                                       range_min=self.spec.position_limits(name)[0],
                                       range_max=self.spec.position_limits(name)[1])
                for name, (motor_id, _) in self.spec.motors().items()}

    @property
    def is_calibrated(self) -> bool:
        return self.bus.is_calibrated

    def calibrate(self) -> dict:
        """Write the YAML's calibration to the servos' EEPROM (torque off); returns it."""
        calibration = self.expected_calibration()
        self.bus.disable_torque()
        for name, cal in calibration.items():
            self.bus.write("Drive_Mode", name, cal.drive_mode)
        self.bus.write_calibration(calibration)
        return calibration

    def configure(self) -> None:
        """Operating modes, shadows following their joints, gripper current limit, joint speed; torque on."""
        with self.bus.torque_disabled():
            self.bus.configure_motors()
            for name in self.spec.motors():
                mode = CURRENT_POSITION_MODE if name == "gripper" else POSITION_MODE
                self.bus.write("Operating_Mode", name, mode)
            for shadow, joint in self.spec.shadows().items():
                self.bus.write("Secondary_ID", shadow, self.bus.motors[joint].id)
            if self.spec.gripper.current_limit is not None:
                self.bus.write("Current_Limit", "gripper", self.spec.gripper.current_limit)
            if self.spec.profile_velocity is not None:
                for name in self.joint_motors:
                    self.bus.write("Profile_Velocity", name, self.spec.profile_velocity)

    # -- motion --------------------------------------------------------------------------------
    def read(self) -> np.ndarray:
        """Measured joints (6, rad) and gripper (normalised): (7,)."""
        raw = self.bus.sync_read("Present_Position", [*self.joint_motors, "gripper"], normalize=False)
        joints = [self.spec.to_radians(raw[m]) for m in self.joint_motors]
        return np.array([*joints, self.spec.gripper.normalise(self.spec.to_radians(raw["gripper"]))])

    def write(self, command: np.ndarray) -> None:
        """Goal positions for joints (6, rad) and gripper (normalised): a command the safety layer returned."""
        goals = {m: self.spec.to_ticks(float(q)) for m, q in zip(self.joint_motors, command[:6])}
        goals["gripper"] = self.spec.to_ticks(self.spec.gripper.angle(float(command[6])))
        self.bus.sync_write("Goal_Position", goals, normalize=False)
