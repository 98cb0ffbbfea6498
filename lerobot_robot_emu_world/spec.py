"""Typed contents of ``configs/robot/<robot>.yaml``: the arm's motors, joint limits and calibration.

An arm (:class:`ArmSpec`) is a list of joints in the order of the project's tasks (``envs/aloha.py`` /
``envs/widowx_pick_place.py``: waist, shoulder, elbow, forearm_roll, wrist_angle, wrist_rotate), each
driven by one Dynamixel (``ids[0]``) and, on the Interbotix arms' shoulder and elbow, a second "shadow"
servo that follows it through its Secondary_ID register, plus a gripper servo.

Units are the tasks': joint positions in radians (Interbotix convention: raw position ``zero_tick`` is
0 rad, 4096 ticks per turn), the gripper normalised 0 (closed) .. 1 (open), linear in the gripper
servo's angle between ``gripper.closed`` and ``gripper.opened`` (radians).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TICKS_PER_TURN = 4096


@dataclass
class JointSpec:
    """One arm joint: its servo ids (the first drives, the others shadow it), model and limits (rad)."""

    name: str
    ids: list[int]
    model: str
    lower: float
    upper: float

    def __post_init__(self) -> None:
        if not self.ids or len(set(self.ids)) != len(self.ids) or not all(0 < i < 253 for i in self.ids):
            raise ValueError(f"joint {self.name}: ids must be distinct Dynamixel ids in 1..252, got {self.ids}")
        if not -math.pi - 1e-3 <= self.lower < self.upper <= math.pi + 1e-3:
            raise ValueError(f"joint {self.name}: limits must satisfy -pi <= lower < upper <= pi (rad), got "
                             f"[{self.lower}, {self.upper}]")


@dataclass
class GripperSpec:
    """The gripper servo: id, model, the servo angles (rad) of the closed (0) and open (1) gripper, and
    the current limit of its current-based position mode (Dynamixel units; None: leave as is)."""

    id: int
    model: str
    closed: float
    opened: float
    current_limit: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.id < 253:
            raise ValueError(f"gripper: id must be a Dynamixel id in 1..252, got {self.id}")
        if abs(self.opened - self.closed) < 1e-3:
            raise ValueError(f"gripper: opened ({self.opened}) and closed ({self.closed}) angles must differ")

    def normalise(self, angle: float) -> float:
        return (angle - self.closed) / (self.opened - self.closed)

    def angle(self, normalised: float) -> float:
        return self.closed + normalised * (self.opened - self.closed)


@dataclass
class ArmSpec:
    """One arm on one Dynamixel bus (``arm:`` in the robot YAML)."""

    joints: list[JointSpec]
    gripper: GripperSpec
    zero_tick: int = 2048  # raw position of 0 rad (Interbotix factory convention)
    homing_offsets: dict[str, int] = field(default_factory=dict)  # per motor name; default 0
    profile_velocity: int | None = None  # Dynamixel Profile_Velocity of the arm joints (None: leave as is)

    def __post_init__(self) -> None:
        ids = [i for j in self.joints for i in j.ids] + [self.gripper.id]
        if len(set(ids)) != len(ids):
            raise ValueError(f"arm: motor ids must be unique on the bus, got {ids}")
        unknown = sorted(set(self.homing_offsets) - set(self.motor_names()))
        if unknown:
            raise ValueError(f"arm.homing_offsets: unknown motors {unknown}; motors: {self.motor_names()}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], expected_joints: tuple[str, ...]) -> ArmSpec:
        data = dict(data)
        joints = [JointSpec(**j) for j in data.pop("joints")]
        names = tuple(j.name for j in joints)
        if names != tuple(expected_joints):
            raise ValueError(f"arm.joints must list {list(expected_joints)} in this order (the task's action order), "
                             f"got {list(names)}")
        return cls(joints=joints, gripper=GripperSpec(**data.pop("gripper")), **data)

    # -- motors --------------------------------------------------------------------------------
    def motors(self) -> dict[str, tuple[int, str]]:
        """Bus motor name -> (id, model): joints, their shadows (``<joint>_shadow``, ``_shadow2``, ...), gripper."""
        out: dict[str, tuple[int, str]] = {}
        for j in self.joints:
            for k, motor_id in enumerate(j.ids):
                out[j.name if k == 0 else f"{j.name}_shadow{'' if k == 1 else k}"] = (motor_id, j.model)
        out["gripper"] = (self.gripper.id, self.gripper.model)
        return out

    def motor_names(self) -> list[str]:
        return list(self.motors())

    def shadows(self) -> dict[str, str]:
        """Shadow motor name -> the joint (primary motor) it follows."""
        return {m: m.split("_shadow")[0] for m in self.motors() if "_shadow" in m}

    @property
    def lower(self) -> np.ndarray:
        return np.array([j.lower for j in self.joints])

    @property
    def upper(self) -> np.ndarray:
        return np.array([j.upper for j in self.joints])

    # -- units ---------------------------------------------------------------------------------
    def to_radians(self, ticks: float) -> float:
        return (ticks - self.zero_tick) * 2 * math.pi / TICKS_PER_TURN

    def to_ticks(self, radians: float) -> int:
        return round(self.zero_tick + radians * TICKS_PER_TURN / (2 * math.pi))

    def position_limits(self, motor: str) -> tuple[int, int]:
        """Min/Max_Position_Limit registers (raw ticks) of a motor: the joint limits for the driving
        servos, the gripper's angle range, the full turn for shadows (they follow their joint)."""
        if motor == "gripper":
            a, b = sorted((self.gripper.closed, self.gripper.opened))
            return self.to_ticks(a), self.to_ticks(b)
        joint = next((j for j in self.joints if j.name == motor), None)
        if joint is None:
            return 0, TICKS_PER_TURN - 1
        return max(0, self.to_ticks(joint.lower)), min(TICKS_PER_TURN - 1, self.to_ticks(joint.upper))
