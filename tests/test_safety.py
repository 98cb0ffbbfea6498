"""The safety layer never lets an unsafe command through.

Unit checks of :class:`emu_world.safety.SafetyLayer`, then adversarial action streams through the whole
hardware path (agent -> safety layer -> simulated robot, :func:`emu_world.hardware.run_on_robot`) with a
spy on the robot's actuator hook that checks *every* command that reaches it: finite, inside the joint and
gripper limits, at most one step per tick from the previous command, tool centre points not leaving the
workspace box, and nothing but holds after an emergency stop. Time is a fake clock advanced by the run's
own pacing, so the streams are deterministic.
"""

from __future__ import annotations

import os
import pty
import signal
import sys
import threading
import time

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import envs
from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.hardware import run_on_robot
from emu_world.safety import KINDS, EmergencyStop, RobotState, SafetyConfig, SafetyLayer
from envs.aloha import START_ARM_JOINTS
from lerobot_robot_emu_world.base import aloha_command_space
from lerobot_robot_emu_world.kinematics import AlohaKinematics, WidowXKinematics
from lerobot_robot_emu_world.sim import EmuSim

ALOHA = "aloha_transfer_cube"
WIDOWX = "widowx_pick_place"
LOWER = np.array([-3.14158, -1.85005, -1.76278, -3.14158, -1.8675, -3.14158])
UPPER = np.array([3.14158, 1.25664, 1.6057, 3.14158, 2.23402, 3.14158])
START = np.r_[START_ARM_JOINTS, 0.1, START_ARM_JOINTS, 0.1]


@pytest.fixture(scope="module")
def aloha_kinematics() -> AlohaKinematics:
    return AlohaKinematics()


def layer(kinematics, **overrides) -> SafetyLayer:
    cfg = dict(max_joint_step=0.1, max_gripper_step=0.5, workspace_low=[-0.45, 0.15, 0.04],
               workspace_high=[0.45, 0.95, 0.55], estop_after_missed=5)
    cfg.update(overrides)
    return SafetyLayer(aloha_command_space(LOWER, UPPER), SafetyConfig(**cfg), 0.02, kinematics)


# -- the layer ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, needle", [
    (dict(max_joint_step=0.0), "max_joint_step"), (dict(max_gripper_step=2.0), "max_gripper_step"),
    (dict(workspace_low=[0, 0, 0]), "go together"), (dict(workspace_low=[1, 0, 0], workspace_high=[0, 1, 1]), "low < high"),
    (dict(deadline=-1.0), "deadline"), (dict(estop_key="ab"), "estop_key"), (dict(max_tracking_error=0.0), "tracking"),
])
def test_config_checks_name_the_setting(bad, needle):
    with pytest.raises(ValueError, match=needle):
        SafetyConfig(**{"max_joint_step": 0.1, **bad})


def test_each_check_corrects_and_counts(aloha_kinematics):
    s = layer(aloha_kinematics, min_command_interval=0.005)
    cases = [  # (command, observed_at, now, expected kinds)
        (np.full(14, np.nan), 10.0, 10.01, {"non_finite"}),
        (START + np.r_[np.inf, np.zeros(13)], 10.01, 10.02, {"non_finite"}),
        (None, 10.02, 10.03, {"watchdog"}),  # no action by the deadline
        (START, 10.0, 10.2, {"watchdog"}),  # computed from an observation 0.2 s old
        (START + 5.0, 10.3, 10.31, {"joint_limit", "gripper_limit", "joint_step"}),
        (START, 10.31, 10.312, {"rate"}),  # 2 ms after the previous command
    ]
    for command, observed_at, now, kinds in cases:
        safe, found = s.filter(command, RobotState(START, observed_at, START), now)
        assert {i.kind for i in found} == kinds, (command, found)
        assert np.all(np.isfinite(safe)) and np.all(np.abs(safe - START) <= 0.5 + 1e-9)
    report = s.report()
    assert set(report["interventions"]) == set(KINDS)
    assert report["interventions_total"] == sum(report["interventions"].values()) == len(s.log) >= len(cases)


def test_workspace_stops_a_tool_at_the_table(aloha_kinematics):
    s = layer(aloha_kinematics, max_joint_step=3.0)
    env = aloha_kinematics.env
    down, _ = env.solve_ik("left", np.array([-0.1, 0.5, -0.2]), q_init=START[:6])  # into the table
    command = START.copy()
    command[:6] = down
    safe, found = s.filter(command, RobotState(START, 0.0, START), 0.0)
    assert [i.kind for i in found] == ["workspace"]
    assert aloha_kinematics.tcp_position("left", safe[:6])[2] >= 0.04 - 1e-4
    assert aloha_kinematics.tcp_position("left", command[:6])[2] < 0.0
    np.testing.assert_allclose(safe[7:], START[7:])  # the right arm's command was fine


def test_emergency_stop_latches_a_hold(aloha_kinematics):
    s = layer(aloha_kinematics)
    s.trip("test")
    safe, found = s.filter(START + 0.05, RobotState(START, 0.0, START), 0.0)
    np.testing.assert_array_equal(safe, START)
    assert [i.kind for i in found] == ["estop"] and s.report()["emergency_stop"] == "test"


def test_estop_key_on_a_terminal(monkeypatch):
    master, slave = pty.openpty()
    with open(slave, "r") as tty_in:
        monkeypatch.setattr(sys, "stdin", tty_in)
        with EmergencyStop(key="x") as stop:
            os.write(master, b"ax")
            deadline = time.monotonic() + 5
            while not stop.tripped and time.monotonic() < deadline:
                time.sleep(0.01)
    os.close(master)
    assert stop.reason == "key 'x'"


# -- adversarial streams through the hardware path --------------------------------------------------------
class FakeClock:
    """Time that moves only when the run sleeps (its pacing) or an agent says it took long."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class Adversary:
    """The task's scripted expert (bound to the simulated robot's env), its actions corrupted by ``kind``."""

    def __init__(self, robot, kind: str, clock: FakeClock, release: threading.Event):
        self.robot, self.kind, self.clock, self.release = robot, kind, clock, release
        self.expert = envs.make_expert(robot.config.task, robot.env)
        self.rng = np.random.default_rng(0)

    def reset(self, obs, info):
        self.expert.reset(obs, info)
        self.t = 0

    def act(self, obs, info):
        a = np.asarray(self.expert.act(obs, info), dtype=np.float64)
        t, self.t = self.t, self.t + 1
        return CORRUPT[self.kind](self, t, a)


def toward_table(adv: Adversary, t: int, a: np.ndarray) -> np.ndarray:
    env = adv.robot.env.unwrapped
    for i, arm in enumerate(("left", "right")):
        a[7 * i: 7 * i + 6], _ = env.solve_ik(arm, np.array([0.3 * (2 * i - 1), 0.5, -0.3]))
    return a


def frozen(adv: Adversary, t: int, a: np.ndarray) -> np.ndarray:
    if t >= 5:
        adv.release.wait()  # never returns during the run: the watchdog holds, then the stop trips
    return a


def late(adv: Adversary, t: int, a: np.ndarray) -> np.ndarray:
    if t % 2:
        adv.clock.t += 0.05  # this action took 50 ms: computed from a stale observation
    return a


def signalled(signum: int):
    """An agent that sends the process ``signum`` (Ctrl-C, a supervisor's SIGTERM) at step 6, then jumps."""

    def corrupt(adv: Adversary, t: int, a: np.ndarray) -> np.ndarray:
        if t == 6:
            os.kill(os.getpid(), signum)
            time.sleep(0.05)
        return a + (0.2 if t > 6 else 0.0)

    return corrupt


CORRUPT = {
    "nan": lambda adv, t, a: np.where(np.arange(len(a)) == t % len(a), np.nan, a) if t % 3 == 0 else a,
    "inf": lambda adv, t, a: np.where(np.arange(len(a)) == t % len(a), np.inf * (-1) ** t, a) if t % 3 == 0 else a,
    "huge_jumps": lambda adv, t, a: a + adv.rng.normal(0.0, 5.0, len(a)),
    "out_of_range": lambda adv, t, a: adv.rng.uniform(-10.0, 10.0, len(a)),
    "toward_table": toward_table,
    "frozen": frozen,
    "late": late,
    "sigint": signalled(signal.SIGINT),
    "sigterm": signalled(signal.SIGTERM),
}


class Spy:
    """Wraps the simulated robot's actuator hook: records (previous command, command, stopped) for every
    command that reaches the actuators."""

    def __init__(self, monkeypatch):
        self.sent: list[tuple[np.ndarray, np.ndarray, bool]] = []
        self.robot = None
        original = EmuSim._actuate

        def actuate(robot, command):
            self.robot = robot
            ref = robot.last_command if robot.last_command is not None else \
                robot.safety.hold_command(RobotState(robot._measure(), 0.0))
            self.sent.append((np.array(ref), np.array(command, dtype=np.float64), robot.safety.stopped is not None))
            original(robot, command)

        monkeypatch.setattr(EmuSim, "_actuate", actuate)


def unsafe(robot, sent, kinematics) -> list[str]:
    """Every way the recorded commands break the limits, re-derived here from the robot's config."""
    space, cfg = robot.safety.space, robot.safety.config
    grip = np.isin(np.arange(len(space.names)), space.grippers)
    lo = np.where(grip, space.lower, space.lower + cfg.joint_margin)
    hi = np.where(grip, space.upper, space.upper - cfg.joint_margin)
    step = np.where(grip, cfg.max_gripper_step, cfg.max_joint_step)
    box_lo, box_hi = np.array(cfg.workspace_low), np.array(cfg.workspace_high)
    out = lambda p: float(np.linalg.norm(np.maximum(box_lo - p, 0) + np.maximum(p - box_hi, 0)))
    problems = []
    for k, (ref, cmd, stopped) in enumerate(sent):
        if cmd.shape != ref.shape or not np.all(np.isfinite(cmd)):
            problems.append(f"{k}: not a finite command")
            continue
        if np.any(cmd < lo - 1e-9) or np.any(cmd > hi + 1e-9):
            problems.append(f"{k}: outside the limits")
        if np.any(np.abs(cmd - ref) > step + 1e-9):
            problems.append(f"{k}: a step larger than allowed")
        for arm, idx in space.arms.items():
            if out(kinematics.tcp_position(arm, cmd[list(idx)])) > max(out(kinematics.tcp_position(arm, ref[list(idx)])), 0) + 1e-6:
                problems.append(f"{k}: {arm} tool centre point left the workspace")
        if stopped and not np.array_equal(cmd, ref):
            problems.append(f"{k}: moved after the emergency stop")
    return problems


def configs(task: str, steps: int) -> tuple[EnvConfig, AgentConfig, dict]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="rollout", overrides=[f"env={task}", "robot=sim", "agent=scripted",
                                                        "env.image_size=32", f"env.max_episode_steps={steps}"])
    settings = OmegaConf.to_container(cfg.robot, resolve=True)
    for kind in ("aloha", "widowx"):
        settings[kind]["safety"]["estop_after_missed"] = 10
    return to_dataclass(EnvConfig, cfg.env), to_dataclass(AgentConfig, cfg.agent), settings


STREAMS = [(ALOHA, k) for k in CORRUPT] + [(WIDOWX, "nan"), (WIDOWX, "out_of_range"), (WIDOWX, "huge_jumps")]


@pytest.mark.parametrize("task, kind", STREAMS)
def test_adversarial_stream_sends_nothing_unsafe(task, kind, tmp_path, monkeypatch, aloha_kinematics, capsys):
    env_cfg, agent_cfg, settings = configs(task, steps=40 if task == ALOHA else 12)
    clock, release, spy = FakeClock(), threading.Event(), Spy(monkeypatch)
    try:
        summary = run_on_robot(env_cfg, agent_cfg, settings, episodes=1, seed=0, dry_run=False, output_dir=tmp_path,
                               clock=clock, sleep=clock.sleep,
                               agent_factory=lambda robot: Adversary(robot, kind, clock, release))
    finally:
        release.set()
    kinematics = aloha_kinematics if task == ALOHA else WidowXKinematics()
    assert spy.sent and summary["commands_sent"] == len(spy.sent)
    assert unsafe(spy.robot, spy.sent, kinematics) == []
    counts = {k: v for k, v in summary["interventions"].items() if v}
    expected = {"nan": "non_finite", "inf": "non_finite", "huge_jumps": "joint_step", "out_of_range": "joint_limit",
                "toward_table": "workspace", "frozen": "estop", "late": "watchdog", "sigint": "estop",
                "sigterm": "estop"}[kind]
    if task == WIDOWX and kind == "out_of_range":
        expected = "action_bounds"
    assert counts.get(expected, 0) > 0, counts
    if kind in ("frozen", "sigint", "sigterm"):
        stop = {"frozen": "the agent missed 10 deadlines in a row", "sigint": "SIGINT", "sigterm": "SIGTERM"}[kind]
        assert summary["emergency_stop"] == stop
        assert not spy.robot.is_connected and spy.sent[-1][2]  # the last command was the stop's hold
    with capsys.disabled():
        print(f"\n{task:20s} {kind:13s} commands sent {summary['commands_sent']:3d}  interventions {counts}  "
              f"unsafe 0  stop {summary['emergency_stop']}")


def test_a_flood_of_commands_is_held_and_stays_in_limits(monkeypatch, tmp_path):
    """200 random commands sent as fast as the robot takes them, on the real clock, with a 20 Hz
    command-rate limit: the flood is held, and what gets through moves one step at a time."""
    from lerobot_robot_emu_world.config import EmuSimConfig

    settings = yaml.safe_load((CONFIG_DIR / "robot" / "sim.yaml").read_text())
    settings["aloha"]["safety"]["min_command_interval"] = 0.05
    (tmp_path / "sim.yaml").write_text(yaml.safe_dump(settings))
    spy = Spy(monkeypatch)
    robot = EmuSim(EmuSimConfig(task=ALOHA, image_size=32, camera_names=["top"], config_file=str(tmp_path / "sim.yaml")))
    robot.connect()
    rng = np.random.default_rng(1)
    try:
        for _ in range(200):
            robot.get_observation()
            robot.send_action(rng.uniform(-10, 10, 14))
    finally:
        robot.disconnect()
    assert unsafe(robot, spy.sent, AlohaKinematics()) == []
    assert robot.safety.counts["rate"] > 100 and robot.commands_sent == 200
