"""The safety layer: every command of every robot backend passes through it before an actuator sees it.

Contract: :meth:`SafetyLayer.filter` ``(command, state, now) -> (safe_command, interventions)``.

- ``command`` is a joint-space target in the robot's *command space* (:class:`CommandSpace`: arm joints
  in radians, grippers normalised 0 closed .. 1 open), or ``None`` when the agent produced nothing in
  time. End-effector robots (WidowX) convert their action to joints with the project's IK first.
- ``state`` (:class:`RobotState`) is what the robot measured: joint positions in the same space, the
  clock time of the observation the command was computed from, and the last command the actuators got.
- ``now`` is the clock time the command is about to be sent (seconds, any monotonic clock).

The safe command is always finite, inside the joint and gripper limits, at most one step per control
tick from the last command (and, optionally, within a tracking distance of the measured position),
with every arm's tool centre point inside the workspace box. When the command is missing (the agent
missed its deadline), stale (computed from an observation older than the deadline), non-finite, arrives
sooner than the minimum interval after the previous one, or comes after an emergency stop, the layer
*holds*: it returns the last command sent (or the measured position clipped into the limits before any
command). Each correction is an :class:`Intervention`, logged and counted by kind.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

log = logging.getLogger("emu_world.safety")

# Intervention kinds, in the order the checks run.
# ``action_bounds``: an end-effector action beyond its per-tick bounds, clipped before IK (WidowX).
KINDS = ("estop", "watchdog", "non_finite", "rate", "action_bounds", "joint_limit", "gripper_limit", "joint_step",
         "tracking", "workspace")


@dataclass
class SafetyConfig:
    """Limits of one robot (``safety:`` in ``configs/robot/<robot>.yaml``); joint limits come from the arm."""

    max_joint_step: float  # rad per control tick, arm joints, from the last command sent
    max_gripper_step: float = 1.0  # normalised gripper change per control tick
    # rad, |command - measured| for arm joints (None: not checked); where it binds, a goal may move back
    # towards the measured position by more than one step (the arm is blocked: push less)
    max_tracking_error: float | None = None
    joint_margin: float = 0.0  # rad kept clear of each arm joint's limits
    workspace_low: list[float] | None = None  # (3,) m, tool centre point box, the kinematic model's frame
    workspace_high: list[float] | None = None
    deadline: float | None = None  # s from observation to command (None: one control period)
    estop_after_missed: int = 50  # consecutive missed deadlines that trip the emergency stop (0: never)
    min_command_interval: float = 0.0  # s; commands sooner than this after the previous one are held
    estop_key: str = " "  # the key that trips the emergency stop in a terminal (besides Ctrl-C / SIGTERM)

    def __post_init__(self) -> None:
        if not np.isfinite(self.max_joint_step) or self.max_joint_step <= 0:
            raise ValueError(f"safety.max_joint_step must be a positive number of radians, got {self.max_joint_step}")
        if not 0 < self.max_gripper_step <= 1:
            raise ValueError(f"safety.max_gripper_step must be in (0, 1] (normalised), got {self.max_gripper_step}")
        if self.max_tracking_error is not None and self.max_tracking_error <= 0:
            raise ValueError(f"safety.max_tracking_error must be positive or null, got {self.max_tracking_error}")
        if self.joint_margin < 0:
            raise ValueError(f"safety.joint_margin must be >= 0, got {self.joint_margin}")
        if (self.workspace_low is None) != (self.workspace_high is None):
            raise ValueError("safety.workspace_low and safety.workspace_high go together: set both or neither")
        if self.workspace_low is not None:
            low, high = np.asarray(self.workspace_low, float), np.asarray(self.workspace_high, float)
            if low.shape != (3,) or high.shape != (3,) or not np.all(low < high):
                raise ValueError(f"safety.workspace_low/high must be 3 numbers each with low < high, got "
                                 f"{self.workspace_low} / {self.workspace_high}")
        if self.deadline is not None and self.deadline <= 0:
            raise ValueError(f"safety.deadline must be positive seconds or null (one control period), got {self.deadline}")
        if self.estop_after_missed < 0 or self.min_command_interval < 0:
            raise ValueError("safety.estop_after_missed and safety.min_command_interval must be >= 0")
        if len(self.estop_key) != 1:
            raise ValueError(f"safety.estop_key must be one character, got {self.estop_key!r}")


@dataclass(frozen=True)
class CommandSpace:
    """The joint-space command a robot sends: names, limits, which entries are grippers (normalised
    0..1) and which are the joints of each arm (in kinematic order, for the workspace check)."""

    names: tuple[str, ...]
    lower: np.ndarray
    upper: np.ndarray
    grippers: tuple[int, ...]
    arms: dict[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        n = len(self.names)
        if np.shape(self.lower) != (n,) or np.shape(self.upper) != (n,) or not np.all(self.lower < self.upper):
            raise ValueError(f"command space: limits must be ({n},) with lower < upper")
        joints = [i for idx in self.arms.values() for i in idx]
        if sorted(joints + list(self.grippers)) != list(range(n)):
            raise ValueError("command space: every entry must be exactly one arm joint or one gripper")

    @property
    def joints(self) -> np.ndarray:
        """Indices of the arm joints (everything but the grippers)."""
        return np.array(sorted(i for idx in self.arms.values() for i in idx), dtype=int)


class Kinematics(Protocol):
    """Forward kinematics of the robot: an arm's tool centre point (3,) in metres for its joints."""

    def tcp_position(self, arm: str, joints: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class RobotState:
    """What the safety layer knows of the robot when it filters a command."""

    positions: np.ndarray  # measured, command space
    observed_at: float  # clock time of the observation the command was computed from
    last_command: np.ndarray | None = None  # the last command the actuators received (None: none yet)


@dataclass(frozen=True)
class Intervention:
    """One correction of a command: its kind (:data:`KINDS`), what was wrong, when."""

    kind: str
    detail: str
    time: float

    def to_dict(self) -> dict:
        return {"kind": self.kind, "detail": self.detail, "time": round(self.time, 4)}


class SafetyLayer:
    """Filters joint commands (see the module docstring). One per connected robot; it keeps the
    intervention counts and log of the run, and the emergency-stop latch."""

    def __init__(self, space: CommandSpace, config: SafetyConfig, period: float,
                 kinematics: Kinematics | None = None, max_log: int = 10_000):
        if period <= 0:
            raise ValueError(f"control period must be positive, got {period}")
        if config.workspace_low is not None and kinematics is None:
            raise ValueError("a workspace box needs the robot's kinematics (forward kinematics of each arm)")
        self.space, self.config, self.period, self.kinematics = space, config, float(period), kinematics
        self.deadline = float(config.deadline) if config.deadline is not None else self.period
        self.counts: Counter[str] = Counter()
        self.log: list[Intervention] = []
        self.max_log = max_log
        self.stopped: str | None = None  # why the emergency stop tripped (None: not tripped)
        self._last_sent_at: float | None = None
        self._joint_lo = space.lower + config.joint_margin
        self._joint_hi = space.upper - config.joint_margin
        self._joint_lo[list(space.grippers)] = space.lower[list(space.grippers)]
        self._joint_hi[list(space.grippers)] = space.upper[list(space.grippers)]
        if np.any(self._joint_lo >= self._joint_hi):
            raise ValueError(f"safety.joint_margin={config.joint_margin} leaves no range for some joints")

    # -- the contract ----------------------------------------------------------------------------
    def filter(self, command: np.ndarray | None, state: RobotState, now: float
               ) -> tuple[np.ndarray, list[Intervention]]:
        """The safe version of ``command`` for the robot in ``state`` at time ``now``, and what was corrected."""
        found: list[Intervention] = []
        held = self._hold_reason(command, state, now)
        if held is not None:
            found.append(Intervention(held[0], held[1], now))
            safe = self.hold_command(state)
        else:
            safe = self._limit(np.asarray(command, dtype=np.float64), state, now, found)
        self._last_sent_at = now
        self.record(found)
        return safe, found

    def trip(self, reason: str) -> None:
        """Latch the emergency stop: from now on every command is a hold."""
        if self.stopped is None:
            self.stopped = reason
            log.warning("EMERGENCY STOP: %s", reason)

    def hold_command(self, state: RobotState) -> np.ndarray:
        """Stay where the robot is: the last command sent, else the measured position inside the limits."""
        if state.last_command is not None:
            return np.array(state.last_command, dtype=np.float64)
        return np.clip(np.asarray(state.positions, dtype=np.float64), self._joint_lo, self._joint_hi)

    def report(self) -> dict:
        """Counts by kind (every kind listed, zeros included) and the emergency stop's reason."""
        return {"interventions": {k: int(self.counts.get(k, 0)) for k in KINDS},
                "interventions_total": int(sum(self.counts.values())), "emergency_stop": self.stopped}

    # -- the checks ------------------------------------------------------------------------------
    def _hold_reason(self, command, state: RobotState, now: float) -> tuple[str, str] | None:
        """Why the command must be replaced by a hold, or None."""
        if self.stopped is not None:
            return "estop", f"emergency stop ({self.stopped}): holding"
        if command is None:
            return "watchdog", f"no command within the {self.deadline:.3f} s deadline: holding"
        if now - state.observed_at > self.deadline:
            return "watchdog", (f"command computed from an observation {now - state.observed_at:.3f} s old "
                                f"(deadline {self.deadline:.3f} s): holding")
        a = np.asarray(command, dtype=np.float64)
        if a.shape != (len(self.space.names),):
            return "non_finite", f"command has shape {a.shape}, expected ({len(self.space.names)},): holding"
        bad = ~np.isfinite(a)
        if bad.any():
            return "non_finite", f"NaN/inf in {[self.space.names[i] for i in np.flatnonzero(bad)]}: holding"
        interval = self.config.min_command_interval
        if interval > 0 and self._last_sent_at is not None and now - self._last_sent_at < interval:
            return "rate", f"command {now - self._last_sent_at:.4f} s after the previous one (< {interval} s): holding"
        return None

    def _limit(self, a: np.ndarray, state: RobotState, now: float, found: list[Intervention]) -> np.ndarray:
        """Clip a finite command: limits, step from the last command, tracking, workspace."""
        sp, cfg = self.space, self.config
        grip = np.zeros(len(a), dtype=bool)
        grip[list(sp.grippers)] = True
        limited = np.clip(a, self._joint_lo, self._joint_hi)
        self._note(found, "joint_limit", a, limited, ~grip, now, "outside the joint limits")
        self._note(found, "gripper_limit", a, limited, grip, now, "outside the gripper range")
        ref = state.last_command if state.last_command is not None else self.hold_command(state)
        step = np.where(grip, cfg.max_gripper_step, cfg.max_joint_step)
        stepped = np.clip(limited, ref - step, ref + step)
        self._note(found, "joint_step", limited, stepped, ~grip, now, f"more than {cfg.max_joint_step} rad per tick")
        self._note(found, "gripper_limit", limited, stepped, grip, now, f"more than {cfg.max_gripper_step} per tick")
        out = stepped
        if cfg.max_tracking_error is not None:
            measured = np.asarray(state.positions, dtype=np.float64)
            err = cfg.max_tracking_error
            tracked = np.where(grip, stepped, np.clip(stepped, measured - err, measured + err))
            out = np.clip(tracked, self._joint_lo, self._joint_hi)
            self._note(found, "tracking", stepped, out, ~grip, now, f"more than {err} rad from the measured position")
        if cfg.workspace_low is not None:
            out = self._workspace(out, ref, now, found)
        return out

    def _workspace(self, cmd: np.ndarray, ref: np.ndarray, now: float, found: list[Intervention]) -> np.ndarray:
        """Keep every arm's tool centre point in the box: move only as far along ref -> cmd as stays inside
        (or, from outside the box, as does not go further out)."""
        out = cmd.copy()
        for arm, idx in self.space.arms.items():
            j = list(idx)
            start, goal = ref[j], cmd[j]
            if self._outside(arm, goal) <= max(self._outside(arm, start), 0.0):
                continue
            lo, hi = 0.0, 1.0  # largest acceptable fraction of the move, by bisection
            for _ in range(12):
                mid = (lo + hi) / 2
                if self._outside(arm, start + mid * (goal - start)) <= max(self._outside(arm, start), 0.0):
                    lo = mid
                else:
                    hi = mid
            out[j] = start + lo * (goal - start)
            tcp = self.kinematics.tcp_position(arm, goal)
            found.append(Intervention("workspace", f"{arm} tool centre point {np.round(tcp, 3).tolist()} outside "
                                                   f"the box; moved {lo:.0%} of the way", now))
        return out

    def _outside(self, arm: str, joints: np.ndarray) -> float:
        """Distance (m) of the arm's tool centre point outside the workspace box (0 inside)."""
        p = np.asarray(self.kinematics.tcp_position(arm, joints), dtype=np.float64)
        low, high = np.asarray(self.config.workspace_low), np.asarray(self.config.workspace_high)
        return float(np.linalg.norm(np.maximum(low - p, 0.0) + np.maximum(p - high, 0.0)))

    def _note(self, found: list[Intervention], kind: str, before: np.ndarray, after: np.ndarray, mask: np.ndarray,
              now: float, why: str) -> None:
        changed = np.flatnonzero(mask & (np.abs(after - before) > 1e-9))
        if changed.size:
            parts = [f"{self.space.names[i]} {before[i]:.4f}->{after[i]:.4f}" for i in changed]
            found.append(Intervention(kind, f"{why}: {', '.join(parts)}", now))

    def record(self, found: Sequence[Intervention]) -> None:
        """Count and log interventions (the layer's own, and a robot's corrections before it)."""
        for i in found:
            self.counts[i.kind] += 1
            if len(self.log) < self.max_log:
                self.log.append(i)
            log.debug("safety %s: %s", i.kind, i.detail)


@dataclass
class EmergencyStop:
    """The emergency stop of a run: tripped by a key in the terminal, SIGINT (Ctrl-C) or SIGTERM, or by
    the run itself (a frozen agent). The robot loop checks :attr:`tripped` every tick, holds position and
    disconnects. Use as a context manager around the run: it installs the signal handlers (main thread
    only) and the key watcher (a terminal on stdin only), and restores both on exit."""

    key: str = " "
    reason: str | None = None
    on_trip: list[Callable[[str], None]] = field(default_factory=list)

    @property
    def tripped(self) -> bool:
        return self.reason is not None

    def trip(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            for callback in self.on_trip:
                callback(reason)

    def __enter__(self) -> EmergencyStop:
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        self._watching = threading.Event()
        self._terminal = None
        if sys.stdin is not None and sys.stdin.isatty():
            self._start_key_watcher()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._watching.set()
        if self._terminal is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._terminal)

    def _on_signal(self, signum, frame) -> None:
        if self.tripped:  # a second Ctrl-C while the stop is under way: stop waiting for it
            raise KeyboardInterrupt
        self.trip(signal.Signals(signum).name)

    def _start_key_watcher(self) -> None:
        import termios
        import tty

        fd = sys.stdin.fileno()
        self._terminal = termios.tcgetattr(fd)
        tty.setcbreak(fd)

        def watch() -> None:
            while not self._watching.is_set():
                ready, _, _ = select.select([fd], [], [], 0.1)
                if ready and os.read(fd, 1).decode(errors="ignore") == self.key:
                    self.trip(f"key {self.key!r}")
                    return

        threading.Thread(target=watch, name="estop-key", daemon=True).start()


def monotonic() -> float:
    """The clock of real runs (tests inject their own)."""
    return time.monotonic()
