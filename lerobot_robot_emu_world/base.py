"""What every emu-world robot shares: action -> joint command -> safety layer -> actuators.

:class:`SafeRobot` is a LeRobot ``Robot`` whose ``send_action`` never writes anything the safety layer
(:class:`emu_world.safety.SafetyLayer`) has not returned, whichever loop calls it (``python -m
emu_world.rollout``, ``lerobot-record``). Backends implement five hooks: build the safety layer at
connect, measure the joints, observe (state + cameras), actuate a safe joint command, and say which
action model they use (:class:`JointActions`: the action *is* the joint command, ALOHA;
:class:`EndEffectorActions`: a WidowX end-effector delta turned into joints by the project's IK).
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from lerobot.robots.robot import Robot

from emu_world.safety import (
    CommandSpace,
    Intervention,
    RobotState,
    SafetyLayer,
    monotonic,
)
from lerobot_robot_emu_world.kinematics import WidowXKinematics

log = logging.getLogger(__name__)


class RobotNotConnectedError(ConnectionError):
    """The robot cannot be reached (no serial port, no answer); the message names the setting to fix."""

    user_fixable = True  # emu_world.errors.reports_user_errors prints it on one line


@dataclass
class SafeCommand:
    """A command as the safety layer let it through: joints (command space), the action it amounts to in
    the agent's space, and the interventions that shaped it."""

    command: np.ndarray
    action: np.ndarray
    interventions: list[Intervention] = field(default_factory=list)


class JointActions:
    """The action is the joint command (ALOHA: 14-D joint targets in the ``aloha_*`` tasks' order)."""

    def to_command(self, action: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, list[str]]:
        return np.asarray(action, dtype=np.float64), []

    def to_action(self, command: np.ndarray) -> np.ndarray:
        return np.asarray(command, dtype=np.float64)

    def sent(self, command: np.ndarray) -> None:
        pass


class EndEffectorActions:
    """The ``widowx_*`` tasks' action ``[dx, dy, dz, droll, dpitch, dyaw, gripper]``, applied to the commanded
    tool pose and solved to joints with the project's IK (:class:`WidowXKinematics`). The commanded pose is
    ``target()`` when the simulator keeps it, else tracked here (the pose of the last command sent)."""

    def __init__(self, kinematics: WidowXKinematics, target: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None):
        self.kinematics, self._source = kinematics, target
        self._pose: tuple[np.ndarray, np.ndarray] | None = None

    def start(self, joints: np.ndarray) -> None:
        """Commanded pose = the measured one (connect, after a reset)."""
        self._pose = self.kinematics.pose(joints[:6])

    def target(self) -> tuple[np.ndarray, np.ndarray]:
        if self._source is not None:
            return self._source()
        if self._pose is None:
            raise RuntimeError("EndEffectorActions.start(joints) must run before the first action")
        return self._pose

    def to_command(self, action: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Joints (6) + gripper for the action; ``reference`` (command space) seeds the IK. Notes say what
        was clipped to the action bounds (the task's per-tick limit of the end effector)."""
        a = np.asarray(action, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            return np.full(7, np.nan), []
        k = self.kinematics
        bounded = np.clip(a, k.action_low, k.action_high)
        notes = [f"{n} {a[i]:.4f}->{bounded[i]:.4f}" for i, n in enumerate(ACTION_NAMES_EE)
                 if abs(bounded[i] - a[i]) > 1e-9]
        pos, rot = self.target()
        q = k.joints_for_delta(bounded[:6], pos, rot, q_init=reference[:6])
        return np.r_[q, bounded[6]], notes

    def to_action(self, command: np.ndarray) -> np.ndarray:
        pos, rot = self.target()
        return np.r_[self.kinematics.delta_for_joints(command[:6], pos, rot), command[6]]

    def sent(self, command: np.ndarray) -> None:
        if self._source is None:
            self._pose = self.kinematics.pose(command[:6])


ACTION_NAMES_EE = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")


class SafeRobot(Robot, abc.ABC):
    """A LeRobot robot whose every command passes the safety layer (see the module docstring).

    Subclasses set ``action_names`` (the agent's action, LeRobot action keys), ``state_names``
    (``observation.state``), ``fps``, and implement the hooks below. ``clock`` is the time source of the
    safety layer (tests inject theirs). ``realtime``: a run paces its control ticks at ``fps``."""

    action_names: tuple[str, ...]
    state_names: tuple[str, ...]
    fps: float
    realtime: bool = True
    episode_over: bool = False  # the simulator ended the episode (terminated or truncated)

    def __init__(self, config):
        super().__init__(config)
        self.clock: Callable[[], float] = monotonic
        self.safety: SafetyLayer | None = None
        self.actions: JointActions | EndEffectorActions = JointActions()
        self.commands_sent = 0
        self.last_command: np.ndarray | None = None
        self.observed_at: float | None = None

    # -- hooks ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def _measure(self) -> np.ndarray:
        """Measured joints in command space (arm joints rad, grippers normalised)."""

    @abc.abstractmethod
    def _observe(self) -> dict[str, Any]:
        """The LeRobot observation: ``state_names`` floats and camera images."""

    @abc.abstractmethod
    def _actuate(self, command: np.ndarray) -> None:
        """Write a safe joint command to the actuators."""

    @property
    @abc.abstractmethod
    def camera_names(self) -> tuple[str, ...]:
        """The observed cameras (keys of their images in the observation)."""

    # -- LeRobot interface ---------------------------------------------------------------------
    @property
    def action_features(self) -> dict[str, type]:
        return {name: float for name in self.action_names}

    def get_observation(self) -> dict[str, Any]:
        self._require_connected()
        obs = self._observe()
        self.observed_at = self.clock()
        return obs

    def send_action(self, action: dict[str, Any] | np.ndarray) -> dict[str, float]:
        """Filter ``action`` through the safety layer and send what it returns; returns the action sent."""
        planned = self.plan_action(action)
        self.write(planned.command)
        return dict(zip(self.action_names, planned.action.tolist()))

    # -- the safe path -------------------------------------------------------------------------
    def plan_action(self, action: dict[str, Any] | np.ndarray, observed_at: float | None = None) -> SafeCommand:
        """What :meth:`send_action` would send for ``action``, nothing sent (a dry run's view).
        ``observed_at``: when the observation the action was computed from was taken (default: the last
        :meth:`get_observation`); the safety layer holds an action computed from a too-old observation."""
        self._require_connected()
        a = self.action_array(action)
        measured = self._measure()
        reference = self.last_command if self.last_command is not None else measured
        command, notes = self.actions.to_command(a, reference)
        now = self.clock()
        early = [Intervention("action_bounds", f"end-effector action beyond its bounds: {', '.join(notes)}", now)
                 ] if notes else []
        self.safety.record(early)
        observed = observed_at if observed_at is not None else self.observed_at
        observed = observed if observed is not None else now
        safe, found = self.safety.filter(command, RobotState(measured, observed, self.last_command), now)
        return SafeCommand(safe, self.actions.to_action(safe), early + found)

    def plan_hold(self) -> SafeCommand:
        """The hold the safety layer gives when no command came in time (the watchdog), nothing sent."""
        self._require_connected()
        measured = self._measure()
        observed = self.observed_at if self.observed_at is not None else self.clock()
        safe, found = self.safety.filter(None, RobotState(measured, observed, self.last_command), self.clock())
        return SafeCommand(safe, self.actions.to_action(safe), found)

    def write(self, command: np.ndarray) -> None:
        """Send a command the safety layer returned (only those: :meth:`send_action`, :meth:`plan_hold`)."""
        self._actuate(command)
        self.actions.sent(command)
        self.last_command = np.array(command, dtype=np.float64)
        self.commands_sent += 1

    def emergency_stop(self, reason: str, hold: bool = True) -> None:
        """Latch the stop, hold position (one last command; not in a dry run, which moves nothing) and
        disconnect."""
        if self.safety is not None:
            self.safety.trip(reason)
        if self.is_connected:
            try:
                if hold and self.safety is not None:
                    self.write(self.plan_hold().command)
            finally:
                self.disconnect()

    def action_array(self, action: dict[str, Any] | np.ndarray) -> np.ndarray:
        """The action as a float vector in ``action_names`` order; a wrong shape or missing key is refused."""
        if isinstance(action, dict):
            missing = [n for n in self.action_names if n not in action]
            if missing:
                raise ValueError(f"{self.name}: action lacks {missing}; expected keys {list(self.action_names)}")
            return np.array([float(action[n]) for n in self.action_names])
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (len(self.action_names),):
            raise ValueError(f"{self.name}: action has shape {a.shape}, expected ({len(self.action_names)},) "
                             f"({', '.join(self.action_names)})")
        return a

    def _require_connected(self) -> None:
        if not self.is_connected or self.safety is None:
            from lerobot.utils.errors import DeviceNotConnectedError

            raise DeviceNotConnectedError(f"{self} is not connected: call connect() first")

    def reset_episode(self, seed: int | None = None) -> None:
        """Start an episode. Hardware: nothing to do (a person resets the scene); the simulator resets."""
        self.last_command = None

    def task_info(self) -> dict[str, Any] | None:
        """The task's info (``is_success``, ``subtask_progress``, ...) where it can be measured (simulator)."""
        return None


def aloha_command_space(lower: np.ndarray, upper: np.ndarray) -> CommandSpace:
    """ALOHA's 14-D command (the ``aloha_*`` tasks' action): per arm 6 joints (limits ``lower``/``upper``, rad,
    the same for both arms) then the gripper (0..1)."""
    from envs.aloha import ACTION_NAMES

    lo = np.r_[lower, 0.0, lower, 0.0].astype(np.float64)
    hi = np.r_[upper, 1.0, upper, 1.0].astype(np.float64)
    return CommandSpace(tuple(ACTION_NAMES), lo, hi, grippers=(6, 13),
                        arms={"left": tuple(range(6)), "right": tuple(range(7, 13))})


def widowx_command_space(lower: np.ndarray, upper: np.ndarray) -> CommandSpace:
    """The WidowX's 7-D joint command: 6 joints (rad) in the task's order, then the gripper (0..1)."""
    from envs.widowx_pick_place import ARM_JOINTS

    return CommandSpace((*ARM_JOINTS, "gripper"), np.r_[lower, 0.0].astype(np.float64),
                        np.r_[upper, 1.0].astype(np.float64), grippers=(6,), arms={"arm": tuple(range(6))})
